"""The memory planner: its parameter counts against real modules and peft, and the sharding rules of its terms."""

from __future__ import annotations

import itertools

import pytest
import torch

from cdm_core.models import tiny_sd3_config
from workflows import memory_plan as mp
from workflows.model_folder import CLASS_OF, new_model

SD3 = CLASS_OF["sd3"]
LONGCAT = CLASS_OF["longcat"]
TINY_LONGCAT = dict(
    patch_size=1,
    in_channels=8,
    num_layers=1,
    num_single_layers=2,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=16,
    pooled_projection_dim=16,
    axes_dims_rope=[2, 2, 4],
)
# the tiny teacher's shape, plus the two optional SD3(.5) features (dual attention, q/k RMSNorm) that add modules
TINY_SD3_VARIANTS = [tiny_sd3_config(), {**tiny_sd3_config(), "dual_attention_layers": (0,), "qk_norm": "rms_norm"}]


def real_module(class_name: str, config: dict) -> torch.nn.Module:
    """The module itself, built through the platform's loader seam (the family of that diffusers class)."""
    return new_model({cls: fam for fam, cls in CLASS_OF.items()}[class_name], config)


@pytest.mark.parametrize(
    "class_name, config", [(SD3, c) for c in TINY_SD3_VARIANTS] + [(LONGCAT, TINY_LONGCAT)], ids=["sd3", "sd3.5", "lc"]
)
def test_meta_count_equals_the_instantiated_module(class_name, config):
    module = real_module(class_name, config)
    assert mp.count_params(class_name, config) == sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(
    "class_name, config", [(SD3, TINY_SD3_VARIANTS[1]), (LONGCAT, TINY_LONGCAT)], ids=["sd3", "lc"]
)
def test_lora_count_equals_what_peft_adds(class_name, config):
    from peft import LoraConfig, inject_adapter_in_model

    module = real_module(class_name, config)
    before = sum(p.numel() for p in module.parameters())
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=list(mp.LORA_TARGETS)), module)
    added = sum(p.numel() for p in module.parameters()) - before
    assert added > 0
    assert mp.lora_params(class_name, config, rank=4) == added
    assert mp.lora_params(class_name, config, rank=8) == 2 * added  # linear in the rank


def test_sd3_medium_is_about_two_billion_parameters():
    """Stability AI calls SD3-Medium a 2B model; the transformer alone is 2.03B (24 MM-DiT blocks of width 1536
    plus embedders): a range of 1.9e9-2.2e9 catches a wrong width (1152: 18 blocks of SD3's smaller default)
    or depth (e.g. 38 for SD3.5-Large)."""
    cls, cfg = mp.BACKBONES["sd3-medium"]
    assert 1.9e9 <= mp.count_params(cls, cfg) <= 2.2e9


def test_longcat_image_is_about_six_billion_parameters():
    """LongCat-Image is announced as a 6B model; the class defaults (FLUX.1's 19 + 38 blocks) would be ~11.9B."""
    cls, cfg = mp.BACKBONES["longcat-image"]
    assert 5.5e9 <= mp.count_params(cls, cfg) <= 6.5e9


def _plan(**kw) -> dict:
    base = dict(n_params=2_000_000_000, micro_batch=16, activation_bytes_per_sample=2**28, lora_params=40_000_000)
    return mp.plan(**{**base, **kw})


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_zero3_partitions_the_trained_weights_and_zero2_does_not(mode):
    t = {n: {s: _plan(mode=mode, zero_stage=s, n_gpus=n)["terms_gib"] for s in (2, 3)} for n in (1, 8)}
    assert t[8][2]["trainable"] == pytest.approx(t[1][2]["trainable"])  # ZeRO-2: full copies on every GPU
    assert t[8][3]["trainable"] == pytest.approx(t[1][3]["trainable"] / 8)
    for term in ("gradients", "optimizer"):  # both stages partition these
        assert t[8][2][term] == pytest.approx(t[1][2][term] / 8) == pytest.approx(t[8][3][term])


def test_the_frozen_base_is_partitioned_only_where_an_engine_holds_it():
    full3, lora3, lora2 = (
        _plan(mode=m, zero_stage=s)["terms_gib"]["base"] for m, s in [("full", 3), ("lora", 3)] + [("lora", 2)]
    )
    assert full3 == pytest.approx(lora2)  # full mode: the real teacher is a plain module on every rank
    assert lora3 == pytest.approx(lora2 / 8)  # LoRA: the base is inside the ZeRO-3 engine
    assert _plan(zero_stage=3, teacher_sharded=True)["terms_gib"]["base"] == pytest.approx(full3 / 8)


