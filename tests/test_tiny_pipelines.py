"""The tiny SD3 / LongCat-Image pipeline folders load with plain diffusers in a fresh interpreter and generate.

Each test builds a folder into tmp_path, then runs ``DiffusionPipeline.from_pretrained(folder)`` in a separate
``python -I -c`` process (isolated: no project imports, no cwd on sys.path, hub offline) and checks what it reports.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
from tiny_pipelines import build_tiny_longcat, build_tiny_sd3, folder_size

MAX_FOLDER_BYTES = 5 * 1024 * 1024
HEIGHT, WIDTH = 64, 96  # non-square, so a height/width swap would show

_COMMON = r"""
import json, sys
import torch
torch.set_num_threads(1)
import PIL.Image
from diffusers import DiffusionPipeline

folder, height, width = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
pipe = DiffusionPipeline.from_pretrained(folder)
pipe.set_progress_bar_config(disable=True)
report = {"class": type(pipe).__name__, "transformer": type(pipe.transformer).__name__}
seen = []
_forward = pipe.transformer.forward
def _spy(*args, **kwargs):
    seen.append({k: list(v.shape) for k, v in kwargs.items() if torch.is_tensor(v)})
    return _forward(*args, **kwargs)
pipe.transformer.forward = _spy
def _image(out):
    image = out.images[0]
    return {"type": type(image).__module__ + "." + type(image).__name__, "size": list(image.size), "mode": image.mode}
"""

_SD3 = (
    _COMMON
    + r"""
out = pipe("a photo of a cat", num_inference_steps=2, guidance_scale=1.0, height=height, width=width,
           generator=torch.Generator("cpu").manual_seed(0))
report["image"] = _image(out)
report["calls"] = list(seen)
pe, npe, pooled, npooled = pipe.encode_prompt("a photo of a cat", None, None, do_classifier_free_guidance=True)
report["encode"] = [list(pe.shape), list(npe.shape), list(pooled.shape), list(npooled.shape), str(pe.dtype)]
print("REPORT " + json.dumps(report))
"""
)

_LONGCAT = (
    _COMMON
    + r"""
out = pipe("a photo of a cat", num_inference_steps=2, guidance_scale=1.0, height=height, width=width,
           enable_prompt_rewrite=False, generator=torch.Generator("cpu").manual_seed(0))
report["image"] = _image(out)
report["calls"] = list(seen)
pe, text_ids = pipe.encode_prompt("a photo of a cat")
report["encode"] = [list(pe.shape), list(text_ids.shape), str(pe.dtype)]
# The default path (enable_prompt_rewrite=True) runs text_encoder.generate through text_processor too.
out = pipe("a cat", num_inference_steps=1, guidance_scale=1.0, height=height, width=width)
report["rewrite_image"] = _image(out)
print("REPORT " + json.dumps(report))
"""
)


def _run_fresh(code: str, folder, tmp_path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-I", "-c", code, str(folder), str(HEIGHT), str(WIDTH)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("REPORT ")]
    assert lines, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads(lines[-1][len("REPORT ") :])


def _expected_image():
    return {"type": "PIL.Image.Image", "size": [WIDTH, HEIGHT], "mode": "RGB"}


def test_tiny_sd3_loads_and_generates(tmp_path):
    folder = build_tiny_sd3(tmp_path / "sd3", seed=0)
    assert (folder / "model_index.json").is_file()
    assert folder_size(folder) < MAX_FOLDER_BYTES

    report = _run_fresh(_SD3, folder, tmp_path)

    assert report["class"] == "StableDiffusion3Pipeline"
    assert report["transformer"] == "SD3Transformer2DModel"
    assert report["image"] == _expected_image()
    # guidance_scale=1.0 -> no CFG: one transformer call per step, batch 1, latents unpacked (B, 16, H/8, W/8)
    assert len(report["calls"]) == 2
    assert report["calls"][0] == {
        "hidden_states": [1, 16, HEIGHT // 8, WIDTH // 8],
        "timestep": [1],
        "encoder_hidden_states": [1, 77 + 256, 128],
        "pooled_projections": [1, 96],
    }
    assert report["encode"] == [[1, 333, 128], [1, 333, 128], [1, 96], [1, 96], "torch.float32"]


def test_tiny_longcat_loads_and_generates(tmp_path):
    folder = build_tiny_longcat(tmp_path / "longcat", seed=0)
    assert (folder / "model_index.json").is_file()
    assert folder_size(folder) < MAX_FOLDER_BYTES

    report = _run_fresh(_LONGCAT, folder, tmp_path)

    assert report["class"] == "LongCatImagePipeline"
    assert report["transformer"] == "LongCatImageTransformer2DModel"
    assert report["image"] == _expected_image()
    assert report["rewrite_image"] == _expected_image()
    # guidance_scale=1.0 -> no CFG: one call per step; latents packed 2x2 -> (B, (H/16)*(W/16), 64)
    n_img = (HEIGHT // 16) * (WIDTH // 16)
    assert len(report["calls"]) == 2
    assert report["calls"][0] == {
        "hidden_states": [1, n_img, 64],
        "timestep": [1],
        "encoder_hidden_states": [1, 512, 32],
        "txt_ids": [512, 3],
        "img_ids": [n_img, 3],
    }
    assert report["encode"] == [[1, 512, 32], [512, 3], "torch.float32"]


def _digest(folder) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*.safetensors")):
        h.update(path.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("build", [build_tiny_sd3, build_tiny_longcat], ids=["sd3", "longcat"])
def test_builders_are_seeded(tmp_path, build):
    a, b, c = build(tmp_path / "a", seed=0), build(tmp_path / "b", seed=0), build(tmp_path / "c", seed=1)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)
