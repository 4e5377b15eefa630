"""Model folder -> K-step images: the few-step sampler of ``cdm_core.sampling`` in batches, and ``cdm sample``.

Levels always come from ``cdm_core.schedule.inference_levels(steps, shift)``; the shift is the model's
(its scheduler's) unless a caller overrides it explicitly.
"""

from __future__ import annotations

from pathlib import Path

import torch

from cdm_core.conditioning import Cond
from cdm_core.sampling import sample


@torch.no_grad()
def generate(
    v_fn,
    noise: torch.Tensor,
    cond: Cond,
    uncond: Cond | None,
    steps: int,
    shift: float,
    guidance: float = 1.0,
    batch: int = 500,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """``steps``-step samples of every noise row (B, C, H, W), ``batch`` rows at a time; float32 on CPU."""
    out = []
    for i in range(0, noise.shape[0], batch):
        sl = slice(i, i + batch)
        x = sample(
            v_fn,
            noise[sl].to(device),
            steps,
            shift,
            cond.index(sl).to(device),
            uncond.index(sl).to(device) if uncond is not None else None,
            guidance,
        )
        out.append(x.float().cpu())
    return torch.cat(out)


def sample_prompts(
    model_dir: str | Path,
    prompts: list[str],
    n: int,
    steps: int,
    guidance: float = 1.0,
    seed: int = 0,
    shift: float | None = None,
) -> torch.Tensor:
    """``n`` images per prompt (rows of prompts), noise from ``Generator().manual_seed(seed)``; ``shift`` None = the
    folder's own scheduler shift."""
    from workflows.embeddings import empty_prompt, encode_prompts
    from workflows.model_folder import load_model

    for p in prompts:
        if not p.strip():
            raise ValueError("--prompt: empty prompt")
    m = load_model(model_dir)
    cond = encode_prompts(prompts)
    rows = torch.arange(len(prompts)).repeat_interleave(n)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((rows.numel(), *m.shape), generator=g)
    return generate(
        m.velocity(),
        noise,
        cond.index(rows),
        empty_prompt().expand(rows.numel()),
        steps,
        m.meta.shift if shift is None else shift,
        guidance,
        batch=rows.numel(),
    )
