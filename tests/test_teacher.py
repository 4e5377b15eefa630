"""The shipped teacher loads with the plain diffusers class, samples, and its training workflow
runs and resumes on real data."""

import json

import torch
from diffusers import SD3Transformer2DModel

from cdm_core.models.sd3 import SD3Velocity
from cdm_core.sampling import sample_euler
from cdm_core.schedule import inference_levels
from workflows.config import DEFAULT_TEACHER, TeacherTrainConfig, load_config
from workflows.embeddings import empty_prompt, encode_prompts
from workflows.model_folder import read_meta


def test_shipped_teacher_loads_with_diffusers_and_samples():
    model = SD3Transformer2DModel.from_pretrained(str(DEFAULT_TEACHER / "transformer")).eval()
    meta = read_meta(DEFAULT_TEACHER)
    assert meta.image_size == 32 and meta.channels == 1 and meta.shift > 0
    assert meta.provenance.get("command", "").startswith("cdm teacher train")
    cond = encode_prompts(["a photo of a sneaker", "a photo of a pair of trousers"])
    noise = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    x = sample_euler(SD3Velocity(model), noise, inference_levels(8, meta.shift), cond, empty_prompt().expand(2), 1.5)
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
    SD3Transformer2DModel.from_pretrained(str(folder / "transformer"))
