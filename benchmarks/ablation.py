"""The ablation table: the reference loop (cdm_core + torch, no Ray) distilling the built-in teacher
into a 4-step student, one row per variant, on the same budget of student steps and seeds.

    python benchmarks/ablation.py teacher --n-samples 1000               # teacher-100(+cfg), teacher-4 (shift 3, 1)
    python benchmarks/ablation.py train --row cdm --student-steps 600     # one distilled row (resumable)
    python benchmarks/ablation.py reselect --select-by worst_judge        # re-pick exports from the curves
    python benchmarks/ablation.py reselect --select-by last               # the end-of-training EMA on the test seeds
    python benchmarks/ablation.py summarize [--rows rows-worst_judge]    # ablation.json + ablation.md

Rows: dmd-fixed (fixed DMD2 anchors, CA+DM), dynamic-no-cdm (dynamic schedule, CA+DM), cdm (dynamic +
CA + DM + CDM), fixed-cdm (fixed anchors + CDM),
cdm-gaussian (CDM with gaussian re-noising instead of velocity extrapolation; since the quality
issue it re-noises the rollout's final sample, the authors' default, where the tables in ablation_teacher_v*/
re-noised the anchor's x0_hat_i: ``--cdm gaussian_base=anchor`` gives the old row).
A training seed other than 0 is a row of its own named ``<row>@s<seed>``; ``summarize`` reports mean ± std over
a row's training seeds.
Every row is evaluated at 4 NFE on evaluation seeds 0,1,2 (held-out paraphrases); during training the
EMA student's FD is tracked on validation seed 100 (other noise, N=500) for the learning curves.
A train run writes a checkpoint every ``--ckpt-every`` student steps: rerun the same command to resume.
Run rows as parallel single-thread processes (OMP_NUM_THREADS=1).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from cdm_core.distiller import build_distiller  # noqa: E402
from cdm_core.optim import OptimConfig  # noqa: E402
from cdm_core.reference_loop import LoopConfig, run_loop  # noqa: E402
from cdm_core.step import CDMConfig  # noqa: E402
from workflows.config import DEFAULT_EVALUATOR, DEFAULT_TEACHER, EvalConfig, build  # noqa: E402
from workflows.embeddings import empty_prompt, encode_prompts  # noqa: E402
from workflows.evaluation import METRICS, evaluate_folder  # noqa: E402
from workflows.model_folder import ModelMeta, load_model, save_model_folder  # noqa: E402
from workflows.prompts import train_prompts  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
ROWS = {
    "dmd-fixed": dict(schedule="fixed", use_cdm=False),
    "dynamic-no-cdm": dict(schedule="dynamic", use_cdm=False),
    "cdm": dict(schedule="dynamic"),
    "cdm-gaussian": dict(schedule="dynamic", off_trajectory="gaussian"),
    "fixed-cdm": dict(schedule="fixed"),
}
ORDER = [
    "teacher-100",
    "teacher-100nfe-cfg",
    "teacher-4",
    "teacher-4-shift1",
    "dmd-fixed",
    "dynamic-no-cdm",
    "cdm",
    "cdm-gaussian",
]


def machine() -> str:
    import os

    return f"{platform.machine()} CPU, {os.cpu_count()} cores, 1 torch thread per row, torch {torch.__version__}"


def _eval(folder, steps, guidance, n, seeds, out, model=None, reference_steps=100, shift=None) -> dict:
    """Score ``folder`` (or ``model`` with that folder's meta); ``shift`` None = the folder's own scheduler shift
    (a student sampled at its ``cdm.shift`` passes it: the teacher folder's meta says 3)."""
    cfg = build(
        EvalConfig,
        dict(
            steps=steps,
            guidance=guidance,
            shift=shift,
            n_samples=n,
            seeds=seeds,
            batch_size=250,
            reference_steps=reference_steps,
        ),
    )
    return evaluate_folder(folder, cfg, out, DEFAULT_TEACHER, DEFAULT_EVALUATOR, model=model)


def _row(name, res, **extra) -> dict:
    return {
        "name": name,
        "nfe": res["nfe"],
        **{k: res[k] for k in METRICS if k in res},
        "s_per_image": res["s_per_image"],
        **extra,
    }


SELECTION = {
    "worst_judge": "best validation worst-judge score (the more sceptical judge's FD relative to the 4-step "
    "teacher's + pixel panel, cdm_core.metrics.worst_judge_score; seed 100, N=500)",
    "selection_score": "best validation selection score (both judges' log FD summed + pixel panel, seed 100, N=500)",
    "last": "the last validated EMA (a fixed step, the end of training: no selection)",
}


def _score(point: dict, base: dict, rule: str) -> float:
    """The selection rule on one validation point; ``base`` is step 0 (the student is the teacher there)."""
    from cdm_core.metrics import worst_judge_score
    from workflows.pixel_reference import pixel_reference

    if rule == "selection_score":
        return point.get("val_selection_score", point["val_fd"])
    if rule == "last":  # the latest point always scores lowest
        return -float(point["student_steps"])
    panel = {"near_white": point["val_near_white"], "edge_energy": point["val_edge_energy"]}
    fd, fd2 = point["val_fd"], point["val_fd2"]
    return worst_judge_score(fd, fd2, panel, pixel_reference(), base["val_fd"], base["val_fd2"])


def _overrides(cls, items: list[str]) -> dict:
    """``key=value`` pairs typed by the dataclass field's default (``--cdm norm_floor=0.01``)."""
    import dataclasses

    fields = {f.name: f for f in dataclasses.fields(cls)}
    out = {}
    for item in items or []:
        k, _, v = item.partition("=")
        if k not in fields:
            raise SystemExit(f"--cdm {item}: unknown field {k!r} (fields: {', '.join(sorted(fields))})")
        d = fields[k].default
        out[k] = (
            (v.lower() in ("1", "true", "yes"))
            if isinstance(d, bool)
            else (None if v.lower() == "none" else type(d)(v) if d is not None else float(v))
        )
    return out


def cmd_teacher(a) -> None:
    out = Path(a.out)
    seeds = [int(s) for s in a.seeds.split(",")]
    teacher_cfg = json.loads((RESULTS / "teacher.json").read_text())["cfg_selection"]["best_cfg"]
    # (name, steps, guidance, shift): None = the teacher's own scheduler shift (3); teacher-4-shift1 is its 4-step
    # Euler at the levels [1, .75, .5, .25] a cdm.shift=1 student samples at (its best 4-step Euler on validation)
    specs = [
        ("teacher-100", 100, 1.0, None),
        ("teacher-100nfe-cfg", 50, teacher_cfg, None),
        ("teacher-4", 4, 1.0, None),
        ("teacher-4-shift1", 4, 1.0, 1.0),
    ]
    wanted = set(a.names.split(",")) if a.names else {n for n, *_ in specs}
    for name, steps, g, shift in specs:
        path = out / "rows" / f"{name}.json"
        if path.exists() or name not in wanted:
            continue
        t0 = time.time()
        res = _eval(DEFAULT_TEACHER, steps, g, a.n_samples, seeds, out / "grids" / name, shift=shift)
        row = _row(
            name,
            res,
            steps=steps,
            cfg=g,
            shift=res["shift"],
            wall_s=round(time.time() - t0, 1),
            student_steps=0,
            s_per_student_step=None,
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(row, indent=2) + "\n")
        print(json.dumps(row), flush=True)


def cmd_train(a) -> None:
    name = a.name or a.row
    if a.seed != 0 and SEED_SUFFIX not in name:  # two seeds of one name would share (and overwrite) one run folder
        name = f"{name}{SEED_SUFFIX}{a.seed}"
    out = Path(a.out)
    run_dir = out / "runs" / name
    run_dir.mkdir(parents=True, exist_ok=True)
    cdm = CDMConfig(
        **{
            **dict(n_max=a.n_max, alpha=a.alpha, seed=a.seed, w_cdm=a.w_cdm),
            **ROWS[a.row],
            **_overrides(CDMConfig, a.cdm),
        }
    )
    loop = LoopConfig(
        a.batch_size,
        a.student_steps,
        OptimConfig(
            lr_student=a.lr,
            fake_lr_ratio=a.fake_lr_ratio,
            warmup_steps=a.warmup,
            lr_decay=a.lr_decay,
            min_lr_ratio=a.min_lr_ratio,
            beta1=a.beta1,
            ema_decay=a.ema_decay,
        ),
    )
    teacher = load_model(DEFAULT_TEACHER)
    shape = teacher.shape
    prompts = encode_prompts([p for p, _ in train_prompts()])
    d = build_distiller(teacher.module, cdm, loop.optim, loop.student_steps, teacher.family.velocity)
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
        torch.save(
            {
                "student": d.student.state_dict(),
                "fake": d.fake.state_dict(),
                "ema": d.ema.state_dict(),
                "student_steps": d.step.student_steps,
                "state": state,
            },
            tmp,
        )
        tmp.replace(ckpt)

    def val_fd() -> dict:
        # sampled at the student's own levels (cdm.shift), as the workflows' validation and export do
        cfg = build(
            EvalConfig,
            dict(steps=4, shift=cdm.shift, n_samples=500, seeds=[100], batch_size=250, reference_steps=0),
        )
        r = evaluate_folder(DEFAULT_TEACHER, cfg, None, DEFAULT_TEACHER, DEFAULT_EVALUATOR, model=d.ema.shadow)
        return {k: r[k]["mean"] for k in r if isinstance(r[k], dict) and "mean" in r[k]}

    def track(s: int) -> float:
        """Validation FD of the EMA now; with --keep-best, remember the EMA weights of the best one so far."""
        v = val_fd()
        fd = v["fd"]
        state["curve"].append({"student_steps": s, "val_fd": fd, **{f"val_{k}": x for k, x in v.items()}})
        if a.snapshots:  # every validated EMA, so other judges can score the whole curve afterwards
            snap = run_dir / "snapshots" / f"ema_{s:06d}.pt"
            snap.parent.mkdir(exist_ok=True)
            torch.save(d.ema.shadow.state_dict(), snap)
        (run_dir / "curve.json").write_text(
            json.dumps({"cdm": cdm.to_dict(), "loop": dataclasses.asdict(loop), "curve": state["curve"]}, indent=1)
            + "\n"
        )
        sel = _score(state["curve"][-1], state["curve"][0], a.select_by)
        if a.keep_best and s > 0 and (state["best"] is None or sel < state["best"].get("score", float("inf"))):
            state["best"] = {
                "student_steps": s,
                "val_fd": fd,
                "score": sel,
                "ema": {k: v.detach().clone() for k, v in d.ema.shadow.state_dict().items()},
            }
        return fd

    if state["iteration"] == 0 and not state["curve"]:
        track(0)
    acc: dict[str, float] = {}

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
            print(
                f"{name} step {s}/{a.student_steps} "
                + " ".join(
                    f"{k}={entry[k]:.4g}"
                    for k in (
                        "loss/ca",
                        "loss/dm",
                        "loss/cdm",
                        "loss/fake",
                        "norm/dm",
                        "grad_norm/student",
                        "schedule/n",
                    )
                    if k in entry
                )
                + f" {state['train_s'] / max(1, s):.2f}s/step",
                flush=True,
            )
        if res.student_updated and (s % a.val_every == 0 or s == a.student_steps):
            track(s)
            print(f"{name} step {s}: val FD (N=500, seed 100) {state['curve'][-1]['val_fd']:.3f}", flush=True)
        if res.student_updated and (s % a.ckpt_every == 0 or s == a.student_steps):
            save()
        return False

    run_loop(d, loop, prompts, empty_prompt(), shape, state["iteration"], callback)
    save()
    if a.no_final_eval:
        return
    chosen = d.step.student_steps
    if a.keep_best and state["best"] is not None:
        d.ema.shadow.load_state_dict(state["best"]["ema"])
        chosen = state["best"]["student_steps"]
        print(
            f"{name}: exporting the EMA of step {chosen} (best validation {a.select_by} "
            f"{state['best'].get('score', state['best']['val_fd']):.3f})",
            flush=True,
        )
    folder = save_model_folder(
        d.ema.shadow,
        run_dir / "model",
        ModelMeta(
            shift=cdm.shift,  # the student's own sampler levels (the teacher folder's meta says 3)
            default_steps=4,
            provenance={
                "distilled_from": str(DEFAULT_TEACHER),
                "row": name,
                "cdm": cdm.to_dict(),
                "loop": dataclasses.asdict(loop),
            },
        ),
    )
    seeds = [int(s) for s in a.seeds.split(",")]
    res = _eval(folder, 4, 1.0, a.n_samples, seeds, out / "grids" / name, reference_steps=a.reference_steps)
    row = _row(
        name,
        res,
        student_steps=d.step.student_steps,
        wall_s=round(state["train_s"], 1),
        s_per_student_step=state["train_s"] / max(1, d.step.student_steps),
        cdm=cdm.to_dict(),
        loop=dataclasses.asdict(loop),
        val_curve=state["curve"],
        exported_student_steps=chosen,
        selection=SELECTION[a.select_by] if a.keep_best else "last EMA",
        fixed_steps={
            str(c["student_steps"]): {k: c.get(f"val_{k}") for k in ("fd", "fd2", "near_white", "edge_energy")}
            for c in state["curve"]
            if c["student_steps"] in (100, 500, 1000)
        },
    )
    (out / "rows").mkdir(parents=True, exist_ok=True)
    (out / "rows" / f"{name}.json").write_text(json.dumps(row, indent=2) + "\n")
    (run_dir / "train_log.json").write_text(json.dumps(state["log"]) + "\n")
    print(json.dumps({k: v for k, v in row.items() if k != "val_curve"}), flush=True)


def cmd_reselect(a) -> None:
    """Re-pick each finished run's export by ``--select-by`` on its validation curve (seed 100) and score that
    snapshot on the test seeds; rows go to ``<out>/rows-<rule>/`` (training is not rerun; needs --snapshots)."""
    out = Path(a.out)
    dest = out / f"rows-{a.select_by}"
    dest.mkdir(parents=True, exist_ok=True)
    names = a.names.split(",") if a.names else sorted(p.stem for p in (out / "rows").glob("*.json"))
    teacher = load_model(DEFAULT_TEACHER)
    seeds = [int(x) for x in a.seeds.split(",")]
    for name in names:
        src = out / "rows" / f"{name}.json"
        run_dir = out / "runs" / name
        if not src.exists() or not (run_dir / "curve.json").exists():
            print(f"{name}: no row or curve, skipped", flush=True)
            continue
        row = json.loads(src.read_text())
        curve = json.loads((run_dir / "curve.json").read_text())["curve"]
        if (dest / f"{name}.json").exists() and not a.force:
            print(f"{name}: done earlier", flush=True)
            continue
        if curve[0]["student_steps"] != 0 or "val_fd2" not in curve[0]:
            print(f"{name}: curve lacks step 0 or judge 2, skipped", flush=True)
            continue
        pick = min((c for c in curve if c["student_steps"] > 0), key=lambda c: _score(c, curve[0], a.select_by))
        step = pick["student_steps"]
        snap = run_dir / "snapshots" / f"ema_{step:06d}.pt"
        if not snap.exists():
            print(f"{name}: no snapshot of step {step}, skipped", flush=True)
            continue
        model = teacher.module
        model.load_state_dict(torch.load(snap, weights_only=True))
        shift = (row.get("cdm") or {}).get("shift")  # the levels the student was trained for
        grids = out / "grids" / f"{name}-{a.select_by}"
        res = _eval(DEFAULT_TEACHER, 4, 1.0, a.n_samples, seeds, grids, model, 0, shift=shift)
        keep = {k: v for k, v in row.items() if k not in METRICS and k not in ("s_per_image",)}
        new = {**keep, **_row(name, res), "exported_student_steps": step, "selection": SELECTION[a.select_by]}
        (dest / f"{name}.json").write_text(json.dumps(new, indent=2) + "\n")
        print(f"{name}: step {step} -> test FD {res['fd']['mean']:.3f} / {res['fd2']['mean']:.3f}", flush=True)


SEED_SUFFIX = "@s"  # a row trained with another training seed: <row>@s<seed> (e.g. cdm@s1)
TABLE = [
    ("fd", "FD j1 ↓", 2),
    ("precision", "prec j1 ↑", 3),
    ("recall", "rec j1 ↑", 3),
    ("fd2", "FD j2 ↓", 2),
    ("precision2", "prec j2 ↑", 3),
    ("recall2", "rec j2 ↑", 3),
    ("adherence", "adh ↑", 3),
    ("near_white", "near-white", 4),
    ("edge_energy", "edge energy", 4),
]


def _seed(row: dict) -> int:
    """A row's training seed (``<row>@s<seed>``); teacher rows have none and count as 0."""
    return (row.get("cdm") or {}).get("seed", 0)


def _aggregate(group: list[dict]) -> dict:
    """Rows of one recipe over training seeds: per metric mean ± std over the seeds' (test-seed-mean) values;
    a single row keeps its spread over evaluation seeds."""
    import statistics

    if len(group) == 1:
        r = dict(group[0])
        r["name"] = r["name"].split(SEED_SUFFIX)[0]
        r["train_seeds"] = [_seed(r)] if r.get("cdm") else []
        r["spread"] = "evaluation seeds"
        if "val_curve" in r:  # kept, so a later summary can add training seeds to this row (--keep)
            r["val_curves"] = {str(r["train_seeds"][0] if r["train_seeds"] else 0): r.pop("val_curve")}
        return r
    out = {k: v for k, v in group[0].items() if not (isinstance(v, dict) and "mean" in v)}
    out["name"] = group[0]["name"].split(SEED_SUFFIX)[0]
    out["train_seeds"] = [_seed(r) for r in group]
    out["spread"] = "training seeds"
    out["exported_student_steps"] = [r.get("exported_student_steps") for r in group]
    for k in METRICS:
        vals = [r[k]["mean"] for r in group if k in r]
        if len(vals) == len(group):
            out[k] = {"mean": statistics.fmean(vals), "std": statistics.pstdev(vals), "per_seed": vals}
    out["val_curves"] = {str(_seed(r)): r.get("val_curve") for r in group}
    out.pop("val_curve", None)
    return out


def _kept_rows(path: Path, groups: dict[str, list[dict]]) -> list[dict]:
    """Rows of an earlier summary (``--keep ablation.json``) whose runs are not on this machine: a row the new
    rows do not name is kept as it was; a single-seed row whose recipe has new seeds joins their group as one
    more training seed (its per-seed figures are its test-seed means; its validation curve comes back from its
    ``val_curves``, or stays missing in summaries written before single rows kept theirs). A kept multi-seed row
    cannot take new seeds: its per-seed rows are gone, so that is an error rather than a silent mix."""
    if not path.is_file():
        raise SystemExit(f"--keep {path}: no such summary")
    out = []
    for r in json.loads(path.read_text())["rows"]:
        name = r["name"]
        if name not in groups:
            out.append(r)
            continue
        new_seeds = {_seed(g) for g in groups[name]}
        if r.get("spread") == "training seeds":
            raise SystemExit(f"--keep {path}: row {name} has seeds {r['train_seeds']} there and new rows here")
        seed = _seed(r)
        if seed not in new_seeds:
            row = {k: v for k, v in r.items() if k not in ("train_seeds", "spread", "val_curves")}
            row["val_curve"] = (r.get("val_curves") or {}).get(str(seed))
            groups[name].append(row)
    return out


def cmd_summarize(a) -> None:
    from workflows.pixel_reference import pixel_reference

    out = Path(a.out)
    rows_dir = out / a.rows
    found = sorted(p.stem for p in rows_dir.glob("*.json"))
    names = [n for n in ORDER if n in found] + [n for n in found if n not in ORDER]
    groups: dict[str, list[dict]] = {}
    for name in names:
        groups.setdefault(name.split(SEED_SUFFIX)[0], []).append(json.loads((rows_dir / f"{name}.json").read_text()))
    kept = _kept_rows(Path(a.keep), groups) if a.keep else []
    if not groups and not kept:
        raise SystemExit(f"no rows under {rows_dir}")
    rows = [_aggregate(sorted(g, key=_seed)) for g in groups.values()] + kept
    rank = {n: i for i, n in enumerate(ORDER)}
    rows.sort(key=lambda r: (rank.get(r["name"], len(ORDER)), r["name"] + SEED_SUFFIX))  # as the row files sort
    ref = pixel_reference()
    steps = max((r.get("student_steps") or 0) for r in rows)
    res = {
        "machine": machine(),
        "command": a.command,
        "n_samples": a.n_samples,
        "student_steps": steps,
        "real": {"near_white": ref.near_white, "near_black": ref.near_black, "edge_energy": ref.edge_energy},
        "judges": {"fd": "workflows/assets/evaluator (cnn)", "fd2": "workflows/assets/judge2 (resnet)"},
        "selection": "each distilled row exports the EMA of its "
        + ", ".join(sorted({r.get("selection", "") for g in groups.values() for r in g if r.get("selection")}))
        + "; the table reports test seeds 0,1,2 only",
        "rows": rows,  # _aggregate moved every val_curve into val_curves
    }
    (out / "ablation.json").write_text(json.dumps(res, indent=2) + "\n")
    f = lambda r, k, d=3: f"{r[k]['mean']:.{d}f} ± {r[k]['std']:.{d}f}" if k in r else "–"  # noqa: E731
    lines = [
        "# Ablation: 4-step students distilled from the built-in teacher",
        "",
        f"Machine: {res['machine']}. N = {a.n_samples} samples per evaluation seed, test seeds 0,1,2. Spread: "
        "over training seeds where a row has several (its `train seeds` column), else over evaluation seeds. "
        "j1 = the project's evaluator, j2 = the independent ResNet judge. "
        f"Real test split: near-white {ref.near_white:.4f}, edge energy {ref.edge_energy:.4f}.",
        "",
        f"Selection: {res['selection']}.",
        "",
        f"Command: `{a.command}`",
        "",
        "| row | NFE | train seeds | steps (exported) | " + " | ".join(t for _, t, _ in TABLE) + " |",
        "|---|---|---|---|" + "---|" * len(TABLE),
    ]
    for r in rows:
        ex = r.get("exported_student_steps")
        ex = f" ({ex})" if ex is not None else ""
        seeds = ",".join(str(x) for x in r.get("train_seeds", [])) or "–"
        lines.append(
            f"| {r['name']} | {r['nfe']} | {seeds} | {r.get('student_steps') or 0}{ex} | "
            + " | ".join(f(r, k, d) for k, _, d in TABLE)
            + " |"
        )
    (out / "ablation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("teacher", "train", "summarize", "reselect"):
        p = sub.add_parser(name)
        p.add_argument("--out", default=str(RESULTS / "ablation_work"))
        p.add_argument("--n-samples", type=int, default=1000)
        p.add_argument("--seeds", default="0,1,2")
    t = sub.choices["train"]
    t.add_argument("--row", required=True, choices=sorted(ROWS))
    t.add_argument(
        "--name",
        help="name of an extra row that runs --row's recipe with other hyperparameters (e.g. cdm-nmax4 with --n-max 4)",
    )
    t.add_argument("--student-steps", type=int, default=600)
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--n-max", type=int, default=8)
    t.add_argument("--alpha", type=float, default=0.945)
    t.add_argument("--lr", type=float, default=2e-5)
    t.add_argument("--fake-lr-ratio", type=float, default=2.0)
    t.add_argument("--warmup", type=int, default=50)
    t.add_argument("--w-cdm", type=float, default=1.0, help="weight of the CDM loss term (spec: 1)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument(
        "--cdm",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any CDMConfig field, e.g. --cdm norm_floor=0.01 --cdm fake_mix=0.5 (repeatable)",
    )
    t.add_argument("--lr-decay", default="none", choices=["none", "cosine"])
    t.add_argument("--beta1", type=float, default=0.9, help="Adam's first-moment decay for student and fake")
    t.add_argument("--ema-decay", type=float, default=0.999)
    t.add_argument("--min-lr-ratio", type=float, default=0.0)
    t.add_argument(
        "--snapshots",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="keep the EMA weights of every validation point under runs/<name>/snapshots",
    )
    t.add_argument("--no-final-eval", action="store_true", help="stop after training (no test-seed evaluation)")
    t.add_argument(
        "--reference-steps",
        type=int,
        default=100,
        help="teacher steps of mse_to_teacher100 (0 = skip; its reference costs ~10 CPU min per seed)",
    )
    t.add_argument("--log-every", type=int, default=25)
    t.add_argument("--val-every", type=int, default=25)
    t.add_argument("--ckpt-every", type=int, default=50)
    t.add_argument(
        "--keep-best",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="export the EMA with the best validation selection score (both judges and the pixel "
        "panel on validation seed 100), not the last one",
    )
    for name in ("train", "reselect"):
        sub.choices[name].add_argument("--select-by", default="worst_judge", choices=sorted(SELECTION))
    r = sub.choices["reselect"]
    r.add_argument("--names", default="", help="comma-separated rows (default: every row under <out>/rows)")
    sub.choices["teacher"].add_argument("--names", default="", help="comma-separated teacher rows (default: all)")
    r.add_argument("--force", action="store_true", help="redo rows already reselected")
    sub.choices["summarize"].add_argument("--command", default="see benchmarks/ablation.py docstring")
    sub.choices["summarize"].add_argument("--rows", default="rows", help="folder of row files under --out")
    sub.choices["summarize"].add_argument(
        "--keep",
        default="",
        help="an earlier ablation.json whose rows stay in the table unless rerun (their runs need not be here)",
    )
    a = ap.parse_args()
    torch.set_num_threads(1)
    {"teacher": cmd_teacher, "train": cmd_train, "summarize": cmd_summarize, "reselect": cmd_reselect}[a.cmd](a)


if __name__ == "__main__":
    main()
