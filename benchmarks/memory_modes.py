"""Memory of the project's own distillation job, full fine-tune vs LoRA mode, same batch, on the tiny pipelines
(the built-in teacher and the tiny SD3 pipeline of tests/tiny_pipelines.py): what each worker holds (the unique
storages of the teacher's, student's, fake's and EMA's weights; the AdamW moments) and its peak RSS, as the
workers log them to MLflow (``memory.*``, ``workflows.train_worker.peak_memory`` / ``worker_roles.held_mib``).

    OMP_NUM_THREADS=1 python benchmarks/memory_modes.py [--out benchmarks/results]

Writes ``memory_jobs.json`` and ``memory_jobs.md`` beside ``memory.md`` (the projection for the large backbones).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
RESULTS = Path(__file__).resolve().parent / "results"
# MLflow names: "/" -> "."
KEYS = ("memory.weights_mib", "memory.optimizer_mib", "memory.master_mib", "memory.peak_rss_mib")


def run_job(tmp: Path, teacher: str, lora: bool, batch: int, precision: str) -> dict:
    from mlflow.tracking import MlflowClient

    from tests.distill_helpers import tiny_overrides
    from workflows.config import load_config
    from workflows.distill import run_distill
    from workflows.distill_config import DistillConfig

    tmp.mkdir(parents=True, exist_ok=True)
    prompts = tmp / "prompts.txt"
    prompts.write_text("a photo of a bag\na red sneaker\na striped shirt\na pair of trousers\n")
    extra = {
        "train.batch_size_per_worker": batch,
        "train.student_steps": 4,
        "scaling.num_workers": 1,
        "deepspeed.precision": precision,
    }
    if teacher != "builtin":
        extra.update(teacher=teacher, prompts=str(prompts))
    if lora:
        extra.update({"lora.enabled": "true", "lora.rank": 16})
    s = run_distill(load_config(DistillConfig, "tiny", tiny_overrides(tmp, **extra)))
    c = MlflowClient(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")
    return {k.split(".")[1]: max(m.value for m in c.get_metric_history(s["run_id"], k)) for k in KEYS}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--batch", type=int, default=8)
    a = ap.parse_args()
    import ray

    from tests.tiny_pipelines import build_tiny_sd3

    ray.init(num_cpus=3, include_dashboard=False)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        sd3 = build_tiny_sd3(d / "sd3-pipeline")
        for name, teacher in (("built-in teacher (2.4 M)", "builtin"), ("tiny SD3 pipeline", str(sd3))):
            for precision in ("fp32", "bf16"):
                for lora in (False, True):
                    r = run_job(d / f"{len(rows)}", teacher, lora, a.batch, precision)
                    rows.append({"teacher": name, "precision": precision, "mode": "lora r16" if lora else "full", **r})
                print(json.dumps(rows[-1]), flush=True)
    out = Path(a.out)
    res = {
        "machine": f"{platform.machine()} CPU, 1 worker, ZeRO-2, batch {a.batch} per worker",
        "command": "OMP_NUM_THREADS=1 python benchmarks/memory_modes.py",
        "rows": rows,
    }
    (out / "memory_jobs.json").write_text(json.dumps(res, indent=2) + "\n")
    lines = [
        "# Memory of the distillation job: full fine-tune vs LoRA mode (measured)",
        "",
        f"Machine: {res['machine']}. Command: `{res['command']}`. Each row is one real `cdm distill` job (Ray Train +",
        "DeepSpeed, 4 student steps); the values are the maxima its worker logged to MLflow. `weights`: the unique",
        "storages of the teacher's, student's, fake teacher's and EMA's weights the worker holds; `optimizer`: the",
        "AdamW moments; `masters`: the tensors that optimizer steps when they are not the modules' own (DeepSpeed's",
        "flat fp32 partitions: the master weights under bf16); `peak RSS`: the worker process (Python, torch and Ray",
        "included, so the weights' share is small",
        "on these tiny models). The projection for SD3-Medium and LongCat-Image is in `memory.md`. bf16: DeepSpeed's",
        "bf16 engines (fp32 masters in the optimizer) and the frozen teacher, or LoRA's shared base, cast to bf16",
        "(`workflows.worker_roles.freeze_to`); the EMA stays fp32.",
        "",
        "| teacher | precision | mode | weights MiB | optimizer MiB | masters MiB | peak RSS MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = f"{r['weights_mib']:.2f} | {r['optimizer_mib']:.2f} | {r['master_mib']:.2f} | {r['peak_rss_mib']:.0f}"
        lines.append(f"| {r['teacher']} | {r['precision']} | {r['mode']} | {cells} |")
    (out / "memory_jobs.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
