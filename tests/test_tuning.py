"""Sweeps on real Ray Tune (ASHA, Train v2 driver functions, DeepSpeed workers) and real MLflow (sqlite)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from distill_helpers import mlflow_client

from workflows.config import ConfigError

REPO = Path(__file__).resolve().parent.parent
GOOD_LRS = [1.0e-4, 3.0e-5]
BAD_LRS = [0.3, 0.5]  # AdamW steps of this size wreck the tiny student at once: val FD ~60-80 vs ~4


def _write_sweep(tmp_path: Path, name: str = "t", **over) -> Path:
    """A tiny sweep: 4 student steps per trial, validation (seed 100, N 50) after every step."""
    d = {
        "name": name,
        "preset": "tiny",
        "base": {
            "storage_path": str(tmp_path / "runs"),
            "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "registered_model": "sweep-test"},
            "train": {"student_steps": 4, "batch_size_per_worker": 4, "log_every": 1, "sample_every": 100},
            "cdm": {"n_max": 3},
            "optim": {"warmup_steps": 0},
            "scaling": {"num_workers": 1},
            "eval": {"n_samples": 20},
        },
        "validation": {"every": 1, "n_samples": 50},
        "space": {"optim.lr_student": GOOD_LRS + BAD_LRS},
        "searcher": {"kind": "grid"},
        "scheduler": {"kind": "asha", "grace_period": 1, "reduction_factor": 2},
        "budget": {"max_concurrent_trials": 2, "trial_cpus": 0.25},
    }
    for k, v in over.items():
        d[k] = v
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(d, sort_keys=False))
    return p


def _runs(c):
    exp = c.get_experiment_by_name("cdm-distill")
    return c.search_runs([exp.experiment_id]) if exp else []


# ------------------------------------------------------------------------------------ no Ray needed
@pytest.mark.parametrize(
    "space, field, words",
    [
        ({"cdm.n_maxx": [2, 3]}, "cdm.n_maxx", "unknown field"),
        ({"optim": {"lr_studnet": {"uniform": [0.1, 0.2]}}}, "optim.lr_studnet", "unknown field"),
        ({"cdm.alpha": {"uniform": [0.5, 0.5]}}, "cdm.alpha", "empty range"),
        ({"cdm.alpha": {"uniform": [0.9, 0.1]}}, "cdm.alpha", "empty range"),
        ({"cdm.n_max": []}, "cdm.n_max", "non-empty list"),
        ({"cdm.n_max": {"choice": []}}, "cdm.n_max", "non-empty list"),
        ({"cdm.alpha": {"uniform": [0.0, 1000.0]}}, "cdm.alpha", "less than or equal to 100"),
        ({"cdm.n_max": [4, 0]}, "cdm.n_max", "greater than or equal to 1"),
        ({"optim.lr_student": {"loguniform": [0.0, 1.0e-3]}}, "optim.lr_student", "low > 0"),
        ({"cdm.schedule": ["dynamic", "spiral"]}, "cdm.schedule", "spiral"),
        ({"train.student_steps": [10, 20]}, "train.student_steps", "cannot be swept"),
        ({"cdm": {}}, "cdm", "empty entry"),
        ({"cdm.alpha": {"normal": [0, 1]}}, "cdm.alpha", "expected a list"),
    ],
)
def test_invalid_search_space_is_rejected_before_any_trial_names_the_field(tmp_path, space, field, words):
    from tuning.sweep import main

    path = _write_sweep(tmp_path, space=space)
    with pytest.raises(ConfigError) as e:
        main(str(path), [], dry_run=False)
    msg = str(e.value)
    assert field in msg and words in msg, msg
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()  # nothing started


def test_grid_searcher_needs_lists_and_bad_sweep_settings_fail_at_load(tmp_path):
    from tuning.sweep import main

    p = _write_sweep(tmp_path, space={"cdm.alpha": {"uniform": [0.0, 1.0]}})
    with pytest.raises(ConfigError, match=r"cdm.alpha: the grid searcher needs a list"):
        main(str(p), [])
    with pytest.raises(ConfigError, match=r"validation.seed: 0 is one of the test seeds"):
        main(str(_write_sweep(tmp_path)), ["validation.seed=0"])
    with pytest.raises(ConfigError, match=r"scheduler.grace_period"):
        main(str(_write_sweep(tmp_path)), ["scheduler.grace_period=9"])
    with pytest.raises(ConfigError, match=r"base: cdm.n_maxx: unknown field"):
        main(str(_write_sweep(tmp_path)), ["base.cdm.n_maxx=3"])
    with pytest.raises(ConfigError, match=r"mode"):
        main(str(_write_sweep(tmp_path)), ["mode=max"])
    with pytest.raises(ConfigError, match=r"unknown preset"):
        main(str(tmp_path / "missing.yaml"), [])


def test_dry_run_lists_the_trials_and_resources_without_starting_anything(tmp_path):
    import ray

    from tuning.sweep import main

    was = ray.is_initialized()
    plan = main(
        str(_write_sweep(tmp_path, space={"optim.lr_student": [1e-4, 3e-5], "cdm.n_max": [2, 3]})), [], dry_run=True
    )
    assert plan["n_trials"] == 4 and len(plan["trials"]) == 4
    assert {(t["optim.lr_student"], t["cdm.n_max"]) for t in plan["trials"]} == {
        (1e-4, 2),
        (1e-4, 3),
        (3e-5, 2),
        (3e-5, 3),
    }
    r = plan["resources"]
    assert r["per_trial"]["cpus"] == 1.25 and r["max_concurrent_trials"] == 2 and r["peak"]["cpus"] == 2.5
    rnd = main(
        str(_write_sweep(tmp_path, space={"cdm.alpha": {"uniform": [0.0, 1.0]}}, searcher={"kind": "optuna"})),
        ["budget.num_samples=5"],
        dry_run=True,
    )
    assert rnd["n_trials"] == 5 and rnd["space"]["cdm.alpha"] == "uniform [0.0, 1.0]"
    assert ray.is_initialized() == was and not (tmp_path / "runs").exists()


def test_preset_sweep_tiny_is_valid():
    from tuning.sweep import main

    plan = main("sweep-tiny", [], dry_run=True)
    assert plan["searcher"] == "optuna" and set(plan["space"]) >= {
        "cdm.n_max",
        "cdm.alpha",
        "optim.lr_student",
        "optim.fake_lr_ratio",
    }


def test_a_placement_group_is_unused_only_when_none_of_its_bundle_resources_is_taken():
    from tuning.placement_groups import unused

    h = "ab" * 16 + "01000000"
    total = {
        "CPU": 4.0,
        f"CPU_group_{h}": 1.0,
        f"CPU_group_0_{h}": 1.0,
        f"bundle_group_{h}": 1000.0,
        f"bundle_group_0_{h}": 1000.0,
    }
    assert unused(h, total, dict(total))
    assert not unused(h, total, {**total, f"bundle_group_0_{h}": 999.999})  # a 0-CPU actor sits in bundle 0
    assert not unused(h, total, {k: v for k, v in total.items() if k != f"CPU_group_{h}"})  # all taken: left out
    assert not unused("cd" * 16 + "01000000", total, dict(total))  # no resources of its own (yet)


def test_the_sweep_callbacks_survive_tunes_pickling_without_their_state():
    import pickle

    from tuning.placement_groups import StoppedTrialGroups
    from tuning.trial_lineage import TrialLineage

    cb = TrialLineage("sqlite:///x.db", "exp", {"name": "n"}, 4, "val_fd")
    cb._runs["t1"] = "run"
    back = pickle.loads(pickle.dumps(cb))
    assert (back.uri, back.experiment, back.base, back.total, back.metric) == (
        "sqlite:///x.db",
        "exp",
        {"name": "n"},
        4,
        "val_fd",
    )
    assert back._runs == {} and back._c is None
    reaper = StoppedTrialGroups(delay_s=3.0)
    reaper._unused_since["g"] = 1.0
    back = pickle.loads(pickle.dumps(reaper))
    assert back.delay_s == 3.0 and back._unused_since == {} and back._job is None


# ------------------------------------------------------------------------------------ real sweeps
def test_asha_sweep_stops_a_bad_trial_nests_runs_and_aliases_the_best_candidate(ray_cluster, distill_env):
    from tuning.sweep import main

    res = main(str(_write_sweep(distill_env)), [])
    assert res["trials"] == 4 and res["errored"] == 0
    assert res["stopped_early"] >= 1  # the bad learning rates start after a good trial set the rung cutoffs
    assert res["best"]["config"]["optim.lr_student"] in GOOD_LRS
    c = mlflow_client(distill_env)
    runs = _runs(c)
    parents = [r for r in runs if r.data.tags.get("cdm.kind") == "sweep"]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.run_id == res["parent_run_id"] and parent.info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 4 and len(runs) == 5
    by_lr = {float(r.data.params["optim.lr_student"]): r for r in children}
    assert set(by_lr) == set(GOOD_LRS + BAD_LRS)
    for lr, r in by_lr.items():
        assert r.info.status in ("FINISHED", "KILLED"), (lr, r.info.status)  # none left RUNNING
        steps = [m.step for m in c.get_metric_history(r.info.run_id, "val_fd")]
        assert steps and steps == sorted(set(steps)), steps  # a curve, each step once
    stopped = [r for r in children if r.data.tags.get("cdm.sweep.stopped_early") == "true"]
    assert stopped and all(r.info.status == "KILLED" for r in stopped)
    # both bad learning rates are cut at their first rung (a good lr may be too: ASHA keeps the better half)
    assert set(BAD_LRS) <= {float(r.data.params["optim.lr_student"]) for r in stopped}
    # the best trial: registered, aliased `candidate`, evaluated on the test set
    mv = c.get_model_version_by_alias("sweep-test", "candidate")
    assert mv.run_id == res["best"]["run_id"] == by_lr[res["best"]["config"]["optim.lr_student"]].info.run_id
    assert "eval.fd" in c.get_run(mv.run_id).data.metrics
    arts = {a.path for a in c.list_artifacts(parent.info.run_id, "report")}
    assert {
        "report/results.csv",
        "report/results.md",
        "report/learning_curves.png",
        "report/val_worst_judge_vs_optim_lr_student.png",
    } <= arts
    assert parent.data.tags["cdm.best.optim.lr_student"] == str(res["best"]["config"]["optim.lr_student"])
    # no placement group of a stopped trial is left holding the cluster's CPUs
    import ray

    deadline = time.time() + 30
    while ray.available_resources().get("CPU", 0) < 4 - 1e-6:
        assert time.time() < deadline, ray.available_resources()
        time.sleep(1)


def _experiment_state_says_terminated(exp_dir: Path) -> bool:
    for f in exp_dir.glob("experiment_state*.json"):
        try:
            if "TERMINATED" in f.read_text():
                return True
        except OSError:
            pass
    return False


def _checkpoint_times(job_dir: Path) -> dict[str, list[tuple[str, int]]]:
    """Each checkpoint folder of a job: its files and their modification times."""
    from workflows.checkpoints import all_checkpoints

    return {
        ck.name: sorted((str(f.relative_to(ck)), f.stat().st_mtime_ns) for f in ck.rglob("*") if f.is_file())
        for ck in all_checkpoints(job_dir)
    }


def _metric_history(c, run_id: str, key: str) -> list[tuple[int, float, int]]:
    return sorted((m.step, m.value, m.timestamp) for m in c.get_metric_history(run_id, key))


def test_interrupted_sweep_resumes_with_the_same_command_one_run_per_trial(ray_cluster, distill_env):
    from tuning.sweep import load, main

    path = _write_sweep(
        distill_env,
        name="r",
        space={"optim.lr_student": GOOD_LRS},
        scheduler={"kind": "none"},
        budget={"max_concurrent_trials": 1, "trial_cpus": 0.25},
    )
    _, base, _, key = load(str(path), [])
    exp_dir = Path(base.storage_path) / "sweeps" / key
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    code = f"from tuning.sweep import main; main({str(path)!r}, [])"
    p = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=distill_env,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    c = mlflow_client(distill_env)
    deadline = time.time() + 400
    try:
        while True:  # until the first trial is recorded done by Tune and the second one has started
            assert p.poll() is None, "the sweep ended before it could be interrupted"
            assert time.time() < deadline, "the first trial did not finish"
            children = (
                [r for r in _runs(c) if r.data.tags.get("cdm.kind") != "sweep"]
                if (distill_env / "mlflow.db").exists()
                else []
            )
            if len(children) == 2 and _experiment_state_says_terminated(exp_dir):
                break
            time.sleep(1)
    finally:
        os.killpg(p.pid, signal.SIGKILL)  # the sweep driver and its local Ray die mid-sweep
        p.wait()
    first = next(r for r in children if r.info.status == "FINISHED")
    first_dir = Path(base.storage_path) / first.data.tags["cdm.job_key"]
    ckpts = _checkpoint_times(first_dir)
    assert ckpts, f"the finished trial left no checkpoint in {first_dir}"
    curve = _metric_history(c, first.info.run_id, "val_fd")
    res = main(str(path), [])  # the same command: Tuner.restore
    assert res["trials"] == 2 and res["errored"] == 0
    runs = _runs(c)
    assert len(runs) == 3  # one parent + one child per trial, nothing duplicated
    parent = next(r for r in runs if r.data.tags.get("cdm.kind") == "sweep")
    kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(kids) == 2 and all(r.info.status == "FINISHED" for r in kids)
    # the finished trial was not re-run: its checkpoints untouched, its validation curve not logged again
    assert _checkpoint_times(first_dir) == ckpts
    assert _metric_history(c, first.info.run_id, "val_fd") == curve
    for r in kids:
        assert [m.step for m in c.get_metric_history(r.info.run_id, "val_fd")] == [1, 2, 3, 4]
    assert c.get_model_version_by_alias("sweep-test", "candidate").run_id == res["best"]["run_id"]
    json.dumps(res)
