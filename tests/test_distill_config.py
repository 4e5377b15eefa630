"""Distillation config and job inputs: bad input gives one clear error naming the problem (no Ray needed)."""

import pytest

from workflows.checkpoints import check as check_checkpoint
from workflows.config import ConfigError, load_config
from workflows.distill import job_key, load_prompts, teacher_path
from workflows.distill_config import DistillConfig


def test_tiny_preset_resolves_to_core_config():
    cfg = load_config(DistillConfig, "tiny")
    core = cfg.cdm.to_core()
    assert core.n_max == cfg.cdm.n_max and core.alpha == cfg.cdm.alpha
    assert job_key(cfg) == job_key(load_config(DistillConfig, "tiny"))
    assert job_key(cfg) != job_key(load_config(DistillConfig, "tiny", ["cdm.alpha=0.5"]))


def test_every_algorithm_knob_is_settable_from_the_one_config():
    cfg = load_config(
        DistillConfig,
        "tiny",
        [
            "cdm.tau_min=0.05",
            "cdm.tau_max=0.9",
            "cdm.ca_tau_max=0.7",
            "cdm.norm_floor=0.01",
            "cdm.fake_mix=0.5",
            "cdm.gaussian_base=anchor",
            "optim.lr_decay=cosine",
            "optim.min_lr_ratio=0.1",
        ],
    )
    core = cfg.cdm.to_core()
    assert (core.tau_min, core.tau_max, core.ca_tau_max, core.norm_floor, core.fake_mix, core.gaussian_base) == (
        0.05,
        0.9,
        0.7,
        0.01,
        0.5,
        "anchor",
    )
    assert cfg.optim.lr_decay == "cosine" and cfg.optim.min_lr_ratio == 0.1
    import dataclasses

    from cdm_core.step import CDMConfig

    # the typed config and the core dataclass hold the same fields: none is unreachable from YAML / --set
    assert set(type(cfg.cdm).model_fields) == {f.name for f in dataclasses.fields(CDMConfig)}


@pytest.mark.parametrize(
    "override, field",
    [
        (["cdm.n_max=0"], "cdm.n_max"),
        (["deepspeed.zero_stage=1"], "deepspeed.zero_stage"),
        (["scaling.num_workers=0"], "scaling.num_workers"),
        (["optim.lr_student=0"], "optim.lr_student"),
        (["cdm.s_min=0.9", "cdm.s_max=0.5"], "cdm"),
        (["cdm.use_ca=false", "cdm.use_dm=false", "cdm.use_cdm=false"], "cdm"),
        (["name=has space"], "name"),
        (["train.bogus=1"], "train.bogus"),
        (["eval.val_every=0", "eval.keep_best=true"], "eval"),
        (["cdm.fake_mix=2"], "cdm.fake_mix"),
        (["cdm.tau_min=0.9", "cdm.tau_max=0.5"], "cdm"),
        (["optim.lr_decay=linear"], "optim.lr_decay"),
        (["eval.select_by=mse"], "eval.select_by"),
    ],
)
def test_out_of_range_values_name_the_field(override, field):
    with pytest.raises(ConfigError) as e:
        load_config(DistillConfig, "tiny", override)
    assert str(e.value).startswith(field), str(e.value)


def test_teacher_that_is_not_a_model_folder(tmp_path):
    cfg = load_config(DistillConfig, "tiny", [f"teacher={tmp_path}"])
    with pytest.raises(ValueError, match="^teacher: .*is not a model folder"):
        teacher_path(cfg)


def test_prompt_file_errors(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match="holds no prompt"):
        load_prompts(load_config(DistillConfig, "tiny", [f"prompts={empty}"]))
    with pytest.raises(FileNotFoundError, match="is not a file"):
        load_prompts(load_config(DistillConfig, "tiny", [f"prompts={tmp_path / 'missing.txt'}"]))
    ok = tmp_path / "p.txt"
    ok.write_text("a photo of a bag\n\na photo of a coat\n")
    assert load_prompts(load_config(DistillConfig, "tiny", [f"prompts={ok}"])) == [
        "a photo of a bag",
        "a photo of a coat",
    ]


def test_corrupt_checkpoint_is_named(tmp_path):
    ck = tmp_path / "step_00000010"
    ck.mkdir()
    (ck / "meta.json").write_text("{not json")
    with pytest.raises(RuntimeError, match="step_00000010 is corrupt: meta.json"):
        check_checkpoint(ck)
