"""Config fields with their bounds: the one place an algorithm knob's range and meaning are written.

``knob(default, ge=..., le=..., description=...)`` is a dataclass field whose metadata the workflows layer
turns into a validated config section (``workflows.distill_config``), so the YAML, ``--set`` and the sweep
accept exactly what the dataclass does. The bounds use pydantic's names (gt, ge, lt, le, description) but
are plain data here: cdm_core stays torch-only.
"""

from __future__ import annotations

from dataclasses import field

BOUNDS = ("gt", "ge", "lt", "le", "description")


def knob(default, **bounds):
    """A dataclass field with ``default`` and its bounds/description as metadata."""
    bad = set(bounds) - set(BOUNDS)
    if bad:
        raise TypeError(f"knob: unknown bound(s) {sorted(bad)}; use {BOUNDS}")
    return field(default=default, metadata=bounds)
