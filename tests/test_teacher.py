"""The shipped teacher loads with the plain diffusers class, samples, and its training workflow
runs and resumes on real data."""

import json
import re

import torch
from diffusers import AutoModel

from cdm_core.models import SD3Family
from cdm_core.sampling import sample
from workflows.config import DEFAULT_TEACHER, TeacherTrainConfig, load_config
from workflows.embeddings import empty_prompt, encode_prompts
from workflows.model_folder import read_meta


def test_shipped_teacher_loads_with_diffusers_and_samples():
    model = AutoModel.from_pretrained(str(DEFAULT_TEACHER / "transformer")).eval()
    meta = read_meta(DEFAULT_TEACHER)
    assert meta.image_size == 32 and meta.channels == 1 and meta.shift > 0
    assert meta.provenance.get("command", "").startswith("cdm teacher train")
    cond = encode_prompts(["a photo of a sneaker", "a photo of a pair of trousers"])
    noise = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    x = sample(SD3Family.velocity(model), noise, 8, meta.shift, cond, empty_prompt().expand(2), 1.5)
    assert x.shape == (2, 1, 32, 32) and torch.isfinite(x).all()
    assert x.abs().max() < 3  # samples live near the data range [-1, 1]


def test_teacher_train_runs_and_resumes(tmp_path):
    over = ["model.num_layers=1", "model.head_dim=8", "batch_size=8", "log_every=1", "warmup_steps=1"]
    cfg = load_config(TeacherTrainConfig, "teacher-tiny", over + ["steps=2", "checkpoint_every=1"])
    from workflows.teacher import train_teacher

    folder = train_teacher(cfg, tmp_path, command="cdm teacher train (test)")
    first = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert first["step"] == 2
    cfg4 = load_config(TeacherTrainConfig, "teacher-tiny", over + ["steps=4", "checkpoint_every=1"])
    train_teacher(cfg4, tmp_path)
    second = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert second["step"] == 4
    assert second["ema"]["num_updates"] == 4
    meta = json.loads((folder / "cdm_model.json").read_text())
    assert meta["provenance"]["steps_done"] == 4
    AutoModel.from_pretrained(str(folder / "transformer"))


def test_lr_factor_warms_up_then_decays_to_zero():
    from workflows.teacher import lr_factor

    assert lr_factor(0, 10, 0.0) == 0.1
    assert lr_factor(9, 10, 0.0) == 1.0
    assert 0.49 < lr_factor(50, 10, 0.5) < 0.51
    assert lr_factor(50, 10, 1.0) == 0.0 and lr_factor(50, 10, 3.0) == 0.0


def test_teacher_time_budget_ends_the_run_with_its_decay_complete(tmp_path, capsys):
    # 1000 steps cannot finish in 3 s on a CPU: the wall-time budget must end the run, not the step count
    over = [
        "model.num_layers=1",
        "model.head_dim=8",
        "batch_size=8",
        "log_every=100000",
        "warmup_steps=1",
        "steps=1000",
        "max_minutes=0.05",
        "checkpoint_every=100000",
    ]
    from workflows.teacher import train_teacher

    folder = train_teacher(load_config(TeacherTrainConfig, "teacher-tiny", over), tmp_path)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert 0 < state["step"] < 1000
    assert state["elapsed_s"] >= 3.0
    out = capsys.readouterr().out
    assert "time budget spent" in out
    last_lr = float(re.findall(r"lr=(\S+)", out)[-1])
    assert last_lr < 0.05 * 1e-3  # paced by time: the cosine is at its end, not at step 117/1000's ~0.97
    assert json.loads((folder / "cdm_model.json").read_text())["provenance"]["steps_done"] == state["step"]


def test_teacher_train_data_parallel_under_torchrun(tmp_path):
    # two real gloo processes, paced by a wall-time budget (rank 0's clock decides for both, or they would
    # leave the loop at different steps and hang); the global batch splits over them; rank 0 checkpoints;
    # the replicas are compared at every checkpoint; a one-process rerun and a two-process rerun resume it
    import os
    import subprocess
    import sys

    def run(procs: int, *extra: str) -> str:
        launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)] if procs > 1 else []
        cmd = [sys.executable, *launch, "-m", "cdm_cli", "teacher", "train", "--out", str(tmp_path)]
        for o in [
            "model.num_layers=1",
            "model.head_dim=8",
            "batch_size=8",
            "log_every=1",
            "warmup_steps=1",
            "checkpoint_every=2",
            *extra,
        ]:
            cmd += ["--set", o]
        p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        return p.stdout

    out = run(2, "steps=100000", "max_minutes=0.1")
    assert "2 data-parallel processes, 4 samples each per step" in out and "time budget spent" in out
    assert out.count("teacher model folder:") == 1  # printed by rank 0 only
    first = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["step"]
    assert 2 <= first < 100000
    run(1, f"steps={first + 1}")  # two processes -> one
    out = run(2, f"steps={first + 3}")  # one -> two
    assert "resuming teacher training" in out
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert state["step"] == first + 3 and state["ema"]["num_updates"] == first + 3
    meta = json.loads((tmp_path / "model" / "cdm_model.json").read_text())
    assert meta["provenance"]["processes"] == 2 and meta["provenance"]["steps_done"] == first + 3
    assert meta["provenance"]["launcher"].startswith("torchrun --nproc_per_node 2")
    AutoModel.from_pretrained(str(tmp_path / "model" / "transformer"))
