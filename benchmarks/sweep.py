"""The sweep benchmark: a small real sweep on the built-in teacher vs the default preset, same budget.

    python benchmarks/sweep.py                    # both phases, then sweep.json + sweep.md
    python benchmarks/sweep.py --phase default    # one phase (each is resumable: rerun the same command)
    python benchmarks/sweep.py --phase sweep
    python benchmarks/sweep.py --phase summarize

Sweep: ``configs/sweep-tiny.yaml`` (Optuna over N_max, alpha, student lr and fake lr ratio; ASHA on the
validation FD; 1 worker per trial, 2 trials at a time). Default: the ``tiny`` preset's recipe trained with
the same budget and worker count through ``cdm distill``'s code path. Both are scored the same way:
validation FD (seed 100, N=500, what the sweep optimises) at the last step, and the held-out test
evaluation (seed 0, N=1000, ``evaluate_folder``) of the exported EMA student, which the sweep never sees.
Each phase runs in a child process with its own Ray; the CPU time of that whole process tree (driver,
GCS, raylet, trial drivers, Train workers) is recorded. Outputs: ``results/sweep.json``, ``results/sweep.md``,
``results/sweep_work/``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results"
WORK = RESULTS / "sweep_work"  # small files only (tables, plots, per-phase json); checkpoints go to STORE
STORE = REPO / "runs" / "bench-sweep"
URI = f"sqlite:///{STORE / 'mlflow.db'}"
SWEEP_SETS = [
    f"base.storage_path={STORE}",
    f"base.mlflow.tracking_uri={URI}",
    "base.mlflow.registered_model=cdm-tiny-sweep",
    "base.eval.n_samples=1000",
    "base.eval.seeds=[0]",
]


def machine() -> str:
    import torch

    return (
        f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')}"
    )


def default_overrides() -> list[str]:
    """The default preset with the sweep's budget: student steps, workers, validation cadence and set."""
    from tuning.sweep_config import load_sweep

    sweep, base = load_sweep("sweep-tiny", SWEEP_SETS)
    return [
        f"storage_path={STORE}",
        f"mlflow.tracking_uri={URI}",
        "mlflow.registered_model=cdm-tiny-default",
        f"train.student_steps={base.train.student_steps}",
        f"train.checkpoint_every={sweep.validation.every}",
        f"scaling.num_workers={base.scaling.num_workers}",
        f"eval.val_every={sweep.validation.every}",
        f"eval.val_n_samples={sweep.validation.n_samples}",
        f"eval.val_seed={sweep.validation.seed}",
        "eval.n_samples=1000",
        "eval.seeds=[0]",
    ]


def phase_default() -> dict:
    from mlflow.tracking import MlflowClient

    from workflows.config import load_config
    from workflows.distill import run_distill
    from workflows.distill_config import DistillConfig

    cfg = load_config(DistillConfig, "tiny", default_overrides())
    s = run_distill(cfg, command="python benchmarks/sweep.py --phase default")
    metric = _sweep_metric()  # compare like with like: the metric the sweep optimises
    hist = MlflowClient(URI).get_metric_history(s["run_id"], metric)
    curve = sorted({m.step: m.value for m in hist}.items())
    return {
        "config": {
            "cdm.n_max": cfg.cdm.n_max,
            "cdm.alpha": cfg.cdm.alpha,
            "optim.lr_student": cfg.optim.lr_student,
            "optim.fake_lr_ratio": cfg.optim.fake_lr_ratio,
            "cdm.fake_mix": cfg.cdm.fake_mix,
        },
        "metric": metric,
        "val": curve[-1][1],
        "val_curve": curve,
        "test": s["eval.fd"],
        "test_metrics": {k: v for k, v in s.items() if k.startswith("eval.")},
        "run_id": s["run_id"],
    }


def phase_sweep() -> dict:
    from tuning.sweep import main

    r = main("sweep-tiny", SWEEP_SETS)
    out = WORK / "report"
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(Path(r["tune_path"]) / "report", out)
    return r


class TreeCPU:
    """CPU seconds of a process and every descendant it ever had (Ray's GCS, raylet, trial drivers, Train
    workers), sampled every ``period`` s: the last reading of each pid counts, so only processes that lived
    under one period are missed."""

    def __init__(self, pid: int, period: float = 0.5):
        import threading

        self.pid, self.period, self.last = pid, period, {}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _sample(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
            procs = [root] + root.children(recursive=True)
        except psutil.NoSuchProcess:
            return
        for p in procs:
            try:
                t = p.cpu_times()
                self.last[(p.pid, p.create_time())] = t.user + t.system
            except psutil.Error:
                pass

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.period)

    def stop(self) -> float:
        self._stop.set()
        self._t.join()
        return sum(self.last.values())


