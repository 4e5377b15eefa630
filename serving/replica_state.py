"""Per-process state of a replica, reached by import from functions that Serve pickles with the app.

``identity``: the headers every response carries (model name, version, replica id); with ``models`` declared they
name the default model, and an answer of another model names that one instead (``serving.app``).
``max_body_bytes``: the request body limit (``ServeArgs.max_body_bytes``).
``openapi``: this deployment's OpenAPI document (``serving.openapi.document``), built once the model is loaded.
"""

identity: dict[str, str] = {}
max_body_bytes: int = 1 << 20
openapi: dict | None = None
