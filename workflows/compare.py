"""The student against its teacher on the same evaluation set: the rows and the quality gate of ``cdm pipeline``.

Rows: the teacher at the student's step count and levels (4 Euler steps at ``cdm.shift``, 4 NFE; the gate's row),
its own 4-step Euler when its scheduler's shift differs, the built-in teacher at 100 NFE (50 steps
x CFG, the paper's reference; cached after its first run) and the exported student; both judges and the
pixel panel. Selection happened on validation seed ``eval.val_seed`` only; these are the test seeds.
"""

from __future__ import annotations

import json
from pathlib import Path

from workflows.config import EvalConfig, build
from workflows.distill_config import DistillConfig, GateSection

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
    from workflows.model_folder import dynamic_shifting, read_meta

    job_dir = Path(summary["checkpoint"]).parent
    k = cfg.cdm.sampler_steps
    base = dict(n_samples=cfg.eval.n_samples, seeds=cfg.eval.seeds, reference_steps=0)
    teacher = teacher_path(cfg)
    # the gate's row (the first): the teacher's k Euler steps at the levels the student samples at (cdm.shift); where
    # those differ from the teacher's own scheduler, its own k steps follow (the weaker of the two on the built-in
    # teacher: ablation.md, "The teacher's 4-step Euler at other time shifts"). A scheduler that shifts by the image
    # size (LongCat) has no one shift of its own: its static field is not what it samples at, so no second row.
    own, dyn = read_meta(teacher).shift, dynamic_shifting(teacher)
    rows = {}
    for shift in dict.fromkeys([cfg.cdm.shift] if dyn else [cfg.cdm.shift, own]):
        mine = shift == own and not dyn  # shift None = the folder's own, which keeps the cache of the earlier row
        where = f"at its own shift {own:g}" if mine and shift != cfg.cdm.shift else f"at shift {shift:g}"
        rows[f"teacher, {k} Euler steps {where} ({k} NFE)"] = evaluate_cached(
            teacher,
            build(EvalConfig, dict(steps=k, shift=None if mine else shift, **base)),
            job_dir / ("teacher-4steps-eval" if mine else f"teacher-4steps-shift{shift:g}-eval"),
        )
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


def quality_gate(student: dict, teacher: dict, gate: GateSection | None = None) -> tuple[bool, list[str]]:
    """(passed, one line per check) for evaluation results (``evaluate_folder`` dicts with ``{k: {"mean"}}``)
    against the teacher's own few-step Euler on the same test set; the rule is ``gate`` (``DistillConfig.gate``)."""
    from workflows.pixel_reference import pixel_reference

    gate = gate or GateSection()
    ref = pixel_reference().to_dict()
    lines, ok = [], True
    for k in gate.lower:
        if k not in student or k not in teacher:
            raise ValueError(f"gate.lower: {k} was not evaluated (set eval.reference_steps for mse_to_teacher100)")
        s, t = student[k]["mean"], teacher[k]["mean"] * gate.factor
        ok &= s < t
        bound = f"teacher {t:.4f}" if gate.factor == 1 else f"{gate.factor:g} x teacher = {t:.4f}"
        lines.append(f"{'pass' if s < t else 'FAIL'}  {k} {s:.4f} < {bound}")
    for k, (lo, hi) in gate.bands.items():
        r = student[k]["mean"] / ref[k]
        inside = lo <= r <= hi
        ok &= inside
        lines.append(f"{'pass' if inside else 'FAIL'}  {k} {r:.2f}x real (band {lo:g}-{hi:g}x)")
    return bool(ok), lines
