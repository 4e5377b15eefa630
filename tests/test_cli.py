"""The ``cdm`` command line: help for every command, one clear error line for bad input."""

import subprocess
import sys

import pytest

CDM = [sys.executable, "-m", "cdm_cli"]


def run(*args, timeout=300):
    return subprocess.run(CDM + list(args), capture_output=True, text=True, timeout=timeout)


def test_help_lists_commands():
    out = run("--help")
    assert out.returncode == 0
    for cmd in ("run", "pipeline", "eval", "sample", "teacher", "evaluator", "distill", "sweep", "promote", "serve"):
        assert cmd in out.stdout


@pytest.mark.parametrize(
    "cmd",
    [
        ["run"],
        ["pipeline"],
        ["config-reference"],
        ["eval"],
        ["sample"],
        ["teacher", "train"],
        ["evaluator", "train"],
        ["distill"],
        ["sweep"],
        ["promote"],
        ["serve"],
    ],
)
def test_every_command_has_help_with_examples(cmd):
    out = run(*cmd, "--help")
    assert out.returncode == 0, out.stderr
    assert "Example" in out.stdout
    # each example of the docstring's code block starts its own line of the rendered help (not run together)
    from typer.main import get_command

    from cdm_cli import app

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
    out = run(
        "sample",
        "workflows/assets/teacher-tiny",
        "--prompt",
        "a photo of a bag",
        "--n",
        "2",
        "--steps",
        "2",
        "--out",
        str(png),
    )
    assert out.returncode == 0, out.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_writes_json_and_grid(tmp_path):
    import json

    out = run(
        "eval",
        "workflows/assets/teacher-tiny",
        "--steps",
        "2",
        "--n-samples",
        "100",
        "--seeds",
        "0,1",
        "--reference-steps",
        "4",
        "--out",
        str(tmp_path),
    )
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


def test_promote_refuses_a_version_that_failed_the_gate_unless_forced(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(tracking_uri=uri)
    c.create_registered_model("m")
    v = c.create_model_version("m", str(tmp_path / "a"), tags={"cdm.gate": "failed", "cdm.gate.report": "FAIL  fd2"})
    out = run("promote", "m", "--version", str(v.version), "--tracking-uri", uri)
    err = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert out.returncode == 2 and len(err) == 1 and "failed the quality gate" in err[0] and "--force" in err[0]
    assert "champion" not in c.get_registered_model("m").aliases
    out = run("promote", "m", "--version", str(v.version), "--tracking-uri", uri, "--force")
    assert out.returncode == 0, out.stderr
    assert c.get_model_version_by_alias("m", "champion").version == v.version
    assert c.get_model_version("m", v.version).tags["cdm.promoted_to.champion.forced"].startswith("true")


def test_configuration_reference_is_current():
    """docs/configuration.md is what the typed configs generate; regenerate with `cdm config-reference`."""
    from cdm_cli.config_reference import DOC, render

    assert DOC.exists(), "run: cdm config-reference --out docs/configuration.md"
    assert DOC.read_text() == render(), "docs/configuration.md is stale: run cdm config-reference"
    for field in ("`gate.factor`", "`eval.select_by`", "`cdm.fake_mix`", "`max_batch_size`", "`budget.num_samples`"):
        assert field in DOC.read_text(), field


def _examples() -> list[tuple[str, list[str]]]:
    """(command path, argv after ``cdm``) of every fenced example in every command's help, including the
    ``ray job submit ... -- cdm ...`` and ``torchrun ... -m cdm_cli ...`` forms."""
    import shlex

    from typer.main import get_command

    from cdm_cli import app

    out = []

    def walk(group, path):
        for name, cmd in group.commands.items():
            if hasattr(cmd, "commands"):
                walk(cmd, path + [name])
                continue
            doc = (cmd.help or "").split("```")
            for block in doc[1::2]:
                for line in block.splitlines():
                    line = line.split("  #")[0].strip()
                    if " cdm " in f" {line} " or "-m cdm_cli " in line:
                        words = shlex.split(line)
                        i = next(k for k, w in enumerate(words) if w in ("cdm", "cdm_cli"))
                        out.append((" ".join(path + [name]), words[i + 1 :]))

    walk(get_command(app), [])
    return out


def test_every_help_example_parses_and_its_config_resolves():
    """Each example's options parse (click), and its --config/--set resolve to a valid config, as the command
    would load them (what a stale example such as ``--set num_samples=8`` fails)."""
    from typer.main import get_command

    from cdm_cli import app
    from workflows.config import TeacherTrainConfig, load_config
    from workflows.distill_config import DistillConfig

    examples = _examples()
    assert len(examples) >= 15, examples
    root = get_command(app)
    for path, argv in examples:
        cmd, words = root, path.split()
        assert argv[: len(words)] == words, (path, argv)
        for w in words:  # descend to the leaf command; click then parses its options and arguments
            cmd = cmd.commands[w]
        p = cmd.make_context(path, list(argv[len(words) :])).params
        if path in ("distill", "run", "pipeline", "teacher train") or path == "sweep":
            if path == "sweep":
                from tuning.sweep_config import load_sweep

                load_sweep(p["config"], list(p["set_"] or []))
            elif path == "teacher train":
                load_config(TeacherTrainConfig, p["config"], p["set_"])
            else:
                load_config(DistillConfig, p["config"], p["set_"])
        for key in ("model_dir",):  # folders an example names exist in a fresh clone, or are made by an example
            if key in p and str(p[key]).startswith("workflows/"):
                from pathlib import Path

                assert Path(p[key]).is_dir(), (path, argv)


def test_set_option_help_examples_resolve():
    """The ``--set`` option's own help example (``e.g. --set a.b=c``) is a valid override of its command."""
    import re

    from typer.main import get_command

    from cdm_cli import app
    from tuning.sweep_config import load_sweep
    from workflows.config import TeacherTrainConfig, load_config
    from workflows.distill_config import DistillConfig

    loaders = {
        "distill": lambda s: load_config(DistillConfig, "tiny", s),
        "run": lambda s: load_config(DistillConfig, "tiny", s),
        "pipeline": lambda s: load_config(DistillConfig, "tiny", s),
        "sweep": lambda s: load_sweep("sweep-tiny", s),
        "teacher": lambda s: load_config(TeacherTrainConfig, "teacher-tiny", s),
    }
    cmds = get_command(app).commands
    for name, load in loaders.items():
        cmd = cmds[name].commands["train"] if name == "teacher" else cmds[name]
        (opt,) = [o for o in cmd.params if o.name == "set_"]
        (example,) = re.findall(r"--set (\S+)", opt.help)
        load([example])


@pytest.mark.parametrize("path", ["sample", "sweep"])
def test_the_cheap_help_examples_run_as_written(path, tmp_path):
    """The examples that take seconds run verbatim (``cdm sample``'s writes its PNG; ``cdm sweep --dry-run``
    prints the plan); the others start jobs or servers and are covered by the tests of those jobs."""
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    argv = next(a for p, a in _examples() if p == path and (path != "sweep" or "--dry-run" in a))
    out = subprocess.run(CDM + argv, capture_output=True, text=True, timeout=300, cwd=repo)
    assert out.returncode == 0, out.stderr[-2000:]
    if path == "sample":
        assert (repo / "outputs" / "sample.png").stat().st_size > 100
    else:
        assert "trials" in out.stdout
