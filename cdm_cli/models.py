"""Commands on model folders and registered models: ``cdm eval``, ``cdm sample``, ``cdm promote``, ``cdm serve``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cdm_cli import _command_line, _threads, app, user_errors


def _parse_seeds(seeds: str) -> list[int]:
    try:
        out = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds: expected comma-separated integers, got {seeds!r}") from None
    if not out:
        raise ValueError("--seeds: at least one seed is needed")
    return out


@app.command("eval")
@user_errors
def eval_cmd(
    model_dir: Path = typer.Argument(..., help="model folder (diffusers format, transformer/ inside)"),
    steps: int = typer.Option(4, help="Euler steps"),
    guidance: float = typer.Option(1.0, help="CFG scale (1 = none, 1 NFE per step)"),
    shift: Optional[float] = typer.Option(None, help="time shift (default: the model's scheduler)"),
    n_samples: int = typer.Option(5000, help="samples per seed; FD depends on it"),
    seeds: str = typer.Option("0,1,2", help="comma-separated evaluation seeds"),
    reference_steps: int = typer.Option(100, help="teacher steps for mse_to_teacher100 (0 = skip)"),
    batch_size: int = typer.Option(500),
    device: str = typer.Option("cpu"),
    teacher: Optional[Path] = typer.Option(None, help="teacher folder for mse_to_teacher100"),
    evaluator: Optional[Path] = typer.Option(None, help="evaluator folder"),
    out: Path = typer.Option(Path("outputs/eval"), help="writes eval.json and grid.png here"),
):
    """Sample a model folder with a sampler spec and score it (FD, adherence, P/R, detail, MSE).

    Examples:

    ```
    cdm eval workflows/assets/teacher-tiny --steps 4 --out outputs/eval-t4
    cdm eval outputs/student --steps 4 --n-samples 5000 --seeds 0,1,2 --device cuda
    ```
    """
    from workflows.config import DEFAULT_EVALUATOR, DEFAULT_TEACHER, EvalConfig, build
    from workflows.evaluation import evaluate_folder

    cfg = build(
        EvalConfig,
        dict(
            steps=steps,
            guidance=guidance,
            shift=shift,
            n_samples=n_samples,
            seeds=_parse_seeds(seeds),
            batch_size=batch_size,
            reference_steps=reference_steps,
            device=device,
        ),
    )
    _threads()
    res = evaluate_folder(model_dir, cfg, out, teacher or DEFAULT_TEACHER, evaluator or DEFAULT_EVALUATOR)
    _print_result(res)


def _print_result(res: dict) -> None:
    from rich.table import Table

    from workflows.evaluation import METRICS
    from workflows.progress import console

    t = Table(title=f"{res['model']}  steps={res['steps']} guidance={res['guidance']} N={res['n_samples']}")
    t.add_column("metric")
    t.add_column("mean ± std over seeds")
    for k in METRICS:
        if k in res:
            t.add_row(k, f"{res[k]['mean']:.4f} ± {res[k]['std']:.4f}")
    t.add_row("s/image", f"{res['s_per_image']:.5f}" if res["s_per_image"] is not None else "cached")
    console.print(t)
    if "outputs" in res:
        console.print(f"outputs: {res['outputs']['json']}  {res['outputs']['grid']}")


@app.command("sample")
@user_errors
def sample_cmd(
    model_dir: Path = typer.Argument(..., help="model folder"),
    prompt: list[str] = typer.Option(..., help="prompt (repeat for several)"),
    n: int = typer.Option(8, min=1, max=256, help="images per prompt"),
    steps: int = typer.Option(4, min=1, max=1000),
    guidance: float = typer.Option(1.0, min=0.0, max=30.0),
    seed: int = typer.Option(0, min=0),
    out: Path = typer.Option(Path("outputs/sample.png")),
):
    """Generate a PNG grid (one row per prompt) from a model folder.

    Example:

    ```
    cdm sample workflows/assets/teacher-tiny --prompt "a photo of a sneaker" --steps 28
    ```
    """
    from workflows.images import save_grid
    from workflows.sampler import sample_prompts

    save_grid(sample_prompts(model_dir, list(prompt), n, steps, guidance, seed), out, nrow=n)
    typer.echo(f"wrote {out}")


@app.command("promote")
@user_errors
def promote_cmd(
    name: str = typer.Argument(..., help="registered model name, e.g. cdm-tiny-student"),
    version: Optional[str] = typer.Option(None, help="version to promote (default: the one aliased --source)"),
    source: str = typer.Option("candidate", help="alias to promote from"),
    alias: str = typer.Option("champion", help="alias to set"),
    tracking_uri: Optional[str] = typer.Option(None, help="default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db"),
    force: bool = typer.Option(False, help="promote a version whose quality gate failed (tagged as forced)"),
):
    """Point an alias (default `champion`, what `cdm serve` serves) at a model version.

    A version that `cdm pipeline` gated as failed (tag `cdm.gate`) is refused unless `--force`, which is
    recorded on the version (`cdm.promoted_to.<alias>.forced`).

    Example:

    ```
    cdm promote cdm-tiny-student                 # candidate -> champion
    cdm promote cdm-tiny-student --version 3
    cdm promote cdm-tiny-student --version 3 --force
    ```
    """
    from workflows import lineage

    c = lineage.client(lineage.tracking_uri(tracking_uri))
    v = lineage.promote(c, name, version, source, alias, _command_line(), force=force)
    typer.echo(f"{name}@{alias} -> version {v}{' (forced past a failed gate)' if force else ''}")


@app.command("serve")
@user_errors
def serve_cmd(
    model: Optional[str] = typer.Option(
        None,
        help="models:/<name>@<alias>, models:/<name>/<version>, a model "
        "folder or 'builtin' (default: the config's args.model)",
    ),
    config: Optional[Path] = typer.Option(None, help="Serve config YAML (default deploy/serve.yaml)"),
    host: Optional[str] = typer.Option(None, help="bind address (default from the config: 127.0.0.1)"),
    port: Optional[int] = typer.Option(None, min=1, max=65535, help="HTTP port (default from the config: 8000)"),
    tracking_uri: Optional[str] = typer.Option(
        None, help="MLflow tracking URI for models:/ (default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)"
    ),
):
    """Serve a 4-step student over HTTP with Ray Serve (autoscaling replicas, dynamic batching).

    Routes: POST /v1/images/generations (OpenAI Images API), POST /generate, GET /v1/models,
    GET /healthz, OpenAPI at /docs. Every response carries X-CDM-Model / X-CDM-Model-Version.

    Examples:

    ```
    cdm serve --model models:/cdm-tiny-student@champion
    cdm serve --model runs/tiny-abc123/student --port 8080
    serve run deploy/serve.yaml        # Ray's own CLI, same file
    ```

    Uses RAY_ADDRESS when set, else starts a local Ray instance. Ctrl-C stops the service.
    """
    from serving.launch import serve_forever

    serve_forever(model, config, host, port, tracking_uri)
