"""``cdm teacher train`` and ``cdm evaluator train``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from cdm_cli import _command_line, _threads, evaluator_app, teacher_app, user_errors


@teacher_app.command("train")
@user_errors
def teacher_train(
    config: str = typer.Option("teacher-tiny", help="preset name under configs/ or a YAML path"),
    out: Path = typer.Option(Path("outputs/teacher-tiny"), help="output folder (checkpoint.pt + model/)"),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="override, e.g. --set steps=1000"),
    dry_run: bool = typer.Option(False, help="print the resolved config and exit"),
):
    """Train the built-in teacher (rectified flow on Fashion-MNIST, CFG dropout, EMA).

    Examples:

    ```
    cdm teacher train --out outputs/teacher
    cdm teacher train --set device=cuda --set max_minutes=4 --out outputs/teacher

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 -m cdm_cli teacher train --out outputs/teacher
    ```

    Resume: run the same command again.
    """
    from workflows.config import TeacherTrainConfig, load_config

    cfg = load_config(TeacherTrainConfig, config, set_)
    if dry_run:
        typer.echo(cfg.model_dump_json(indent=2))
        return
    _threads()
    from workflows.teacher import train_teacher

    folder = train_teacher(cfg, out, command=_command_line())
    if os.environ.get("RANK", "0") == "0":  # under torchrun: once, not once per process
        typer.echo(f"teacher model folder: {folder}")


@evaluator_app.command("train")
@user_errors
def evaluator_train(
    out: Path = typer.Option(Path("outputs/evaluator"), help="output folder"),
    epochs: int = typer.Option(4, min=1, max=100),
    device: str = typer.Option("cpu"),
    seed: int = typer.Option(None, min=0, help="default: 0 for cnn, 1 for resnet"),
    kind: str = typer.Option("cnn", help="cnn (the first judge) | resnet (the second, independent judge)"),
):
    """Train a judge on the training split; reference statistics from the test split.

    Example:

    ```
    cdm evaluator train --out workflows/assets/evaluator --epochs 4
    cdm evaluator train --kind resnet --out workflows/assets/judge2 --epochs 3
    ```
    """
    _threads()
    from workflows.evaluator import KINDS, train_evaluator

    if kind not in KINDS:
        raise ValueError(f"--kind must be one of {sorted(KINDS)}, got {kind!r}")
    train_evaluator(out, epochs=epochs, device=device, seed=seed, command=_command_line(), kind=kind)