def test_lora_mode_holds_one_base_and_scales_with_the_adapter_only():
    full, lora = _plan(mode="full")["terms_gib"], _plan(mode="lora")["terms_gib"]
    assert full["trainable"] == pytest.approx(2 * full["base"])  # full: teacher + student + fake = 3 copies
    assert lora["base"] == pytest.approx(full["base"])  # LoRA: that one copy, nothing else of base size
    doubled = _plan(mode="lora", lora_params=80_000_000)["terms_gib"]
    bigger_base = _plan(mode="lora", n_params=4_000_000_000)["terms_gib"]
    for term in ("trainable", "gradients", "optimizer", "ema"):
        assert doubled[term] == pytest.approx(2 * lora[term])
        assert bigger_base[term] == pytest.approx(lora[term])
        assert lora[term] < full[term] / 40  # 2B vs 40M: the adapter, not the base, sets these terms


def test_optimizer_states_are_twelve_bytes_per_weight_in_bf16_and_in_fp32():
    """Two fp32 moments plus the flat fp32 partition ZeRO steps: a copy beside the module's weights in fp32 too
    (memory_jobs.md measures it: 18 MiB of masters for the 2.4 M-weight student and fake teacher in fp32)."""
    bf16 = _plan(n_gpus=1, precision="bf16")["terms_gib"]["optimizer"]
    fp32 = _plan(n_gpus=1, precision="fp32")["terms_gib"]["optimizer"]
    assert bf16 * mp.GIB == pytest.approx(2 * 2e9 * 12) and fp32 * mp.GIB == pytest.approx(2 * 2e9 * 12)


def test_every_term_is_non_negative_and_the_total_is_their_sum():
    grid = itertools.product(["full", "lora"], [2, 3], [1, 8], ["bf16", "fp32"], [True, False])
    for mode, stage, n, prec, ema0 in grid:
        r = _plan(mode=mode, zero_stage=stage, n_gpus=n, precision=prec, ema_on_rank0=ema0, text_encoder_params=10**8)
        assert all(v >= 0 for v in r["terms_gib"].values()), r
        assert r["total_gib"] == pytest.approx(sum(r["terms_gib"].values()))
        assert (r["terms_gib"]["zero3_gather"] > 0) == (stage == 3)


@pytest.mark.parametrize(
    "bad", [dict(mode="qlora"), dict(zero_stage=1), dict(precision="fp16"), dict(mode="lora", lora_params=0)]
)
def test_bad_inputs_are_refused(bad):
    with pytest.raises(ValueError):
        _plan(**bad)


def test_checkpointing_keeps_less_than_the_whole_graph():
    kw = dict(tokens=4429, hidden=1536, num_layers=24)
    ckpt, whole = mp.dit_activation_bytes(**kw), mp.dit_activation_bytes(**kw, checkpointing=False)
    assert ckpt < whole / 5
    assert mp.dit_activation_bytes(**kw, mode="lora", checkpointing=False) < whole
    assert mp.dit_activation_bytes(**kw, graphs=1, checkpointing=False) * 2 == whole


def _tiny_inputs(device: str, b: int = 2) -> dict:
    g = torch.Generator().manual_seed(0)
    cfg = tiny_sd3_config()
    x = torch.randn(b, cfg["in_channels"], cfg["sample_size"], cfg["sample_size"], generator=g)
    tokens = torch.randn(b, 16, cfg["joint_attention_dim"], generator=g)
    pooled = torch.randn(b, cfg["pooled_projection_dim"], generator=g)
    t = torch.full((b,), 500.0)
    d = dict(hidden_states=x, timestep=t, encoder_hidden_states=tokens, pooled_projections=pooled, return_dict=False)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in d.items()}


def test_the_meta_trace_counts_what_the_real_module_saves():
    """The meta-device trace (how the projection sizes SD3-Medium without memory) equals the same trace of the
    real tiny module on the CPU, and the per-layer constant it implies is near the formula's."""
    cfg = tiny_sd3_config()
    real = new_model("sd3", cfg)
    on_cpu = mp.traced_activation_bytes(real, _tiny_inputs("cpu"))
    on_meta = mp.traced_activation_bytes(mp.meta_model(SD3, cfg), _tiny_inputs("meta"))
    assert on_meta == on_cpu
    s = mp.dit_tokens(cfg["sample_size"], cfg["patch_size"], 16)
    c = on_cpu / (2 * 4 * cfg["num_layers"] * s * cfg["num_attention_heads"] * cfg["attention_head_dim"])
    assert 0.5 * mp.ELEMS_PER_LAYER["full"] < c < 1.5 * mp.ELEMS_PER_LAYER["full"], c  # fp32: 4 bytes, batch 2
