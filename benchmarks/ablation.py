"""The ablation table: the reference loop (cdm_core + torch, no Ray) distilling the built-in teacher
into a 4-step student, one row per variant, on the same budget of student steps and seeds.

    python benchmarks/ablation.py teacher --n-samples 1000               # teacher-100(+cfg), teacher-4
    python benchmarks/ablation.py train --row cdm --student-steps 600     # one distilled row (resumable)
    python benchmarks/ablation.py summarize                               # ablation.json + ablation.md

Rows: dmd-fixed (fixed DMD2 anchors, CA+DM), dynamic-no-cdm (dynamic schedule, CA+DM), cdm (dynamic +
CA + DM + CDM), cdm-gaussian (CDM with gaussian re-noising instead of velocity extrapolation).
Every row is evaluated at 4 NFE on evaluation seeds 0,1,2 (held-out paraphrases); during training the
EMA student's FD is tracked on validation seed 100 (other noise, N=500) for the learning curves.
A train run writes a checkpoint every ``--ckpt-every`` student steps: rerun the same command to resume.
Run rows as parallel single-thread processes (OMP_NUM_THREADS=1).
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from cdm_core.models.sd3 import SD3Velocity  # noqa: E402
from cdm_core.reference_loop import LoopConfig, build_distiller, run_loop  # noqa: E402
from cdm_core.step import CDMConfig  # noqa: E402
from workflows.config import DEFAULT_EVALUATOR, DEFAULT_TEACHER, EvalConfig, build  # noqa: E402
from workflows.embeddings import empty_prompt, encode_prompts  # noqa: E402
from workflows.evaluation import METRICS, evaluate_folder  # noqa: E402
from workflows.model_folder import ModelMeta, load_transformer, read_meta, save_model_folder  # noqa: E402
from workflows.prompts import train_prompts  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
ROWS = {
    "dmd-fixed": dict(schedule="fixed", use_cdm=False),
    "dynamic-no-cdm": dict(schedule="dynamic", use_cdm=False),
    "cdm": dict(schedule="dynamic"),
    "cdm-gaussian": dict(schedule="dynamic", off_trajectory="gaussian"),
}
ORDER = ["teacher-100", "teacher-100nfe-cfg", "teacher-4", "dmd-fixed", "dynamic-no-cdm", "cdm", "cdm-gaussian"]


def machine() -> str:
    import os

    return f"{platform.machine()} CPU, {os.cpu_count()} cores, 1 torch thread per row, torch {torch.__version__}"


def _eval(folder, steps, guidance, n, seeds, out, model=None) -> dict:
    cfg = build(EvalConfig, dict(steps=steps, guidance=guidance, n_samples=n, seeds=seeds, batch_size=250,
                                 reference_steps=100))
    return evaluate_folder(folder, cfg, out, DEFAULT_TEACHER, DEFAULT_EVALUATOR, model=model)


def _row(name, res, **extra) -> dict:
    return {"name": name, "nfe": res["nfe"], **{k: res[k] for k in METRICS if k in res},
            "s_per_image": res["s_per_image"], **extra}


def cmd_teacher(a) -> None:
    out = Path(a.out)
    seeds = [int(s) for s in a.seeds.split(",")]
    teacher_cfg = json.loads((RESULTS / "teacher.json").read_text())["cfg_selection"]["best_cfg"]
    specs = [("teacher-100", 100, 1.0), ("teacher-100nfe-cfg", 50, teacher_cfg), ("teacher-4", 4, 1.0)]
    for name, steps, g in specs:
        path = out / "rows" / f"{name}.json"
        if path.exists():
            continue
        t0 = time.time()
        res = _eval(DEFAULT_TEACHER, steps, g, a.n_samples, seeds, out / "grids" / name)
        row = _row(name, res, steps=steps, cfg=g, wall_s=round(time.time() - t0, 1), student_steps=0,
                   s_per_student_step=None)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(row, indent=2) + "\n")
        print(json.dumps(row), flush=True)


def cmd_train(a) -> None:
    name = a.name or a.row
    out = Path(a.out)
    run_dir = out / "runs" / name
    run_dir.mkdir(parents=True, exist_ok=True)
    cdm = CDMConfig(n_max=a.n_max, alpha=a.alpha, seed=a.seed, w_cdm=a.w_cdm, **ROWS[a.row])
    loop = LoopConfig(batch_size=a.batch_size, student_steps=a.student_steps, lr_student=a.lr,
                      lr_fake=a.lr * a.fake_lr_ratio, warmup_steps=a.warmup)
    teacher = load_transformer(DEFAULT_TEACHER)
    meta = read_meta(DEFAULT_TEACHER)
    shape = (meta.channels, meta.image_size, meta.image_size)
    prompts = encode_prompts([p for p, _ in train_prompts()])
    d = build_distiller(teacher, cdm, loop, SD3Velocity)
    ckpt = run_dir / "checkpoint.pt"
    state = {"iteration": 0, "train_s": 0.0, "curve": [], "log": [], "best": None}
    if ckpt.exists():
        s = torch.load(ckpt, weights_only=False)
        d.student.load_state_dict(s["student"])
        d.fake.load_state_dict(s["fake"])
        d.ema.load_state_dict(s["ema"])
        d.step.student_steps = s["student_steps"]
        state = s["state"]
        state.setdefault("best", None)
        print(f"{name}: resuming at iteration {state['iteration']}", flush=True)

    def save() -> None:
        tmp = ckpt.with_suffix(".tmp")
        torch.save({"student": d.student.state_dict(), "fake": d.fake.state_dict(), "ema": d.ema.state_dict(),
                    "student_steps": d.step.student_steps, "state": state}, tmp)
        tmp.replace(ckpt)

    def val_fd() -> float:
        cfg = build(EvalConfig, dict(steps=4, n_samples=500, seeds=[100], batch_size=250, reference_steps=0))
        r = evaluate_folder(DEFAULT_TEACHER, cfg, None, DEFAULT_TEACHER, DEFAULT_EVALUATOR, model=d.ema.shadow)
        return r["fd"]["mean"]

    def track(s: int) -> float:
        """Validation FD of the EMA now; with --keep-best, remember the EMA weights of the best one so far."""
        fd = val_fd()
        state["curve"].append({"student_steps": s, "val_fd": fd})
        if a.keep_best and s > 0 and (state["best"] is None or fd < state["best"]["val_fd"]):
            state["best"] = {"student_steps": s, "val_fd": fd,
                             "ema": {k: v.detach().clone() for k, v in d.ema.shadow.state_dict().items()}}
        return fd

    if state["iteration"] == 0 and not state["curve"]:
        track(0)
    acc: dict[str, float] = {}
    t_last = time.time()

    def callback(res, secs) -> bool:
        state["train_s"] += secs
        state["iteration"] = res.iteration + 1
        for k, v in res.metrics.items():
            acc[k] = acc.get(k, 0.0) + v
        acc["_n"] = acc.get("_n", 0) + 1
        s = d.step.student_steps
        if res.student_updated and s % a.log_every == 0:
            n = acc.pop("_n")
            entry = {"student_steps": s, **{k: v / n for k, v in acc.items()}}
            state["log"].append(entry)
            acc.clear()
            print(f"{name} step {s}/{a.student_steps} " + " ".join(
                f"{k}={entry[k]:.4g}" for k in ("loss/ca", "loss/dm", "loss/cdm", "loss/fake", "norm/dm",
                                                "grad_norm/student", "schedule/n") if k in entry)
                  + f" {state['train_s'] / max(1, s):.2f}s/step", flush=True)
        if res.student_updated and (s % a.val_every == 0 or s == a.student_steps):
            track(s)
            print(f"{name} step {s}: val FD (N=500, seed 100) {state['curve'][-1]['val_fd']:.3f}", flush=True)
        if res.student_updated and (s % a.ckpt_every == 0 or s == a.student_steps):
            save()
        return False

    run_loop(d, prompts, empty_prompt(), shape, state["iteration"], callback)
    save()
    chosen = d.step.student_steps
    if a.keep_best and state["best"] is not None:
        d.ema.shadow.load_state_dict(state["best"]["ema"])
        chosen = state["best"]["student_steps"]
        print(f"{name}: exporting the EMA of step {chosen} (best validation FD "
              f"{state['best']['val_fd']:.3f})", flush=True)
    folder = save_model_folder(d.ema.shadow, run_dir / "model", ModelMeta(
        shift=meta.shift, default_steps=4, provenance={"distilled_from": str(DEFAULT_TEACHER), "row": name,
                                                       "cdm": cdm.to_dict(), "loop": loop.__dict__}))
    seeds = [int(s) for s in a.seeds.split(",")]
    res = _eval(folder, 4, 1.0, a.n_samples, seeds, out / "grids" / name)
    row = _row(name, res, student_steps=d.step.student_steps, wall_s=round(state["train_s"], 1),
               s_per_student_step=state["train_s"] / max(1, d.step.student_steps), cdm=cdm.to_dict(),
               loop=loop.__dict__, val_curve=state["curve"], exported_student_steps=chosen,
               selection="best validation FD (seed 100)" if a.keep_best else "last EMA")
    (out / "rows").mkdir(parents=True, exist_ok=True)
    (out / "rows" / f"{name}.json").write_text(json.dumps(row, indent=2) + "\n")
    (run_dir / "train_log.json").write_text(json.dumps(state["log"]) + "\n")
    print(json.dumps({k: v for k, v in row.items() if k != "val_curve"}), flush=True)


def cmd_summarize(a) -> None:
    out = Path(a.out)
    rows = []
    for name in ORDER + sorted(p.stem for p in (out / "rows").glob("*.json") if p.stem not in ORDER):
        p = out / "rows" / f"{name}.json"
        if p.exists():
            rows.append(json.loads(p.read_text()))
    if not rows:
        raise SystemExit(f"no rows under {out / 'rows'}")
    steps = max((r.get("student_steps") or 0) for r in rows)
    res = {"machine": machine(), "command": a.command, "n_samples": a.n_samples, "student_steps": steps,
           "rows": [{k: v for k, v in r.items() if k not in ("val_curve",)} for r in rows]}
    (out / "ablation.json").write_text(json.dumps(res, indent=2) + "\n")
    f = lambda r, k, d=3: f"{r[k]['mean']:.{d}f} ± {r[k]['std']:.{d}f}" if k in r else "–"  # noqa: E731
    lines = ["# Ablation: 4-step students distilled from the built-in teacher", "",
             f"Machine: {res['machine']}. N = {a.n_samples} samples per evaluation seed, seeds 0,1,2 "
             "(mean ± std over seeds); FD is not comparable with tables at another N.", "",
             f"Command: `{a.command}`", "",
             "| row | NFE | student steps (exported) | FD ↓ | adherence ↑ | precision ↑ | recall ↑ | hf gap ↓ | MSE to teacher-100 ↓ | train s/step |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sps = f"{r['s_per_student_step']:.2f}" if r.get("s_per_student_step") else "–"
        ex = f" ({r['exported_student_steps']})" if r.get("exported_student_steps") is not None else ""
        lines.append(f"| {r['name']} | {r['nfe']} | {r.get('student_steps') or 0}{ex} | {f(r, 'fd', 2)} | "
                     f"{f(r, 'adherence')} | {f(r, 'precision')} | {f(r, 'recall')} | {f(r, 'hf_gap', 4)} | "
                     f"{f(r, 'mse_to_teacher100', 4)} | {sps} |")
    curves = [r for r in rows if r.get("val_curve")]
    if curves:
        pts = [c["student_steps"] for c in curves[0]["val_curve"]]
        if len(pts) > 13:  # keep the table readable: every 50 steps (the JSON rows keep every point)
            pts = [p for p in pts if p % 50 == 0 or p == pts[-1]]
        lines += ["", "Validation FD of the EMA student during training (validation seed 100, N = 500, 4 NFE; "
                  "not the evaluation seeds)" + ("; each row exports the EMA of its best point here:"
                  if all(str(r.get("selection", "")).startswith("best") for r in curves) else ":"), "",
                  "| row | " + " | ".join(str(p) for p in pts) + " |", "|---|" + "---|" * len(pts)]
        for r in curves:
            vals = {c["student_steps"]: c["val_fd"] for c in r["val_curve"]}
            lines.append(f"| {r['name']} | " + " | ".join(f"{vals[p]:.2f}" if p in vals else "–" for p in pts) + " |")
    (out / "ablation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("teacher", "train", "summarize"):
        p = sub.add_parser(name)
        p.add_argument("--out", default=str(RESULTS / "ablation_work"))
        p.add_argument("--n-samples", type=int, default=1000)
        p.add_argument("--seeds", default="0,1,2")
    t = sub.choices["train"]
    t.add_argument("--row", required=True, choices=sorted(ROWS))
    t.add_argument("--name", help="name of an extra row that runs --row's recipe with other hyperparameters "
                   "(e.g. cdm-nmax4 with --n-max 4)")
    t.add_argument("--student-steps", type=int, default=600)
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--n-max", type=int, default=8)
    t.add_argument("--alpha", type=float, default=0.945)
    t.add_argument("--lr", type=float, default=2e-5)
    t.add_argument("--fake-lr-ratio", type=float, default=2.0)
    t.add_argument("--warmup", type=int, default=50)
    t.add_argument("--w-cdm", type=float, default=1.0, help="weight of the CDM loss term (spec: 1)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--log-every", type=int, default=25)
    t.add_argument("--val-every", type=int, default=25)
    t.add_argument("--ckpt-every", type=int, default=50)
    t.add_argument("--keep-best", action=argparse.BooleanOptionalAction, default=True,
                   help="export the EMA with the best validation FD (the spec's advice), not the last one")
    sub.choices["summarize"].add_argument("--command", default="see benchmarks/ablation.py docstring")
    a = ap.parse_args()
    torch.set_num_threads(1)
    {"teacher": cmd_teacher, "train": cmd_train, "summarize": cmd_summarize}[a.cmd](a)


if __name__ == "__main__":
    main()
