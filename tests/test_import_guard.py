"""cdm_core stays torch-only: importing every module must not pull in Ray, MLflow or DeepSpeed."""

import pkgutil
import subprocess
import sys

import cdm_core


def test_cdm_core_imports_no_orchestration_packages():
    mods = [m.name for m in pkgutil.walk_packages(cdm_core.__path__, "cdm_core.")]
    assert len(mods) >= 8
    code = (
        "import sys, importlib\n"
        f"for m in {mods!r}: importlib.import_module(m)\n"
        "bad = sorted(k for k in sys.modules if k.split('.')[0] in "
        "{'ray', 'mlflow', 'deepspeed', 'workflows', 'serving', 'tuning', 'diffusers', 'transformers'})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"cdm_core imported: {out.stdout.strip()}"
