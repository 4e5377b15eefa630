"""Wall time per student step: the CDM step (dynamic schedule + CA + DM + CDM) against the DMD2-style
fixed-anchor step, and what truncating the backward simulation at the deepest picked anchor saves
against always rolling out all N levels.

    OMP_NUM_THREADS=1 python benchmarks/step_cost.py            # -> results/step_cost.{json,md}

Every variant runs the same reference loop (cdm_core + torch, one process, one thread) on the built-in
teacher with the same batch, seed and prompts. Variants are timed in interleaved rounds (each round runs
``--steps`` student steps of every variant in turn) so slow drifts of the machine hit all of them alike;
the figure per variant is the median over rounds of the mean time per student step (one student step =
``update_ratio`` iterations, fake steps and rollouts included).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from cdm_core.distiller import build_distiller  # noqa: E402
from cdm_core.optim import OptimConfig  # noqa: E402
from cdm_core.reference_loop import LoopConfig, run_loop  # noqa: E402
from cdm_core.step import CDMConfig  # noqa: E402
from workflows.config import DEFAULT_TEACHER  # noqa: E402
from workflows.embeddings import empty_prompt, encode_prompts  # noqa: E402
from workflows.model_folder import load_model  # noqa: E402
from workflows.prompts import train_prompts  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def variants(n_max_list: list[int]) -> dict[str, tuple[dict, bool]]:
    """name -> (CDMConfig overrides, truncate the rollout)."""
    v: dict[str, tuple[dict, bool]] = {"fixed (dmd-fixed)": (dict(schedule="fixed", use_cdm=False), True)}
    for n in n_max_list:
        v[f"cdm N_max={n}"] = (dict(schedule="dynamic", n_max=n), True)
        v[f"cdm N_max={n}, full rollout"] = (dict(schedule="dynamic", n_max=n), False)
    return v


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10, help="student steps per variant per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3, help="untimed student steps per variant first")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--n-max", default="8,28", help="comma-separated N_max values for the dynamic rows")
    p.add_argument("--out", default=str(RESULTS))
    a = p.parse_args()
    torch.set_num_threads(1)
    image_shape = load_model(DEFAULT_TEACHER).shape
    prompts = encode_prompts([p for p, _ in train_prompts()])
    empty = empty_prompt()
    # run_loop stops on the callback below, never on its own step budget
    loop = LoopConfig(a.batch_size, 10**9, OptimConfig(lr_student=5.9e-5, fake_lr_ratio=2.0, warmup_steps=50))
    runs = {}
    for name, (over, truncate) in variants([int(x) for x in a.n_max.split(",")]).items():
        cdm = CDMConfig(alpha=0.945, seed=0, **over)
        t = load_model(DEFAULT_TEACHER)
        d = build_distiller(t.module, cdm, loop.optim, loop.student_steps, t.family.velocity)
        if not truncate:  # roll out all N levels whatever the deepest picked anchor is
            d.step.sync_depth = lambda deepest: 10**9
        runs[name] = {"d": d, "it": 0, "times": [], "nfe": [], "n": []}

    def run(r: dict, student_steps: int) -> float:
        """``student_steps`` more student steps of one variant through the reference loop; seconds per step."""
        done = 0

        def count(res, _secs) -> bool:
            nonlocal done
            r["nfe"].append(res.metrics["nfe/rollout"])
            r["n"].append(res.n)
            done += int(res.student_updated)
            return done >= student_steps

        t0 = time.perf_counter()
        r["it"] = run_loop(r["d"], loop, prompts, empty, image_shape, r["it"], count)
        return (time.perf_counter() - t0) / student_steps

    for name, r in runs.items():
        run(r, a.warmup)
        r["nfe"].clear()
        r["n"].clear()
        print(f"warmed up: {name}", flush=True)
    for k in range(a.rounds):
        for r in runs.values():
            r["times"].append(run(r, a.steps))
        print(
            f"round {k + 1}/{a.rounds}: " + ", ".join(f"{n} {r['times'][-1]:.3f}s" for n, r in runs.items()), flush=True
        )

    fixed = statistics.median(runs["fixed (dmd-fixed)"]["times"])
    rows = []
    for name, r in runs.items():
        med = statistics.median(r["times"])
        rows.append(
            {
                "name": name,
                "s_per_student_step": med,
                "spread": [min(r["times"]), max(r["times"])],
                "x_fixed": med / fixed,
                "mean_rollout_nfe": statistics.mean(r["nfe"]),
                "mean_n": statistics.mean(r["n"]),
            }
        )
    by = {r["name"]: r for r in rows}
    trunc = {}
    for n in a.n_max.split(","):
        t, f = by[f"cdm N_max={n}"], by[f"cdm N_max={n}, full rollout"]
        trunc[n] = {
            "saved_fraction": 1 - t["s_per_student_step"] / f["s_per_student_step"],
            "rollout_nfe_truncated": t["mean_rollout_nfe"],
            "rollout_nfe_full": f["mean_rollout_nfe"],
        }
    cmd = "OMP_NUM_THREADS=1 python benchmarks/step_cost.py " + " ".join(sys.argv[1:])
    res = {
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, 1 torch thread, torch {torch.__version__}",
        "command": cmd.strip(),
        "batch_size": a.batch_size,
        "steps_per_round": a.steps,
        "rounds": a.rounds,
        "rows": rows,
        "truncation": trunc,
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "step_cost.json").write_text(json.dumps(res, indent=2) + "\n")
    lines = [
        "# Cost of a student step: CDM vs fixed anchors, and rollout truncation",
        "",
        f"Machine: {res['machine']}. Command: `{res['command']}`. Built-in teacher, batch {a.batch_size}, "
        f"update ratio 2 (one student step = 2 fake steps + 2 rollouts + 1 student update); median of "
        f"{a.rounds} interleaved rounds of {a.steps} student steps (min-max in brackets).",
        "",
        "| variant | s / student step | × fixed | mean rollout NFE | mean N |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['s_per_student_step']:.3f} [{r['spread'][0]:.3f}-{r['spread'][1]:.3f}] | "
            f"{r['x_fixed']:.2f} | {r['mean_rollout_nfe']:.2f} | {r['mean_n']:.2f} |"
        )
    lines += ["", "Rollout truncation (stop at the deepest picked anchor instead of rolling out all N levels):", ""]
    for n, t in trunc.items():
        lines.append(
            f"- N_max={n}: {100 * t['saved_fraction']:.0f}% of the step time saved; rollout NFE "
            f"{t['rollout_nfe_truncated']:.2f} vs {t['rollout_nfe_full']:.2f} per iteration."
        )
    (out / "step_cost.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
