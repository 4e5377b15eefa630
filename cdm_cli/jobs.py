"""Jobs on Ray: ``cdm distill``, ``cdm pipeline``, ``cdm run`` (the pipeline on the embedded default) and
``cdm sweep``."""

from __future__ import annotations

import json
from typing import Optional

import typer

from cdm_cli import _command_line, _threads, app, user_errors


def _dry_run(cfg, job_key, check_prompts, resources, storage_dir, teacher_path, tracking_uri) -> None:
    """The resolved config, job key, resources and memory plan; what would stop the job is listed under
    ``problems`` (exit code 2) instead of ending the dry run at the first one."""
    from pathlib import Path

    from workflows.resource_plan import job_plan

    problems, teacher, n_prompts = [], None, None
    try:
        teacher = teacher_path(cfg)
    except (ValueError, FileNotFoundError) as e:
        problems.append(str(e))
    try:
        n_prompts = check_prompts(cfg).n
    except (ValueError, FileNotFoundError) as e:
        problems.append(str(e))
    try:
        memory = job_plan(cfg, teacher if teacher is not None else Path(cfg.teacher).expanduser())
    except (ValueError, KeyError) as e:
        memory, _ = None, problems.append(f"memory plan: {e}")
    typer.echo(cfg.model_dump_json(indent=2))
    out = {
        "job_key": job_key(cfg),
        "teacher": str(teacher) if teacher else cfg.teacher,
        "prompts": n_prompts,
        "storage": str(storage_dir(cfg) / job_key(cfg)),
        "tracking_uri": tracking_uri(cfg.mlflow.tracking_uri),
        "resources": resources(cfg),
        "memory_per_gpu": memory,
        "problems": problems,
    }
    typer.echo(json.dumps(out, indent=2))
    if problems:
        raise typer.Exit(2)


@app.command("distill")
@user_errors
def distill_cmd(
    config: str = typer.Option("tiny", help="preset name under configs/ or a YAML path"),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="override, e.g. --set train.student_steps=500"),
    dry_run: bool = typer.Option(False, help="print the resolved config, job key, resources and memory plan"),
):
    """Distill a teacher into a 4-step student with CDM on Ray Train + DeepSpeed; lineage in MLflow.

    `--dry-run` prints the resolved config, the job key, the resources and the estimated memory per GPU (full or
    LoRA mode, ZeRO stage; `workflows.memory_plan`), and lists what would stop the job (exit code 2).

    Examples:

    ```
    cdm distill --config tiny --dry-run
    cdm distill --config sd3-medium --set teacher=/models/sd3 --dry-run
    cdm distill --config sd3-medium --set lora.enabled=true --set lora.rank=64 --dry-run
    cdm distill --config tiny
    cdm distill --config tiny --set scaling.num_workers=4 --set deepspeed.zero_stage=3
    ray job submit --working-dir . -- cdm distill --config tiny
    ```

    Resume: run the same command again (same config = same job key = same checkpoints and MLflow run).
    """

    from workflows.config import load_config
    from workflows.distill import check_prompts, job_key, resources, run_distill, storage_dir, teacher_path
    from workflows.distill_config import DistillConfig
    from workflows.lineage import tracking_uri

    cfg = load_config(DistillConfig, config, set_)
    if dry_run:
        _dry_run(cfg, job_key, check_prompts, resources, storage_dir, teacher_path, tracking_uri)
        return
    summary = run_distill(cfg, command=_command_line())
    from workflows.progress import console

    console.print_json(json.dumps(summary))


GATE_FAILED_EXIT = 3  # `cdm pipeline` / `cdm run`: the student was registered but not promoted


