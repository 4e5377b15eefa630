"""SD3 and LongCat-Image pipeline folders (tiny, built from configs in ``tests/tiny_pipelines.py``): the project's
loader, the LongCat adapter against the pipeline's own packing and ids, prompt embeddings with the pipeline's text
encoders on Ray Data, a few distillation steps on Ray Train + DeepSpeed in latent space, and the export loaded by
plain diffusers in a fresh process."""

import json
import subprocess
import sys

import pytest
import torch

from tests.distill_helpers import mlflow_client, tiny_overrides
from tests.tiny_pipelines import build_tiny_longcat, build_tiny_sd3

LONGCAT_IMAGE = 64  # the tiny LongCat folder trains at 64 px (cdm_model.json), 8 x 8 latents


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    d = tmp_path_factory.mktemp("pipelines")
    sd3 = build_tiny_sd3(d / "sd3")
    longcat = build_tiny_longcat(d / "longcat")
    (longcat / "cdm_model.json").write_text(json.dumps({"image_size": LONGCAT_IMAGE}))
    return {"sd3": sd3, "longcat": longcat}


def test_loader_opens_both_pipelines_with_their_family_and_latent_shape(tiny_folders):
    from workflows.model_folder import load_model

    sd3 = load_model(tiny_folders["sd3"])
    assert sd3.family.name == "sd3" and sd3.meta.latent and sd3.shape == (16, 8, 8)
    lc = load_model(tiny_folders["longcat"])
    assert lc.family.name == "longcat" and lc.meta.latent and lc.shape == (16, 8, 8)


def test_only_the_longcat_scheduler_shifts_by_image_size(tiny_folders):
    # compare.py gives a teacher a second 4-step row "at its own shift" only when it has one static shift
    from workflows.model_folder import dynamic_shifting

    assert dynamic_shifting(tiny_folders["longcat"]) and not dynamic_shifting(tiny_folders["sd3"])


def test_longcat_velocity_equals_the_pipeline_call_on_packed_latents(tiny_folders):
    from diffusers import LongCatImagePipeline

    from cdm_core.conditioning import Cond
    from workflows.model_folder import load_model

    pipe = LongCatImagePipeline.from_pretrained(str(tiny_folders["longcat"]))
    emb, tids = pipe.encode_prompt(["a red bag"])
    g = torch.Generator().manual_seed(0)
    packed, iids = pipe.prepare_latents(1, 16, LONGCAT_IMAGE, LONGCAT_IMAGE, emb.dtype, "cpu", g)
    t = torch.tensor([0.7])
    with torch.no_grad():
        ref = pipe.transformer(
            hidden_states=packed, timestep=t, encoder_hidden_states=emb, txt_ids=tids, img_ids=iids, return_dict=False
        )[0]
        x = pipe._unpack_latents(packed, LONGCAT_IMAGE, LONGCAT_IMAGE, pipe.vae_scale_factor)
        h = load_model(tiny_folders["longcat"])
        v = h.velocity()(x, t, Cond(emb, torch.zeros(1, 1)))
    assert v.shape == x.shape == (1, *h.shape)
    assert torch.equal(pipe._pack_latents(v, 1, 16, 8, 8), ref)


def test_pipeline_text_encoders_give_the_pipelines_embeddings(tiny_folders):
    from workflows.pipeline_folders import PipelineTextEncoder

    c = PipelineTextEncoder(tiny_folders["sd3"]).encode(["a sneaker", ""])
    assert c.tokens.shape == (2, 333, 128) and c.pooled.shape == (2, 96)
    c = PipelineTextEncoder(tiny_folders["longcat"]).encode(["a sneaker"])
    assert c.tokens.shape == (1, 512, 32)


PLAIN_DIFFUSERS = """
import json, sys, numpy as np, torch
from diffusers import DiffusionPipeline
folder = sys.argv[1]
card = json.load(open(folder + "/cdm_model.json"))
pipe = DiffusionPipeline.from_pretrained(folder)
sig = card["inference_sigmas"]
pipe.scheduler.set_timesteps(sigmas=sig)
assert len(sig) == 4 and [round(float(s), 6) for s in pipe.scheduler.sigmas[:-1]] == sig, (pipe.scheduler.sigmas, sig)
kw = dict(enable_prompt_rewrite=False) if "LongCat" in type(pipe).__name__ else {}
out = pipe("a photo of a bag", num_inference_steps=len(sig), guidance_scale=1.0, sigmas=sig, height=64, width=64,
           output_type="np", generator=torch.Generator().manual_seed(0), **kw).images
assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()
print("OK", type(pipe).__name__, len(sig))
"""


LORA_ALONE = """
import sys, torch
from diffusers import DiffusionPipeline
teacher, student = sys.argv[1], sys.argv[2]
pipe = DiffusionPipeline.from_pretrained(teacher)
pipe.load_lora_weights(student + "/lora_adapter", weight_name="pytorch_lora_weights.safetensors")
pipe.fuse_lora()
pipe.unload_lora_weights()
merged = DiffusionPipeline.from_pretrained(student).transformer
d = max((a - b).abs().max().item() for a, b in zip(pipe.transformer.parameters(), merged.parameters()))
assert d < 1e-5, d
print("OK lora", d)
"""


@pytest.mark.parametrize("kind", ["sd3", "longcat", "sd3-lora"])
def test_pipeline_folder_distills_on_ray_and_its_export_runs_in_plain_diffusers(
    kind, tiny_folders, ray_cluster, distill_env
):
    from workflows.config import load_config
    from workflows.distill import run_distill
    from workflows.distill_config import DistillConfig

    prompts = distill_env / "prompts.txt"
    prompts.write_text("a photo of a bag\na red sneaker\na striped shirt\na pair of trousers\n")
    lora = kind.endswith("-lora")
    folder = tiny_folders[kind.removesuffix("-lora")]
    extra = {"train.batch_size_per_worker": 2, "train.student_steps": 2, "train.checkpoint_every": 1}
    if lora:
        extra.update({"lora.enabled": "true", "lora.rank": 4})
    sets = tiny_overrides(distill_env, teacher=str(folder), prompts=str(prompts), name=f"tiny-{kind}", **extra)
    s = run_distill(load_config(DistillConfig, "tiny", sets))
    c = mlflow_client(distill_env)
    mv = c.get_model_version(s["model"], s["version"])
    assert mv.tags["cdm.export.selection"] == "last" and mv.tags["cdm.export.student_steps"] == "2"
    from workflows.prompt_store import PromptStore

    (store,) = (distill_env / "runs" / "embeddings").glob("emb-*")
    emb = PromptStore(store).shard
    assert emb.tokens.shape[:2] == ((4, 512) if kind == "longcat" else (4, 333))
    out = subprocess.run(
        [sys.executable, "-I", "-c", PLAIN_DIFFUSERS, s["student_folder"]], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]
    if lora:  # the adapter alone, on the user's own pipeline, is the merged export
        argv = [sys.executable, "-I", "-c", LORA_ALONE, str(folder), s["student_folder"]]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0 and "OK lora" in out.stdout, out.stderr[-3000:]
