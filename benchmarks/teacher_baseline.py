"""Baseline table of the built-in teacher: Euler at 100, 28, 8, 4, 2, 1 steps, with and without CFG.

    python benchmarks/teacher_baseline.py --device cuda            # the committed table (GPU)
    python benchmarks/teacher_baseline.py --n-samples 500 --seeds 0 --out /tmp/tb   # quick CPU check

The CFG scale of the "best CFG" rows is chosen on a *validation* noise seed (``--val-seed``, not one of
the reported seeds) at 28 steps, by FD; the rows are then reported on the evaluation seeds. Writes
``teacher.json`` (schema in the Foundation issue), ``teacher.md`` and one PNG grid per row.

Resumable and shareable: the work is a list of tasks (the 100-step row first, since every other row
needs its images as the MSE reference; the validation scores; then the other rows). Each finished task is
appended to ``teacher_rows.jsonl`` in ``--out`` under a key (teacher and evaluator content hashes, N,
seeds, validation seed, device, batch size); a rerun skips finished tasks. Processes started with the
same command share the list: each claims the next task whose inputs are ready, so on a CPU box

    OMP_NUM_THREADS=1 python benchmarks/teacher_baseline.py --n-samples 1000 --out R &
    OMP_NUM_THREADS=1 python benchmarks/teacher_baseline.py --n-samples 1000 --out R; wait

runs on two cores with no task done twice. A killed process's claims lapse (its pid is gone).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from workflows.config import DEFAULT_EVALUATOR, DEFAULT_TEACHER, EvalConfig, build  # noqa: E402
from workflows.evaluation import METRICS, evaluate_folder, folder_hash  # noqa: E402


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return (
        f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s) per process"
    )


class TaskLog:
    """``teacher_rows.jsonl``: finished tasks and claims of running ones, for every process sharing the run."""

    def __init__(self, path: Path, key: dict):
        self.path, self.key, self.me = path, key, (socket.gethostname(), os.getpid())

    def _entries(self) -> list[dict]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                e = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a killed process
                continue
            if e.get("key") == self.key:
                out.append(e)
        return out

    def _append(self, entry: dict) -> None:
        with self.path.open("a") as f:  # one short append per entry: parallel writers do not interleave
            f.write(json.dumps({**entry, "key": self.key}) + "\n")

    def done(self) -> dict:
        return {tuple(e["task"]): e for e in self._entries() if e["kind"] != "claim"}

    def _live(self, claim: dict) -> bool:
        host, pid = claim["by"]
        if host != self.me[0]:
            return True
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True

    def owner(self, task: tuple) -> tuple | None:
        """The first live claimant of an unfinished ``task``."""
        for e in self._entries():
            if e["kind"] == "claim" and tuple(e["task"]) == task and self._live(e):
                return tuple(e["by"])
        return None

    def claim(self, task: tuple) -> bool:
        if self.owner(task) is not None:
            return False
        self._append({"kind": "claim", "task": list(task), "by": list(self.me)})
        return self.owner(task) == self.me  # two claims at once: the earlier line wins

    def finish(self, task: tuple, entry: dict) -> None:
        self._append({**entry, "kind": task[0], "task": list(task), "by": list(self.me)})


def _shown(path: str) -> str:
    """A path inside the repository as the repository-relative path a reader can use; others unchanged."""
    root = Path(__file__).resolve().parent.parent
    p = Path(path).resolve()
    return str(p.relative_to(root)) if p.is_relative_to(root) else path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default=str(DEFAULT_TEACHER))
    ap.add_argument("--evaluator", default=str(DEFAULT_EVALUATOR))
    ap.add_argument("--steps", default="100,28,8,4,2,1")
    ap.add_argument("--cfg-grid", default="1.25,1.5,2,3,4")
    ap.add_argument("--val-seed", type=int, default=100)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--n-samples", type=int, default=5000)
    ap.add_argument("--batch-size", type=int, default=5000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in a.seeds.split(",")]
    steps_list = [int(s) for s in a.steps.split(",")]
    grid = [1.0] + [float(x) for x in a.cfg_grid.split(",") if x.strip()]
    key = {
        "teacher": folder_hash(a.teacher),
        "evaluator": folder_hash(a.evaluator),
        "n_samples": a.n_samples,
        "seeds": seeds,
        "val_seed": a.val_seed,
        "device": a.device,
        "batch_size": a.batch_size,
    }
    tasks = TaskLog(out / "teacher_rows.jsonl", key)

    def ev(steps: int, cfg: float, seeds_: list[int], grid_dir: Path | None, ref: int) -> dict:
        c = build(
            EvalConfig,
            dict(
                steps=steps,
                guidance=cfg,
                n_samples=a.n_samples,
                seeds=seeds_,
                batch_size=a.batch_size,
                reference_steps=ref,
                device=a.device,
            ),
        )
        return evaluate_folder(a.teacher, c, grid_dir, a.teacher, a.evaluator)

    def run(task: tuple) -> dict:
        kind, steps, g = task
        t = time.time()
        if kind == "val":  # FD only: no reference needed
            return {"fd": ev(28, g, [a.val_seed], None, 0)["fd"]["mean"], "wall_s": round(time.time() - t, 1)}
        r = ev(steps, g, seeds, out / "teacher_grids" / f"steps{steps}_cfg{g}", 100)
        return {
            "steps": steps,
            "cfg": g,
            "nfe": r["nfe"],
            **{k: r[k] for k in METRICS if k in r},
            "s_per_image": r["s_per_image"],
            "wall_s": round(time.time() - t, 1),
        }

    t0 = time.time()
    ref_task = ("row", 100, 1.0) if 100 in steps_list else None
    while True:
        done = tasks.done()
        val_done = all(("val", None, g) in done for g in grid)
        best = min(grid, key=lambda g: done[("val", None, g)]["fd"]) if val_done else None
        todo = (
            ([ref_task] if ref_task else [])
            + [("val", None, g) for g in grid]
            + [("row", s, 1.0) for s in steps_list if s != 100]
        )
        if best is not None and best != 1.0:
            todo += [("row", s, best) for s in steps_list]
        todo = [t for t in todo if t not in done]
        if not todo and best is not None:
            break
        ready = [t for t in todo if t[0] == "val" or t == ref_task or ref_task is None or ref_task in done]
        ready = [t for t in ready if t[0] != "row" or t[2] == 1.0 or best is not None]
        picked = next((t for t in ready if tasks.claim(t)), None)
        if picked is None:  # everything left is running elsewhere or waits for it
            time.sleep(10)
            continue
        print(f"task {picked} ...", flush=True)
        res = run(picked)
        tasks.finish(picked, res)
        print(f"task {picked}: {json.dumps(res)}", flush=True)

    done = tasks.done()
    val = {g: done[("val", None, g)]["fd"] for g in grid}
    best = min(val, key=val.get)
    for g in grid:
        print(f"validation seed {a.val_seed}, 28 steps, cfg {g}: fd {val[g]:.3f}", flush=True)
    rows = []
    for steps in steps_list:
        for g in sorted({1.0, best}):
            e = done[("row", steps, g)]
            rows.append({k: v for k, v in e.items() if k not in ("kind", "task", "by", "key", "wall_s")})
    res = {
        "machine": machine(a.device),
        "command": "python benchmarks/teacher_baseline.py " + " ".join(shlex.quote(x) for x in sys.argv[1:]),
        "n_samples": a.n_samples,
        "seeds": seeds,
        "teacher": _shown(a.teacher),
        "cfg_selection": {
            "val_seed": a.val_seed,
            "steps": 28,
            "fd_by_cfg": {str(k): v for k, v in val.items()},
            "best_cfg": best,
        },
        "rows": rows,
        "total_wall_s": round(time.time() - t0, 1),
        "compute_s": round(sum(e.get("wall_s", 0.0) for e in done.values()), 1),
        "processes": len({tuple(e["by"]) for e in done.values() if "by" in e}),
    }
    (out / "teacher.json").write_text(json.dumps(res, indent=2) + "\n")
    lines = [
        "# Built-in teacher: Euler baseline",
        "",
        f"Machine: {res['machine']}. N = {a.n_samples} samples per seed, seeds {seeds}, mean ± std over seeds.",
        f"Command: `{res['command']}`",
        f"CFG scale chosen on validation seed {a.val_seed} at 28 steps by FD: {best} "
        f"(FD by scale: {', '.join(f'{k}: {v:.2f}' for k, v in val.items())}).",
        "",
        "| steps | cfg | NFE | FD ↓ | adherence ↑ | precision ↑ | recall ↑ | hf gap ↓ | MSE to 100-step ↓ | s/image |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        f = lambda k, d=3, r=r: f"{r[k]['mean']:.{d}f} ± {r[k]['std']:.{d}f}"  # noqa: E731
        lines.append(
            f"| {r['steps']} | {r['cfg']} | {r['nfe']} | {f('fd', 2)} | {f('adherence')} | {f('precision')} | "
            f"{f('recall')} | {f('hf_gap', 4)} | {f('mse_to_teacher100', 4)} | {r['s_per_image'] or 0:.2e} |"
        )
    (out / "teacher.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
