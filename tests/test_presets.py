"""The SD3-Medium and LongCat-Image presets: they load and validate, ``--dry-run`` prints the resource plan (also
without the teacher folder on this machine, naming what would stop the job), and bad teacher folders give one
clear error line each."""

import json
import subprocess
import sys

import pytest

from tests.tiny_pipelines import build_tiny_longcat, build_tiny_sd3

CDM = [sys.executable, "-m", "cdm_cli"]


def _dry_run(*args):
    out = subprocess.run(CDM + ["distill", "--dry-run", *args], capture_output=True, text=True, timeout=300)
    body = out.stdout[out.stdout.index('{\n  "job_key"') :]
    return out.returncode, json.loads(body), out


@pytest.mark.parametrize("preset, cls", [("sd3-medium", "SD3Transformer2DModel"), ("longcat-image", "Long")])
def test_presets_load_with_the_papers_recipe_and_plan_their_memory(preset, cls):
    from workflows.config import load_config
    from workflows.distill_config import DistillConfig

    cfg = load_config(DistillConfig, preset)
    assert cfg.cdm.alpha == 7.0 and cfg.cdm.n_max == 28 and cfg.optim.lr_student == 1e-5
    assert cfg.optim.lr_student * cfg.optim.fake_lr_ratio == 5e-6 and cfg.cdm.update_ratio == 2
    assert cfg.deepspeed.precision == "bf16" and cfg.scaling.use_gpu and cfg.train.gradient_checkpointing
    rc, full, _ = _dry_run("--config", preset)
    assert rc == 2 and any("teacher:" in p for p in full["problems"])  # the folder is not on this machine
    m = full["memory_per_gpu"]
    assert m["transformer"].startswith(cls) and "reference" in m["config_from"]
    assert m["total_gib"] == pytest.approx(sum(m["terms_gib"].values()))
    rc, lora, _ = _dry_run("--config", preset, "--set", "lora.enabled=true", "--set", "deepspeed.zero_stage=2")
    assert lora["memory_per_gpu"]["total_gib"] < full["memory_per_gpu"]["total_gib"]
    assert lora["memory_per_gpu"]["trainable_params_per_network"] < 0.05 * m["n_params"]


def test_dry_run_of_a_real_folder_has_no_problems_and_reads_its_config(tmp_path):
    folder = build_tiny_sd3(tmp_path / "sd3")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a bag\n")
    rc, out, raw = _dry_run("--config", "sd3-medium", "--set", f"teacher={folder}", "--set", f"prompts={prompts}")
    assert rc == 0 and out["problems"] == [], raw.stderr
    assert out["memory_per_gpu"]["config_from"] == str(folder) and out["prompts"] == 1


def test_bad_teacher_folders_give_one_error_line_each(tmp_path):
    longcat = build_tiny_longcat(tmp_path / "lc")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a bag\n")
    not_pipeline = tmp_path / "plain"
    (not_pipeline / "transformer").mkdir(parents=True)
    (not_pipeline / "transformer" / "config.json").write_text(json.dumps({"_class_name": "SD3Transformer2DModel"}))
    cases = [
        (tmp_path / "missing", "does not exist"),
        (not_pipeline, "not a pipeline folder"),
        (longcat, "is a LongCatImagePipeline folder; this preset expects a StableDiffusion3Pipeline"),
    ]
    for folder, needle in cases:
        out = subprocess.run(
            CDM + ["distill", "--config", "sd3-medium", "--set", f"teacher={folder}", "--set", f"prompts={prompts}"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        err = [ln for ln in out.stderr.splitlines() if ln.strip()]
        assert out.returncode == 2 and len(err) == 1 and err[0].startswith("error: teacher:"), out.stderr
        assert needle in err[0], err[0]
