"""LoRA mode: the student and the fake teacher as two peft adapters on one frozen base (the real teacher with its
adapters disabled), on real Ray Train + DeepSpeed, with a worker killed mid-run."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import torch
from distill_helpers import metric_steps, mlflow_client, tiny_overrides
from test_distill_ray import _run, _wait_for_committed_checkpoint, _worker_pids

from workflows.config import DEFAULT_TEACHER, load_config
from workflows.distill import job_key, run_distill
from workflows.distill_config import DistillConfig, LoraSection


def _velocity_inputs(h, seed=0):
    from workflows.embeddings import encode_prompts

    g = torch.Generator().manual_seed(seed)
    x = torch.randn((2, *h.shape), generator=g)
    return x, torch.tensor([0.9, 0.4]), encode_prompts(["a photo of a bag", "a photo of a shirt"])


def test_one_base_serves_three_roles_and_the_disabled_adapters_are_the_teacher_bitwise():
    from workflows import lora
    from workflows.model_folder import load_model

    ref = load_model(DEFAULT_TEACHER)
    h = load_model(DEFAULT_TEACHER)
    n_base = sum(p.numel() for p in h.module.parameters())
    params = lora.add_role_adapters(h.module, LoraSection(enabled=True, rank=4, alpha=4))
    roles = lora.Roles(h.module, params)
    with torch.no_grad():  # make the adapters differ from zero (they start as the teacher: B = 0)
        for role, scale in (("student", 0.05), ("fake", -0.03)):
            for n, p in params[role]:
                if "lora_B" in n:
                    p.copy_(torch.randn_like(p) * scale)
    x, t, cond = _velocity_inputs(h)
    v = {r: roles.velocity(r, h.family.velocity)(x, t, cond) for r in (None, "student", "fake")}
    with torch.no_grad():
        teacher = ref.velocity()(x, t, cond)
    assert torch.equal(v[None], teacher)  # adapters disabled = the teacher, bit for bit
    assert not torch.allclose(v["student"], teacher) and not torch.allclose(v["student"], v["fake"])
    # one copy of the base: every parameter tensor has its own storage, and the base is counted once
    storages = {p.untyped_storage().data_ptr() for p in h.module.parameters()}
    assert len(storages) == len(list(h.module.parameters()))
    n_adapters = sum(p.numel() for plist in params.values() for _, p in plist)
    assert sum(p.numel() for p in h.module.parameters()) == n_base + n_adapters
    assert n_adapters < 0.2 * n_base
    # after a switch both adapters still require grad (a graph built under one role trains that role)
    assert all(p.requires_grad for plist in params.values() for _, p in plist)
    assert not any(p.requires_grad for n, p in h.module.named_parameters() if "lora_" not in n)


def test_lora_job_survives_a_killed_worker_and_exports_the_merged_student_and_the_adapter(ray_cluster, distill_env):
    from diffusers import SD3Transformer2DModel

    sets = tiny_overrides(distill_env, **{"train.student_steps": 6, "lora.enabled": "true", "lora.rank": 4})
    cfg = load_config(DistillConfig, "tiny", sets)
    job_dir = distill_env / "runs" / job_key(cfg)
    out: dict = {}
    th = threading.Thread(target=lambda: out.update(run_distill(cfg)), daemon=True)
    th.start()
    latest = _wait_for_committed_checkpoint(job_dir, lambda: th.is_alive())
    c = mlflow_client(distill_env)
    os.kill(_worker_pids(c, cfg)[1], signal.SIGKILL)
    th.join(900)
    assert out.get("version") == 1, "the LoRA job did not finish after the worker was killed"
    assert int(_run(c, cfg).data.tags["cdm.resumed_at"].split(",")[0]) >= latest
    assert metric_steps(c, out["run_id"]) == list(range(1, 7))
    # checkpoints hold the adapters and their optimizer states, not the frozen base
    ckpt = Path(out["checkpoint"])
    base_bytes = (DEFAULT_TEACHER / "transformer" / "diffusion_pytorch_model.safetensors").stat().st_size
    module_files = list((ckpt / "student").rglob("*model_states.pt"))
    assert module_files and all(f.stat().st_size < 0.5 * base_bytes for f in module_files)
    # the export: a plain transformer (the EMA adapter merged) that differs from the teacher, and the adapter alone
    folder = Path(out["student_folder"])
    student = SD3Transformer2DModel.from_pretrained(str(folder / "transformer"))
    teacher = SD3Transformer2DModel.from_pretrained(str(DEFAULT_TEACHER / "transformer"))
    assert not any("lora" in n for n, _ in student.named_parameters())
    diff = max((a - b).abs().max().item() for a, b in zip(student.parameters(), teacher.parameters()))
    assert diff > 0
    assert (folder / "lora_adapter" / "pytorch_lora_weights.safetensors").exists()
    teacher.load_lora_adapter(
        str(folder / "lora_adapter"), weight_name="pytorch_lora_weights.safetensors", adapter_name="student"
    )
    teacher.fuse_lora(adapter_names=["student"])
    teacher.unload_lora()
    for a, b in zip(student.parameters(), teacher.parameters()):  # adapter alone + base = the merged export
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
