"""What ``cdm pipeline`` shows at the end: one table (the 100-NFE teacher, the few-step teacher, the student; both
judges, the pixel panel, wall times), the gate's verdict, a PNG grid of the same prompts and noise through the
three, the lineage of the registered version, the service URL."""

from __future__ import annotations

import json
from pathlib import Path

from workflows.distill_config import DistillConfig
from workflows.progress import console

GRID_PER_ROW = 10  # one prompt per class of the built-in data (held-out wordings)


def lineage_of(c, name: str, version: str) -> dict:
    """Model version -> source run -> checkpoint folder -> teacher content hash -> config hash (run tags)."""
    mv = c.get_model_version(name, version)
    tags = c.get_run(mv.run_id).data.tags
    return {
        "model": name,
        "version": str(mv.version),
        "run_id": mv.run_id,
        "job_key": tags.get("cdm.job_key"),
        "checkpoint": tags.get("cdm.checkpoint_path"),
        "exported_step": (mv.tags or {}).get("cdm.export.student_steps"),
        "teacher_hash": tags.get("cdm.teacher_hash"),
        "config_hash": tags.get("cdm.config_hash"),
        "code_version": tags.get("cdm.code_version"),
        "gate": (mv.tags or {}).get("cdm.gate"),
    }


def comparison_grid(cfg: DistillConfig, summary: dict, path: Path) -> Path:
    """Rows: teacher at 100 NFE, teacher at the student's steps and levels (the gate's row), student; the same
    prompts and noise in each."""
    import torch

    from workflows.compare import TEACHER_CFG
    from workflows.distill import teacher_path
    from workflows.images import save_grid
    from workflows.prompts import heldout_prompts
    from workflows.sampler import sample_prompts

    by_label: dict[int, str] = {}
    for text, label in heldout_prompts():
        by_label.setdefault(label, text)
    prompts = [by_label[k] for k in sorted(by_label)][:GRID_PER_ROW]
    teacher, k = teacher_path(cfg), cfg.cdm.sampler_steps
    builtin = cfg.teacher == "builtin"
    rows = [
        sample_prompts(teacher, prompts, 1, 50 if builtin else 100, TEACHER_CFG if builtin else 1.0, seed=0),
        sample_prompts(teacher, prompts, 1, k, 1.0, seed=0, shift=cfg.cdm.shift),
        sample_prompts(summary["student_folder"], prompts, 1, k, 1.0, seed=0),
    ]
    save_grid(torch.cat(rows), path, nrow=len(prompts))
    return path


def _table_md(rows: dict[str, dict]) -> list[str]:
    from workflows.compare import PANEL_ROWS

    names = list(rows)
    out = ["| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for key, label in PANEL_ROWS:
        label = label.split(" (real")[0]
        cells = [f"{r[key]['mean']:.4f}" if key in r else "–" for r in rows.values()]
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return out


def write_summary(folder: Path, out: dict) -> dict:
    """``summary.json`` and ``summary.md`` in the pipeline folder; returns ``out``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.json").write_text(json.dumps(out, indent=2, default=str) + "\n")
    gate = out["gate"]
    md = [
        f"# cdm pipeline: {out['model']} version {out['version']}",
        "",
        *_table_md(out["rows"]),
        "",
        f"Quality gate against the few-step teacher: **{'passed' if gate['passed'] else 'NOT passed'}**",
        "",
        *[f"- {ln}" for ln in gate["lines"]],
        "",
        "| stage | wall s | |",
        "|---|---|---|",
        *[
            f"| {k} | {v.get('wall_s') if v.get('wall_s') is not None else '–'} | "
            f"{'skipped (done earlier)' if v.get('skipped') else ''} |"
            for k, v in out["times"].items()
            if isinstance(v, dict)
        ],
        "",
        f"Lineage: {json.dumps(out.get('lineage'))}",
    ]
    if out.get("sweep"):
        sw = out["sweep"]
        md.append(
            f"Recipe from sweep {sw['sweep_key']} (MLflow parent run {sw['parent_run_id']}, {sw['trials']} trials, "
            f"best {sw['metric']} {sw['best_val']:.4g} on the validation seed): {json.dumps(sw['recipe'])}"
        )
    if out.get("smoke"):
        md.append(f"Smoke request: {out['smoke']['url']} -> version {out['smoke']['served_version']}")
    if out.get("grid"):
        md.append(f"Grid (rows: teacher 100 NFE, teacher few-step, student): {out['grid']}")
    (folder / "summary.md").write_text("\n".join(md) + "\n")
    return out


def report(out: dict) -> None:
    """The console summary: the comparison table with wall times, the verdict, where everything is."""
    from workflows.compare import comparison_table

    t = comparison_table(out["rows"], "test seeds; the student was selected on the validation seed only")
    console.print(t)
    gate = out["gate"]
    console.print(f"quality gate: {'passed' if gate['passed'] else 'NOT passed'}")
    for ln in gate["lines"]:
        console.print(f"  {ln}")
    times = ", ".join(
        f"{k} " + ("skipped" if v.get("skipped") else f"{v.get('wall_s')} s")
        for k, v in out["times"].items()
        if isinstance(v, dict)
    )
    console.print(f"wall times: {times}; total {out['times'].get('total_s')} s")
    console.print(
        f"registered: {out['model']} version {out['version']} (MLflow run {out['run_id']}, {out['tracking_uri']})"
    )
    console.print(f"student (diffusers folder): {out['student_folder']}")
    if out.get("sweep"):
        sw = out["sweep"]
        console.print(f"recipe from sweep {sw['sweep_key']} ({sw['trials']} trials): {json.dumps(sw['recipe'])}")
    if out.get("smoke"):
        s = out["smoke"]
        state = "still serving" if s.get("kept_serving") else "stopped"
        console.print(f"service: {s['url']} answered version {s['served_version']} ({state})")
    if out.get("grid"):
        console.print(f"comparison grid (teacher 100 NFE / teacher few-step / student): {out['grid']}")
    console.print(f"summary: {Path(out['job_dir']) / 'pipeline' / 'summary.md'}")
    if gate["passed"] and out.get("serve_hint"):
        console.print(f"serve it: {out['serve_hint']}")
