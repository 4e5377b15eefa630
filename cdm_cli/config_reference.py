"""``docs/configuration.md``, generated from the typed configs (every field, its type, default, range and
description): ``cdm config-reference --out docs/configuration.md``. A test fails when the file is stale."""

from __future__ import annotations

import json
import typing
from pathlib import Path

import typer
from pydantic import BaseModel

from cdm_cli import app, user_errors

DOC = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
BOUND_SIGNS = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<", "min_length": "len ≥", "max_length": "len ≤"}


def _configs() -> list[tuple[str, type[BaseModel], str]]:
    from serving.config import BatchingConfig, ServeArgs
    from tuning.sweep_config import SweepConfig
    from workflows.config import TeacherTrainConfig
    from workflows.distill_config import DistillConfig

    return [
        ("DistillConfig", DistillConfig, "`cdm distill`, `cdm pipeline`, `cdm run`: `configs/tiny.yaml`"),
        ("SweepConfig", SweepConfig, "`cdm sweep`: `configs/sweep-tiny.yaml`"),
        ("ServeArgs", ServeArgs, "`cdm serve`, `serve run`: `deploy/serve.yaml` applications[0].args"),
        ("BatchingConfig", BatchingConfig, "`deploy/serve.yaml` deployments[0].user_config (live-reconfigurable)"),
        ("TeacherTrainConfig", TeacherTrainConfig, "`cdm teacher train`: `configs/teacher-tiny.yaml`"),
    ]


def _type(ann) -> str:
    s = str(ann).replace("typing.", "")
    if isinstance(ann, type):
        s = ann.__name__
    return s.replace("NoneType", "None").replace("|", "\\|")


def _bounds(field) -> str:
    out = []
    for m in field.metadata:
        for k, sign in BOUND_SIGNS.items():
            v = getattr(m, k, None)
            if v is not None:
                out.append(f"{sign} {v:g}" if isinstance(v, float) else f"{sign} {v}")
    args = typing.get_args(field.annotation)
    if typing.get_origin(field.annotation) is typing.Literal:
        out.append("one of " + ", ".join(f"`{a}`" for a in args))
    return ", ".join(out)


def _default(field) -> str:
    if field.default_factory is not None:
        v = field.default_factory()
    else:
        v = field.default
    if isinstance(v, BaseModel):
        return "(section)"
    return f"`{json.dumps(v, default=str)}`"


def _first_line(model: type[BaseModel]) -> str:
    doc = (model.__doc__ or "").strip()
    return doc.split("\n\n")[0].replace("\n", " ") if doc and not doc.startswith("Usage docs") else ""


def _table(model: type[BaseModel], prefix: str, lines: list[str]) -> None:
    rows, subs = [], []
    for name, f in model.model_fields.items():
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            subs.append((f"{prefix}{name}", ann))
            continue
        desc = (f.description or "").replace("|", "\\|").replace("\n", " ")
        rows.append(f"| `{prefix}{name}` | {_type(ann)} | {_default(f)} | {_bounds(f)} | {desc} |")
    if rows:
        lines += ["| field | type | default | range | description |", "|---|---|---|---|---|", *rows]
    for path, sub in subs:
        lines += ["", f"### `{path}`", ""]
        if _first_line(sub):
            lines += [_first_line(sub), ""]
        _table(sub, path + ".", lines)


def render() -> str:
    lines = [
        "# Configuration reference",
        "",
        "Generated from the typed configs by `cdm config-reference --out docs/configuration.md`; "
        "`tests/test_cli.py` fails when this file is stale. Every field can be set in the YAML or with "
        "`--set section.field=value`; values outside a field's range are rejected with the field's name.",
    ]
    for title, model, where in _configs():
        lines += ["", f"## {title}", "", f"Used by {where}. {_first_line(model)}".rstrip(), ""]
        _table(model, "", lines)
    return "\n".join(lines) + "\n"


@app.command("config-reference")
@user_errors
def config_reference_cmd(out: Path = typer.Option(DOC, help="where to write the Markdown")):
    """Write the configuration reference (every field of every config, default, range, description).

    Example:

    ```
    cdm config-reference --out docs/configuration.md
    ```
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render())
    typer.echo(f"wrote {out}")
