"""Config loading: presets, overrides, and errors that name the field."""

import pytest

from workflows.config import ConfigError, EvalConfig, TeacherTrainConfig, build, flatten, load_config, parse_overrides


def test_preset_loads_and_overrides_apply():
    cfg = load_config(TeacherTrainConfig, "teacher-tiny", ["steps=7", "model.num_layers=2", "device=cpu"])
    assert cfg.steps == 7 and cfg.model.num_layers == 2 and cfg.model.patch_size == 4


@pytest.mark.parametrize(
    "override, field",
    [
        (["model.patch_size=0"], "model.patch_size"),
        (["lr=-1"], "lr"),
        (["cfg_dropout=1.5"], "cfg_dropout"),
        (["time_sampling=cosine"], "time_sampling"),
        (["model.bogus=1"], "model.bogus"),
        (["stepz=3"], "stepz"),
    ],
)
def test_invalid_values_name_the_field(override, field):
    with pytest.raises(ConfigError) as e:
        load_config(TeacherTrainConfig, "teacher-tiny", override)
    assert str(e.value).startswith(field + ":"), str(e.value)


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ConfigError, match="unknown preset.*teacher-tiny"):
        load_config(TeacherTrainConfig, "no-such-preset")


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_overrides(["steps"])


def test_eval_config_ranges():
    with pytest.raises(ConfigError, match="^steps:"):
        build(EvalConfig, {"steps": 0})
    with pytest.raises(ConfigError, match="^seeds:"):
        build(EvalConfig, {"seeds": []})


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": 3}) == {"a.b": 1, "a.c.d": 2, "e": 3}
