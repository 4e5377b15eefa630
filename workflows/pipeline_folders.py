"""Diffusers pipeline folders a platform team brings: SD3-Medium (``StableDiffusion3Pipeline``) and LongCat-Image
(``LongCatImagePipeline``), loaded from a local folder (never a hub), trained in latent space.

What this module owns, per pipeline class (``PIPELINES``), using the pipeline's own code where diffusers has it:
- prompt encoding with the pipeline's text encoders (``encode_prompt``), for the Ray Data embedding job;
- latents -> images through the pipeline's VAE (``latents / scaling_factor + shift_factor``), for sample grids;
- the export: the user's folder copied, the transformer replaced by the EMA student, and a scheduler whose
  ``set_timesteps(sigmas=...)`` runs the student's levels exactly (shift 1, no dynamic shifting: the levels
  are already shifted), so ``DiffusionPipeline.from_pretrained(folder)`` reproduces the student with
  ``pipe(prompt, num_inference_steps=K, guidance_scale=1.0, sigmas=LEVELS)`` (the levels are in
  ``cdm_model.json``).
The transformer itself loads through ``workflows.model_folder`` like every model folder.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from cdm_core.conditioning import Cond

INDEX = "model_index.json"


@dataclass(frozen=True)
class PipelineSpec:
    pipeline: str  # diffusers pipeline class
    transformer: str  # its transformer class (must be a known family in model_folder.FAMILIES)
    family: str
    default_image_size: int  # pixels, when the folder's cdm_model.json does not say


PIPELINES = {
    "StableDiffusion3Pipeline": PipelineSpec("StableDiffusion3Pipeline", "SD3Transformer2DModel", "sd3", 1024),
    "LongCatImagePipeline": PipelineSpec("LongCatImagePipeline", "LongCatImageTransformer2DModel", "longcat", 1024),
}


class PipelineFolderError(ValueError):
    pass


def is_pipeline_folder(path: str | Path) -> bool:
    return (Path(path) / INDEX).exists()


def spec_of(path: str | Path) -> PipelineSpec:
    p = Path(path)
    try:
        name = json.loads((p / INDEX).read_text()).get("_class_name", "")
    except (OSError, json.JSONDecodeError) as e:
        raise PipelineFolderError(f"{p / INDEX} is not a readable pipeline index: {e}") from None
    if name not in PIPELINES:
        raise PipelineFolderError(
            f"{p}: pipeline class {name or '(none)'!r} is not supported (supported: {', '.join(sorted(PIPELINES))})"
        )
    return PIPELINES[name]


def image_size_of(path: str | Path) -> int:
    """Training resolution (pixels): SD3 from the transformer's sample_size x the VAE factor, else the default."""
    p = Path(path)
    spec = spec_of(p)
    if spec.family == "sd3":
        cfg = json.loads((p / "transformer" / "config.json").read_text())
        vae = json.loads((p / "vae" / "config.json").read_text())
        return int(cfg["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
    return spec.default_image_size


def _pipeline_class(spec: PipelineSpec):
    import diffusers

    return getattr(diffusers, spec.pipeline)


def load_text_side(path: str | Path, device: str | torch.device = "cpu"):
    """The pipeline with its text encoders and tokenizers only (no transformer, no VAE)."""
    spec = spec_of(path)
    try:
        pipe = _pipeline_class(spec).from_pretrained(str(path), transformer=None, vae=None, local_files_only=True)
    except Exception as e:  # diffusers raises several types for broken folders
        raise PipelineFolderError(f"could not load the text encoders of {path}: {e}") from None
    return pipe.to(device)


class PipelineTextEncoder:
    """Prompts -> :class:`Cond` with the pipeline's own ``encode_prompt`` (SD3: CLIP-L/G + T5 token states and the
    pooled CLIP vectors; LongCat: Qwen2.5-VL states, no pooled vector: a zero column is carried)."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu"):
        self.spec = spec_of(path)
        self.pipe = load_text_side(path, device)
        self.device = device

    @torch.no_grad()
    def encode(self, prompts: list[str], batch_size: int = 16) -> Cond:
        toks, pools = [], []
        for i in range(0, len(prompts), batch_size):
            chunk = list(prompts[i : i + batch_size])
            if self.spec.family == "sd3":
                pe, _, pooled, _ = self.pipe.encode_prompt(
                    chunk, None, None, device=self.device, do_classifier_free_guidance=False
                )
            else:
                pe, _ = self.pipe.encode_prompt(chunk)
                pooled = torch.zeros(pe.shape[0], 1, dtype=pe.dtype, device=pe.device)
            toks.append(pe.float().cpu())
            pools.append(pooled.float().cpu())
        return Cond(torch.cat(toks), torch.cat(pools))


class LatentDecoder:
    """Latents (B, C, h, w) of the maths -> images (B, 3, H, W) in [-1, 1] through the pipeline's VAE."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu"):
        from diffusers import AutoencoderKL

        self.vae = AutoencoderKL.from_pretrained(str(Path(path) / "vae"), local_files_only=True).to(device).eval()
        self.scale = float(self.vae.config.scaling_factor)
        self.shift = float(self.vae.config.shift_factor or 0.0)

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents.to(self.vae.device, self.vae.dtype) / self.scale + self.shift
        return self.vae.decode(z, return_dict=False)[0].float().clamp(-1, 1).cpu()


def export_pipeline(teacher: Path, student: torch.nn.Module, out: Path, levels: list[float], meta: dict) -> Path:
    """``out``: the teacher's pipeline folder with the student's transformer and a scheduler that runs ``levels``
    (already shifted) exactly; ``cdm_model.json`` records the levels and how to call the pipeline."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(teacher, out, ignore=shutil.ignore_patterns("transformer", "scheduler", "cdm_model.json"))
    student.save_pretrained(str(out / "transformer"), safe_serialization=True)
    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(str(teacher / "scheduler"), local_files_only=True)
    FlowMatchEulerDiscreteScheduler.from_config(sched.config, shift=1.0, use_dynamic_shifting=False).save_pretrained(
        str(out / "scheduler")
    )
    sigmas = [round(float(s), 6) for s in levels]
    if sigmas and sigmas[-1] == 0.0:  # the scheduler appends the terminal 0 itself
        sigmas = sigmas[:-1]
    card = {
        **meta,
        "inference_sigmas": sigmas,
        "usage": f"DiffusionPipeline.from_pretrained(folder)(prompt, num_inference_steps={len(sigmas)}, "
        f"guidance_scale=1.0, sigmas={sigmas})",
    }
    (out / "cdm_model.json").write_text(json.dumps(card, indent=2) + "\n")
    return out
