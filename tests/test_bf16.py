"""bf16 training (the SD3-Medium and LongCat-Image presets' precision): the frozen teacher is cast to the engines'
compute dtype, and the family adapters feed every model inputs in its own dtype, so an fp32 sampler (validation,
evaluation) and a bf16 training step both work. Real DeepSpeed bf16 on CPU (ENVIRONMENT.md)."""

from __future__ import annotations

import pytest
import torch
from distill_helpers import metric_steps, mlflow_client, tiny_overrides
from test_distill_ray import _run
from test_lora import _velocity_inputs

from workflows.config import DEFAULT_TEACHER, load_config
from workflows.distill_config import DistillConfig, LoraSection


def test_a_bf16_teacher_answers_an_fp32_caller_in_fp32_close_to_the_fp32_teacher():
    from workflows import lora
    from workflows.model_folder import load_model
    from workflows.worker_roles import freeze_to

    ref = load_model(DEFAULT_TEACHER)
    h = load_model(DEFAULT_TEACHER)
    params = lora.add_role_adapters(h.module, LoraSection(enabled=True, rank=4, alpha=4))
    roles = lora.Roles(h.module, params)
    freeze_to(h.module, torch.bfloat16)
    frozen = [p for n, p in h.module.named_parameters() if "lora_" not in n]
    assert frozen and all(p.dtype == torch.bfloat16 and not p.requires_grad for p in frozen)
    # the adapters belong to the engines: their dtype is the engines' business, freeze_to leaves them alone
    assert all(p.dtype == torch.float32 for plist in params.values() for _, p in plist)
    x, t, cond = _velocity_inputs(h)
    with torch.no_grad():
        want = ref.velocity()(x, t, cond)
        got = roles.velocity(None, h.family.velocity)(x, t, cond)
    assert got.dtype == torch.float32
    assert ((got - want).norm() / want.norm()).item() < 0.03  # bf16 rounding, not another model
    with torch.no_grad():  # and a bf16 caller gets bf16 back
        assert roles.velocity(None, h.family.velocity)(x.bfloat16(), t, cond).dtype == torch.bfloat16


@pytest.mark.parametrize("lora_mode", [False, True], ids=["full", "lora"])
def test_a_bf16_job_trains_exports_and_holds_the_frozen_teacher_in_half_the_bytes(ray_cluster, distill_env, lora_mode):
    from workflows.distill import run_distill
    from workflows.model_folder import load_model

    tmp = distill_env
    sets = {"deepspeed.precision": "bf16", "scaling.num_workers": 1, "train.student_steps": 2}
    if lora_mode:
        sets["lora.enabled"] = "true"
    cfg = load_config(DistillConfig, "tiny", tiny_overrides(tmp, **sets))
    summary = run_distill(cfg)
    run = _run(mlflow_client(tmp), cfg)
    assert metric_steps(mlflow_client(tmp), run.info.run_id) == [1, 2] and "eval.fd2" in run.data.metrics
    n = sum(p.numel() for p in load_model(DEFAULT_TEACHER).module.parameters())
    held = run.data.metrics["memory.weights_mib"] * 2**20
    if lora_mode:  # the one base in bf16 (2 bytes a weight) plus small adapters; in fp32 it is 4 bytes a weight
        assert 2 * n <= held < 3 * n
    else:  # teacher, student, fake teacher in bf16, the EMA in fp32: 10 bytes a weight; all fp32 would be 16
        assert 10 * n <= held < 11 * n
    student = load_model(summary["student_folder"])
    x, t, cond = _velocity_inputs(student)
    with torch.no_grad():
        assert torch.isfinite(student.velocity()(x, t, cond)).all()
