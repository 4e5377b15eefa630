"""Per-process state of a replica, reached by import from functions that Serve pickles by value.

``identity``: the headers every response carries (model name, version, replica id).
"""

identity: dict[str, str] = {}