def _pipeline(config: str, set_, serve_config, port, keep_serving, no_serve, sweep=None, sweep_set=None) -> None:
    from functools import partial

    from serving.smoke import block_until_interrupted, serve_and_smoke
    from tuning.sweep import run_or_reuse
    from workflows.config import load_config
    from workflows.distill_config import DistillConfig
    from workflows.pipeline import GateFailed, run_pipeline

    cfg = load_config(DistillConfig, config, set_)
    _threads()
    try:
        out = run_pipeline(
            cfg,
            command=_command_line(),
            serve_config=serve_config,
            port=port,
            keep_serving=keep_serving,
            serve_stage=None if no_serve else serve_and_smoke,
            sweep_stage=partial(run_or_reuse, sweep, list(sweep_set or [])) if sweep else None,
        )
    except GateFailed as e:
        typer.secho(str(e), fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(GATE_FAILED_EXIT) from None
    if keep_serving and out.get("smoke"):
        block_until_interrupted()


_SERVE_CONFIG = typer.Option(None, "--serve-config", help="Serve config YAML (default deploy/serve.yaml)")
_PORT = typer.Option(None, min=1, max=65535, help="HTTP port of the service (default: the config's, or a free one)")
_KEEP = typer.Option(False, "--keep-serving", help="leave the service up after the smoke request (Ctrl-C stops)")
_NO_SERVE = typer.Option(False, "--no-serve", help="skip the serve stage and its smoke request")


@app.command("pipeline")
@user_errors
def pipeline_cmd(
    config: str = typer.Option("tiny", help="distillation preset under configs/ or a YAML path"),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="override, e.g. --set gate.factor=0.9"),
    serve_config: Optional[str] = _SERVE_CONFIG,
    port: Optional[int] = _PORT,
    keep_serving: bool = _KEEP,
    no_serve: bool = _NO_SERVE,
    sweep: Optional[str] = typer.Option(
        None, "--sweep", help="first run this sweep preset (or YAML) and distill with its best trial's values"
    ),
    sweep_set: Optional[list[str]] = typer.Option(None, "--sweep-set", help="override of the sweep config"),
):
    """(Sweep ->) distill -> evaluate against the teacher -> register -> quality gate -> alias `champion` -> serve ->
    smoke request -> summary (table, PNG grid, lineage), in one command.

    Each stage writes its output under `<storage>/<job key>/pipeline/`; running the same command again skips
    what is done (rerun = resume). The gate (`gate:` in the config: `lower`, `factor`, `bands`, `alias`)
    compares the student with the teacher's own few-step Euler on the same test set. When it fails the
    version stays registered without the alias, the command exits with code 3, and
    `cdm promote NAME --version V --force` is the human override.

    `--sweep PRESET` first runs that Ray Tune sweep (`cdm sweep`; same teacher and prompts required), then
    distills with the best trial's searched values on top of this config, at this config's full budget. The
    sweep's own best trial stays registered as `@candidate`; the distillation run is tagged with the sweep's
    key and parent run. A finished sweep with the same key is read back, not run again.

    Examples:

    ```
    cdm pipeline --config tiny
    cdm pipeline --config tiny --keep-serving --port 8080
    cdm pipeline --config tiny --set gate.factor=0.5 --no-serve
    cdm pipeline --config tiny --sweep sweep-tiny --sweep-set budget.num_samples=4
    ```
    """
    _pipeline(config, set_, serve_config, port, keep_serving, no_serve, sweep, sweep_set)


@app.command("run")
@user_errors
def run_cmd(
    config: str = typer.Option("tiny", help="distillation preset"),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="override, e.g. --set train.student_steps=50"),
    keep_serving: bool = _KEEP,
):
    """The main job on the embedded default: `cdm pipeline --config tiny`.

    Distills the built-in teacher (local Ray, DeepSpeed, MLflow in ./mlflow.db, checkpoints in ./runs),
    evaluates it beside the teacher at 4 Euler steps and at 100 NFE (50 steps x CFG; cached after the first
    run), gates it, aliases it `champion`, serves it with Ray Serve for one smoke request, stops the service
    and prints the summary and how to serve the result.

    Example:

    ```
    cdm run
    cdm run --set train.student_steps=50
    ```
    """
    _pipeline(config, set_, None, None, keep_serving, False)


@app.command("sweep")
@user_errors
def sweep_cmd(
    config: str = typer.Option("sweep-tiny", help="sweep preset under configs/ or a YAML path"),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="override, e.g. --set budget.num_samples=8"),
    dry_run: bool = typer.Option(False, help="print the trials and the resources they need, then exit"),
):
    """Ray Tune sweep over N_max, CFG scale, learning rate (any config field) with ASHA early stopping.

    Examples:

    ```
    cdm sweep --config sweep-tiny --dry-run
    cdm sweep --config sweep-tiny
    ```

    Resume: run the same command again (finished trials are not rerun, MLflow runs are reused).
    """

    from tuning.sweep import main as sweep_main
    from workflows.progress import console

    out = sweep_main(config=config, overrides=list(set_ or []), dry_run=dry_run)
    if out:
        console.print_json(json.dumps(out, default=str))
