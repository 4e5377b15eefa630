"""The student against its teacher on the same evaluation set: what ``cdm run`` prints at the end.

Rows: the teacher at the student's step count (4 Euler steps, 4 NFE), the built-in teacher at 100 NFE (50 steps
x CFG, the paper's reference; cached after its first run) and the exported student; both judges and the
pixel panel. Selection happened on validation seed ``eval.val_seed`` only; these are the test seeds.
"""

from __future__ import annotations

import json
from pathlib import Path

from workflows.config import EvalConfig, build
from workflows.distill_config import DistillConfig

TEACHER_CFG = 2.0  # benchmarks/results/teacher.json: cfg_selection.best_cfg (chosen on validation seed 100)
PANEL_ROWS = [
    ("fd", "FD, judge 1 (cnn) ↓"),
    ("precision", "precision, judge 1 ↑"),
    ("recall", "recall, judge 1 ↑"),
    ("fd2", "FD, judge 2 (resnet) ↓"),
    ("precision2", "precision, judge 2 ↑"),
    ("recall2", "recall, judge 2 ↑"),
    ("adherence", "adherence, judge 1 ↑"),
    ("near_white", "near-white share (real {near_white:.4f})"),
    ("edge_energy", "edge energy (real {edge_energy:.4f})"),
    ("intensity_w1", "intensity W1 to real ↓"),
    ("class_mean_gap", "per-class mean gap ↓"),
]


def comparison_rows(cfg: DistillConfig, summary: dict) -> dict[str, dict]:
    """Evaluate the teacher rows (cached by content) and read the student's test evaluation of the job."""
    from workflows.distill import teacher_path
    from workflows.evaluation import evaluate_cached

    job_dir = Path(summary["checkpoint"]).parent
    k = cfg.cdm.sampler_steps
    base = dict(n_samples=cfg.eval.n_samples, seeds=cfg.eval.seeds, reference_steps=0)
    teacher = teacher_path(cfg)
    rows = {
        f"teacher, {k} Euler steps ({k} NFE)": evaluate_cached(
            teacher, build(EvalConfig, dict(steps=k, **base)), job_dir / "teacher-4steps-eval"
        )
    }
    if cfg.teacher == "builtin":  # CFG scale the teacher table chose on its validation seed
        rows[f"teacher, 50 steps x CFG {TEACHER_CFG} (100 NFE)"] = evaluate_cached(
            teacher, build(EvalConfig, dict(steps=50, guidance=TEACHER_CFG, **base)), job_dir / "teacher-100nfe-eval"
        )
    picked = summary.get("exported_student_steps", cfg.train.student_steps)
    sel = summary.get("selection", "last")
    rows[f"CDM student, step {picked} of {cfg.train.student_steps} ({sel.replace('_', ' ')}, {k} NFE)"] = json.loads(
        (job_dir / "eval" / "eval.json").read_text()
    )
    return rows


def comparison_table(rows: dict[str, dict], caption: str):
    """A rich table: one column per evaluated model, both judges and the pixel panel as rows."""
    from rich.table import Table

    from workflows.pixel_reference import pixel_reference

    ref = pixel_reference()
    t = Table(title="few-step student vs the teacher", caption=caption)
    t.add_column("metric")
    for name in rows:
        t.add_column(name)
    for key, label in PANEL_ROWS:
        t.add_row(
            label.format(near_white=ref.near_white, edge_energy=ref.edge_energy),
            *[f"{r[key]['mean']:.4f}" if key in r else "–" for r in rows.values()],
        )
    return t


def print_run_summary(cfg: DistillConfig, summary: dict) -> None:
    from workflows.progress import console

    job_dir = Path(summary["checkpoint"]).parent
    rows = comparison_rows(cfg, summary)
    console.print(
        comparison_table(
            rows,
            f"N={cfg.eval.n_samples}, test seeds {cfg.eval.seeds}; "
            f"selection on validation seed {cfg.eval.val_seed} only",
        )
    )
    names = list(rows)
    passed, lines = quality_gate(rows[names[-1]], rows[names[0]])
    console.print(
        f"quality gate against the teacher's {cfg.cdm.sampler_steps}-step Euler: {'passed' if passed else 'NOT passed'}"
    )
    for ln in lines:
        console.print(f"  {ln}")
    console.print(f"student (diffusers folder): {summary['student_folder']}")
    console.print(
        f"registered: {summary['model']} version {summary['version']} (MLflow {summary['tracking_uri']}, "
        f"run {summary['run_id']})"
    )
    console.print(
        f"checkpoints: {job_dir}   grids: {job_dir / 'eval' / 'grid.png'}, "
        f"{job_dir / 'teacher-4steps-eval' / 'grid.png'}"
    )


# The quality gate of a student against the teacher's own few-step Euler (same steps, same evaluation set):
# both judges' FD must be lower, and the pixel panel within its band of the real split's value.
GATE_LOWER = ("fd", "fd2")
GATE_BANDS = {"near_white": (0.5, 2.0), "edge_energy": (0.8, 1.25)}  # x the real split's value


def quality_gate(student: dict, teacher: dict, lower=GATE_LOWER, bands=None) -> tuple[bool, list[str]]:
    """(passed, one line per check) for evaluation results (``evaluate_folder`` dicts with ``{k: {"mean"}}``)."""
    from workflows.pixel_reference import pixel_reference

    ref = pixel_reference().to_dict()
    lines, ok = [], True
    for k in lower:
        s, t = student[k]["mean"], teacher[k]["mean"]
        ok &= s < t
        lines.append(f"{'pass' if s < t else 'FAIL'}  {k} {s:.4f} < teacher {t:.4f}")
    for k, (lo, hi) in (GATE_BANDS if bands is None else bands).items():
        r = student[k]["mean"] / ref[k]
        inside = lo <= r <= hi
        ok &= inside
        lines.append(f"{'pass' if inside else 'FAIL'}  {k} {r:.2f}x real (band {lo:g}-{hi:g}x)")
    return bool(ok), lines