def run_phase(name: str) -> dict:
    """The phase in a child process with its own Ray; CPU time of its whole process tree (``TreeCPU``)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.time()
    proc = subprocess.Popen(
        [sys.executable, __file__, "--phase", name, "--inner"],
        cwd=REPO,
        env={k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")},
    )
    tree = TreeCPU(proc.pid)
    if proc.wait() != 0:
        tree.stop()
        raise SystemExit(f"phase {name} failed with exit code {proc.returncode}")
    tree_s = tree.stop()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    res = json.loads((WORK / f"{name}.json").read_text())
    reaped = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    res["cpu_s"] = max(tree_s, reaped)
    res["cpu_s_reaped_only"] = reaped
    res["wall_s"] = time.time() - t0
    (WORK / f"{name}.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    return res


def summarize() -> dict:
    d = json.loads((WORK / "default.json").read_text()) if (WORK / "default.json").exists() else None
    s = json.loads((WORK / "sweep.json").read_text()) if (WORK / "sweep.json").exists() else None
    out = {
        "machine": machine(),
        "budget": budget_text(),
        "metric": (d or s or {}).get("metric") or _sweep_metric(),
        "command": "OMP_NUM_THREADS=1 python benchmarks/sweep.py",
        "teacher": _teacher(),
    }
    if d:
        out["default"] = {
            "config": d["config"],
            "val": d["val"],
            "test": d["test"],
            "test_metrics": _panel(d.get("test_metrics", {})),
            "cpu_s": d.get("cpu_s"),
            "wall_s": d.get("wall_s"),
        }
    if s:
        out.update(
            {
                "trials": s["trials"],
                "stopped_early": s["stopped_early"],
                "cpu_s": s.get("cpu_s"),
                "wall_s": s.get("wall_s"),
                "best": {
                    "config": s["best"]["config"],
                    "val": s["best"]["val"],
                    "test": s["best"]["test"]["eval.fd"],
                    "test_metrics": _panel(s["best"]["test"]),
                    "student_steps": s["best"]["student_steps"],
                    "trial_id": s["best"]["trial_id"],
                },
            }
        )
    if d and s:
        out["target_met"] = bool(out["best"]["val"] < d["val"] and out["best"]["test"] < d["test"])
        t_d, t_b = out["default"]["test_metrics"], out["best"]["test_metrics"]
        if "eval.fd2" in t_d and "eval.fd2" in t_b:  # the same lead in the second judge too
            out["target_met_both_judges"] = bool(out["target_met"] and t_b["eval.fd2"] < t_d["eval.fd2"])
    (RESULTS / "sweep.json").write_text(json.dumps(out, indent=2) + "\n")
    (RESULTS / "sweep.md").write_text(markdown(out))
    return out


def _teacher() -> str:
    from workflows.config import DEFAULT_TEACHER
    from workflows.evaluation import folder_hash

    h = folder_hash(DEFAULT_TEACHER)[:12]
    return f"the built-in teacher ({Path(DEFAULT_TEACHER).resolve().relative_to(REPO)}, content hash {h})"


def _sweep_metric() -> str:
    from tuning.sweep_config import load_sweep

    return load_sweep("sweep-tiny")[0].metric


TEST_KEYS = ("eval.fd", "eval.fd2", "eval.recall", "eval.recall2", "eval.near_white", "eval.edge_energy")


def _panel(m: dict) -> dict:
    """Both judges and the pixel panel of a test evaluation (the sweep chose on validation only)."""
    return {k: m[k] for k in TEST_KEYS if k in m}


def budget_text() -> str:
    from tuning.sweep_config import load_sweep

    sw, base = load_sweep("sweep-tiny", SWEEP_SETS)
    return (
        f"configs/sweep-tiny.yaml: {sw.searcher.kind} searcher (seed {sw.searcher.seed}), "
        f"{sw.budget.num_samples or 8} trials, {sw.budget.max_concurrent_trials} at a time, "
        f"{base.train.student_steps} student steps per trial at most ({base.scaling.num_workers} worker, batch "
        f"{base.train.batch_size_per_worker}), validation every {sw.validation.every} steps on seed "
        f"{sw.validation.seed} N={sw.validation.n_samples} (metric {sw.metric}, mode {sw.mode}), "
        f"ASHA grace {sw.scheduler.grace_period} rounds, "
        f"reduction factor {sw.scheduler.reduction_factor:g}; test: seed 0, N=1000, 4 NFE"
    )


def markdown(o: dict) -> str:
    lines = [
        "# Sweep: Ray Tune + ASHA over the tiny recipe vs the default preset",
        "",
        f"Machine: {o['machine']}. Command: `{o['command']}`.",
        "",
        f"Teacher: {o.get('teacher', 'not recorded')}.",
        "",
        f"Budget: {o['budget']}.",
        "",
    ]
    if "default" in o and "best" in o:
        d, b = o["default"], o["best"]
        keys = list(b["config"])
        tk = [k for k in TEST_KEYS if k in d.get("test_metrics", {}) and k in b.get("test_metrics", {})]

        def tests(r: dict) -> str:
            return "".join(f" | {r['test_metrics'][k]:.4g}" for k in tk)

        lines += [
            "| recipe | "
            + " | ".join(keys)
            + f" | val {o['metric']} (seed 100, N=500) ↓ | "
            + " | ".join(f"test {k.removeprefix('eval.')}" for k in tk)
            + " |",
            "|---|" + "---|" * len(keys) + "---|" + "---|" * len(tk),
            "| default preset (tiny) | "
            + " | ".join(f"{d['config'].get(k, '')}" for k in keys)
            + f" | {d['val']:.3f}{tests(d)} |",
            f"| sweep winner ({b['trial_id']}, step {b['student_steps']}) | "
            + " | ".join(
                f"{b['config'][k]:.4g}" if isinstance(b["config"][k], float) else str(b["config"][k]) for k in keys
            )
            + f" | {b['val']:.3f}{tests(b)} |",
            "",
            "Test (seed 0, N=1000, 4 NFE): fd / fd2 = judge 1 / judge 2 FD ↓, recall / recall2 ↑, near_white and "
            "edge_energy (real test split 0.0218 / 0.0780).",
            "",
        ]
        lines += [
            f"Trials: {o['trials']}, stopped early by ASHA: {o['stopped_early']}. Sweep CPU time "
            f"{o['cpu_s']:.0f} s (wall {o['wall_s']:.0f} s); the default run: CPU {d['cpu_s']:.0f} s "
            f"(wall {d['wall_s']:.0f} s).",
            "",
            f"**Target (winner beats the default on validation and keeps the lead on test, judge 1 FD): "
            f"{'met' if o['target_met'] else 'not met'}** — val {b['val']:.3f} vs {d['val']:.3f}, "
            f"test {b['test']:.3f} vs {d['test']:.3f}."
            + (
                f" In judge 2 too: {'yes' if o['target_met_both_judges'] else 'no'}."
                if "target_met_both_judges" in o
                else ""
            ),
            "",
        ]
    lines += [
        "Per-trial table and plots (metric vs each parameter, learning curves): `sweep_work/report/`.",
        "",
        "- CPU time is the user+system time of the phase's whole process tree (the driver, Ray's GCS and "
        "raylet, trial drivers, Train workers), sampled every 0.5 s per process (`TreeCPU`); processes "
        "that lived under 0.5 s are missed.",
        "- The validation metric (seed 100) chose the winner; the test numbers (seed 0) were computed once, "
        "after the sweep, for the winner and the default only. One test seed at N=1000: the ablation "
        "table's seed-to-seed FD spread at this N is 0.1-0.4, so a 1.0 lead is outside that noise, "
        "but this is one sweep with one searcher seed.",
        "- Learning curves drift up after 20-40 steps for most recipes (as in the ablation); ASHA compares "
        "trials at the same step, and the winner is the best *last* validation metric of its trial, exported "
        "from the checkpoint that produced it.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--phase", choices=["default", "sweep", "summarize", "all"], default="all")
    ap.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    if a.inner:
        res = phase_default() if a.phase == "default" else phase_sweep()
        (WORK / f"{a.phase}.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
        return
    phases = ["default", "sweep"] if a.phase == "all" else [a.phase] if a.phase != "summarize" else []
    for ph in phases:
        print(f"== phase {ph}", flush=True)
        run_phase(ph)
        print(json.dumps(summarize(), indent=2), flush=True)
    print(json.dumps(summarize(), indent=2))


if __name__ == "__main__":
    main()
