"""The ``cdm`` command line.

    cdm run                                    # the main job on the embedded default (= cdm pipeline)
    cdm pipeline --config tiny                 # distill, evaluate, gate, promote, serve, smoke, summary
    cdm teacher train --config teacher-tiny    # train the built-in teacher
    cdm evaluator train                        # train the evaluator's feature network
    cdm eval MODEL_DIR --steps 4               # score any model folder
    cdm sample MODEL_DIR --prompt "a photo of a sneaker" --out sneaker.png
    cdm sweep --config sweep-tiny              # Ray Tune sweep, best student aliased `candidate`
    cdm promote cdm-tiny-student               # candidate -> champion
    cdm serve --model models:/cdm-tiny-student@champion

Every command has ``--help`` with examples (a test runs each one). Bad input ends with one ``error:`` line
naming the problem. The commands are thin: each parses its options and calls the module that does the work
(``workflows``, ``tuning``, ``serving``); this package is the only one that imports all three.
"""

from __future__ import annotations

import functools
import os
import shlex
import sys

import typer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

app = typer.Typer(
    help="CDM few-step distillation platform.", no_args_is_help=True, add_completion=False, rich_markup_mode="markdown"
)
teacher_app = typer.Typer(help="The built-in teacher.", no_args_is_help=True)
evaluator_app = typer.Typer(help="The evaluator's feature network.", no_args_is_help=True)
app.add_typer(teacher_app, name="teacher")
app.add_typer(evaluator_app, name="evaluator")

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, RuntimeError)


def _command_line() -> str:
    return "cdm " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def user_errors(fn):
    """Turn known bad-input errors into one ``error:`` line and exit code 2 (set CDM_DEBUG=1 for traces)."""

    @functools.wraps(fn)
    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except typer.Exit:  # click's Exit is a RuntimeError: a command's own exit code passes through
            raise
        except USER_ERRORS as e:
            if os.environ.get("CDM_DEBUG"):
                raise
            typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from None

    return wrapper


def _threads() -> None:
    import torch

    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


def main() -> None:  # pragma: no cover
    app()


# the commands register themselves on ``app`` when their modules are imported
from cdm_cli import config_reference, jobs, models, training  # noqa: E402,F401
