"""The ``cdm`` command line: help for every command, one clear error line for bad input."""

import subprocess
import sys

import pytest

CDM = [sys.executable, "-m", "workflows.cli"]


def run(*args, timeout=300):
    return subprocess.run(CDM + list(args), capture_output=True, text=True, timeout=timeout)


def test_help_lists_commands():
    out = run("--help")
    assert out.returncode == 0
    for cmd in ("run", "eval", "sample", "teacher", "evaluator", "distill", "sweep", "promote", "serve"):
        assert cmd in out.stdout


@pytest.mark.parametrize("cmd", [["run"], ["eval"], ["sample"], ["teacher", "train"], ["evaluator", "train"],
                                 ["distill"], ["sweep"], ["promote"], ["serve"]])
def test_every_command_has_help_with_examples(cmd):
    out = run(*cmd, "--help")
    assert out.returncode == 0, out.stderr
    assert "Example" in out.stdout
    # each example of the docstring's code block starts its own line of the rendered help (not run together)
    from typer.main import get_command

    from workflows.cli import app

    command = get_command(app)
    for name in cmd:
        command = command.commands[name]
    doc = command.help.split("```")
    examples = [ln.strip() for ln in doc[1].splitlines() if ln.strip()] if len(doc) >= 3 else []
    assert examples, f"{cmd}: no fenced examples in its docstring"
    shown = [ln.strip() for ln in out.stdout.splitlines()]
    for ex in examples:
        assert any(ln.startswith(ex[:40]) for ln in shown), f"{cmd}: example not on its own line: {ex}"


@pytest.mark.parametrize(
    "args, needle",
    [
        (["teacher", "train", "--config", "nope"], "unknown preset"),
        (["teacher", "train", "--set", "lr=-3", "--dry-run"], "lr:"),
        (["eval", "/nonexistent/model", "--n-samples", "10", "--seeds", "0"], "does not exist"),
        (["eval", "configs", "--n-samples", "10", "--seeds", "0"], "is not a model folder"),
        (["eval", "workflows/assets/teacher-tiny", "--steps", "0"], "steps:"),
        (["eval", "workflows/assets/teacher-tiny", "--seeds", "a,b"], "--seeds"),
    ],
)
def test_bad_input_gives_one_error_line(args, needle):
    out = run(*args)
    assert out.returncode == 2, (out.stdout, out.stderr)
    err = [ln for ln in out.stderr.strip().splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error:") and needle in err[0], out.stderr
    assert "Traceback" not in out.stderr


def test_dry_run_prints_resolved_config():
    out = run("teacher", "train", "--set", "steps=5", "--dry-run")
    assert out.returncode == 0 and '"steps": 5' in out.stdout


def test_sample_writes_png(tmp_path):
    png = tmp_path / "s.png"
    out = run("sample", "workflows/assets/teacher-tiny", "--prompt", "a photo of a bag", "--n", "2",
              "--steps", "2", "--out", str(png))
    assert out.returncode == 0, out.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_writes_json_and_grid(tmp_path):
    import json

    out = run("eval", "workflows/assets/teacher-tiny", "--steps", "2", "--n-samples", "100", "--seeds", "0,1",
              "--reference-steps", "4", "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr
    res = json.loads((tmp_path / "eval.json").read_text())
    for k in ("fd", "adherence", "precision", "recall", "hf_gap", "mse_to_teacher100"):
        assert set(res[k]) == {"mean", "std"}
    assert len(res["per_seed"]) == 2 and res["per_seed"][0]["fd"] != res["per_seed"][1]["fd"]
    assert (tmp_path / "grid.png").exists()


def test_promote_moves_champion_to_the_candidate(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(tracking_uri=uri)
    c.create_registered_model("m")
    v1 = c.create_model_version("m", str(tmp_path / "a"))
    v2 = c.create_model_version("m", str(tmp_path / "b"))
    c.set_registered_model_alias("m", "candidate", v2.version)
    out = run("promote", "m", "--tracking-uri", uri)
    assert out.returncode == 0, out.stderr
    assert c.get_model_version_by_alias("m", "champion").version == v2.version
    out = run("promote", "m", "--version", str(v1.version), "--tracking-uri", uri)
    assert out.returncode == 0 and c.get_model_version_by_alias("m", "champion").version == v1.version
    bad = run("promote", "nope", "--tracking-uri", uri)
    err = [ln for ln in bad.stderr.splitlines() if ln.strip()]
    assert bad.returncode == 2 and len(err) == 1 and err[0].startswith("error: promote:"), bad.stderr
