"""Training throughput: the plain reference loop vs the same tiny job under Ray Train + DeepSpeed.

    OMP_NUM_THREADS=1 python benchmarks/train_throughput.py            # writes results/train_throughput.{json,md}

Rows: (a) plain cdm_core loop, one process, torch AdamW; (b) Ray Train, 1 worker, ZeRO-2; (c) 2 workers,
ZeRO-2; (d) 2 workers, ZeRO-3. Same CDM config and per-worker batch (weak scaling: 2 workers process 2x
the samples per step). Steady-state rates skip the first ``--warmup`` student steps; time to first step
(driver start -> first student step: Ray start, worker start-up, DeepSpeed init/JIT) is reported apart.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _overrides(steps: int, batch: int, root: Path, **extra) -> list[str]:
    base = {
        "storage_path": str(root / "runs"),
        "mlflow.tracking_uri": f"sqlite:///{root / 'mlflow.db'}",
        "train.student_steps": steps,
        "train.checkpoint_every": steps,
        "train.log_every": 1,
        "train.sample_every": 10**6,
        "train.batch_size_per_worker": batch,
        "eval.n_samples": 20,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def plain(steps: int, warmup: int, batch: int) -> dict:
    from cdm_core.distiller import build_distiller
    from cdm_core.reference_loop import LoopConfig, run_loop
    from workflows.config import DEFAULT_TEACHER, load_config
    from workflows.distill import load_prompts
    from workflows.distill_config import DistillConfig
    from workflows.embeddings import empty_prompt, encode_prompts
    from workflows.model_folder import load_model

    cfg = load_config(DistillConfig, "tiny")
    loop = LoopConfig(batch, steps, cfg.optim.to_core())
    t = load_model(DEFAULT_TEACHER)
    d = build_distiller(t.module, cfg.cdm.to_core(), loop.optim, loop.student_steps, t.family.velocity)
    prompts = encode_prompts(load_prompts(cfg))
    marks: dict[int, float] = {}

    def cb(res, secs):
        if res.student_updated:
            marks[d.step.student_steps] = time.time()

    run_loop(d, loop, prompts, empty_prompt(), t.shape, 0, cb)
    return {
        "student_steps_per_s": (steps - warmup) / (marks[steps] - marks[warmup]),
        "samples_per_s": (steps - warmup) * batch * cfg.cdm.update_ratio / (marks[steps] - marks[warmup]),
    }


def ray_row(steps: int, warmup: int, batch: int, workers: int, zero: int) -> dict:
    from mlflow.tracking import MlflowClient

    from workflows.config import load_config
    from workflows.distill import run_distill
    from workflows.distill_config import DistillConfig

    root = Path(tempfile.mkdtemp(prefix="cdm-tp-"))
    cfg = load_config(
        DistillConfig,
        "tiny",
        _overrides(steps, batch, root, **{"scaling.num_workers": workers, "deepspeed.zero_stage": zero}),
    )
    t0 = time.time()
    s = run_distill(cfg)
    c = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    points = c.get_metric_history(s["run_id"], "throughput.student_steps_per_s")
    first = min(m.timestamp for m in points if m.step == 1) / 1000  # measured at student step 1 (log_every 1)
    hist = {m.step: m.value for m in points}
    rates = [hist[k] for k in sorted(hist) if k > warmup]
    # per-window rates -> steady-state rate = steps / total time of those windows
    sps = len(rates) / sum(1.0 / r for r in rates)
    return {
        "student_steps_per_s": sps,
        "samples_per_s": sps * batch * workers * cfg.cdm.update_ratio,
        "time_to_first_step_s": first - t0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument(
        "--rows",
        default="plain,ray_1w_zero2,ray_2w_zero2,ray_2w_zero3",
        help="rows to (re)measure; the others are read from results/train_throughput_rows/",
    )
    a = ap.parse_args()
    torch.set_num_threads(1)
    import ray

    res = {
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, 1 torch thread per worker, "
        f"torch {torch.__version__}",
        "command": "OMP_NUM_THREADS=1 python benchmarks/train_throughput.py "
        + " ".join(map(shlex.quote, sys.argv[1:])),
        "student_steps": a.steps,
        "warmup_steps": a.warmup,
        "batch_per_worker": a.batch,
    }
    parts = Path(a.out) / "train_throughput_rows"
    parts.mkdir(parents=True, exist_ok=True)
    todo = a.rows.split(",")
    if "plain" in todo:
        (parts / "plain.json").write_text(json.dumps(plain(a.steps, a.warmup, a.batch)) + "\n")
    ray_rows = [r for r in (("ray_1w_zero2", 1, 2), ("ray_2w_zero2", 2, 2), ("ray_2w_zero3", 2, 3)) if r[0] in todo]
    if ray_rows:
        ray.init(num_cpus=max(3, os.cpu_count() or 1), include_dashboard=False)
        for name, w, z in ray_rows:
            r = ray_row(a.steps, a.warmup, a.batch, w, z)
            (parts / f"{name}.json").write_text(json.dumps(r) + "\n")
            print(name, r, flush=True)
        ray.shutdown()
    for name in ("plain", "ray_1w_zero2", "ray_2w_zero2", "ray_2w_zero3"):
        d = json.loads((parts / f"{name}.json").read_text())
        res[name] = d["student_steps_per_s"]
        res[f"{name}_detail"] = d
    res["time_to_first_step_s"] = res["ray_1w_zero2_detail"]["time_to_first_step_s"]
    res["ratios"] = {k: res[k] / res["plain"] for k in ("ray_1w_zero2", "ray_2w_zero2", "ray_2w_zero3")}
    out = Path(a.out)
    (out / "train_throughput.json").write_text(json.dumps(res, indent=2) + "\n")
    lines = [
        "# Training throughput: plain loop vs Ray Train + DeepSpeed",
        "",
        f"Machine: {res['machine']}. Command: `{res['command']}`. Tiny job: built-in teacher, "
        f"batch {a.batch} per worker, {a.steps} student steps, rates after the first {a.warmup}.",
        "",
        "| row | student steps/s | samples/s | × plain (steps/s) | time to first step (s) |",
        "|---|---|---|---|---|",
        f"| plain reference loop | {res['plain']:.3f} | {res['plain_detail']['samples_per_s']:.1f} | 1.00 | – |",
    ]
    for k in ("ray_1w_zero2", "ray_2w_zero2", "ray_2w_zero3"):
        d = res[f"{k}_detail"]
        lines.append(
            f"| {k} | {d['student_steps_per_s']:.3f} | {d['samples_per_s']:.1f} | {res['ratios'][k]:.2f} | "
            f"{d['time_to_first_step_s']:.1f} |"
        )
    (out / "train_throughput.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
