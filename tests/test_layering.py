"""The import direction of the packages, and the model seam, checked on the source (every import, also the
lazy ones inside functions): ``cdm_cli`` -> ``serving``, ``tuning`` -> ``workflows`` -> ``cdm_core``."""

import ast
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ORCHESTRATION = {"ray", "mlflow", "deepspeed", "diffusers", "transformers", "peft"}
FORBIDDEN = {
    "cdm_core": {"workflows", "serving", "tuning", "cdm_cli"} | ORCHESTRATION,
    "workflows": {"serving", "tuning", "cdm_cli"},
    "serving": {"tuning", "cdm_cli"},
    "tuning": {"serving", "cdm_cli"},
}


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_import_runs_back_up_the_layers(package):
    files = sorted((REPO / package).rglob("*.py"))
    assert files
    bad = {str(f.relative_to(REPO)): sorted(imported_packages(f) & FORBIDDEN[package]) for f in files}
    bad = {k: v for k, v in bad.items() if v}
    assert not bad, f"{package} imports what it must not: {bad}"


def test_the_checker_sees_lazy_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from tuning.sweep import main\n    import ray.train\n")
    assert imported_packages(f) == {"tuning", "ray"}


def test_only_the_model_seam_names_a_model_class():
    """The only production modules that name a model class: ``cdm_core/models`` (the adapters),
    ``workflows/model_folder.py`` (the loader), ``workflows/pipeline_folders.py`` (the pipeline classes of each
    family's folders) and ``workflows/memory_plan.py`` / ``resource_plan.py`` (parameter counts from configs);
    everything else goes through the family handle. Tests and benchmarks build tiny or config-sized models."""
    out = subprocess.run(
        ["git", "grep", "-n", "-E", r"SD3Transformer2DModel|SD3Velocity|LongCatImageTransformer2DModel", "--", "*.py"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    allowed = re.compile(
        r"^(cdm_core/models/|workflows/(model_folder|pipeline_folders|memory_plan|resource_plan)\.py|tests/|benchmarks/)"
    )
    hits = [ln for ln in out.stdout.splitlines() if not allowed.match(ln)]
    assert not hits, "\n".join(hits)


def test_no_module_is_over_300_lines():
    long = {
        str(f.relative_to(REPO)): n
        for pkg in ("cdm_core", "workflows", "serving", "tuning", "cdm_cli")
        for f in (REPO / pkg).rglob("*.py")
        if (n := len(f.read_text().splitlines())) > 300
    }
    assert not long, long
