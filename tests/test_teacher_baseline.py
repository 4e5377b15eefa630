"""benchmarks/teacher_baseline.py: two processes share one table's tasks, none twice; a rerun only assembles."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_two_processes_share_the_baseline_and_a_rerun_resumes(tmp_path):
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "teacher_baseline.py"),
        "--n-samples",
        "20",
        "--seeds",
        "0",
        "--steps",
        "100,2",
        "--cfg-grid",
        "3",
        "--batch-size",
        "20",
        "--out",
        str(tmp_path),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) for _ in range(2)
    ]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    entries = [json.loads(x) for x in (tmp_path / "teacher_rows.jsonl").read_text().splitlines()]
    finished = [tuple(e["task"]) for e in entries if e["kind"] != "claim"]
    assert len(finished) == len(set(finished))  # no task ran twice
    assert ("row", 100, 1.0) in finished and ("val", None, 3.0) in finished
    table = json.loads((tmp_path / "teacher.json").read_text())
    best = table["cfg_selection"]["best_cfg"]
    assert [(r["steps"], r["cfg"]) for r in table["rows"]] == [(s, g) for s in (100, 2) for g in sorted({1.0, best})]
    assert table["rows"][0]["mse_to_teacher100"]["mean"] == 0.0 and table["rows"][-1]["mse_to_teacher100"]["mean"] > 0

    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0 and "task (" not in again.stdout  # everything was done: assembly only
    assert json.loads((tmp_path / "teacher.json").read_text())["rows"] == table["rows"]
