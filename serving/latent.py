"""Which levels a served model is sampled at, and the pipeline side of a pipeline-folder student in a replica.

Levels (:func:`levels_of`). A built-in model folder is sampled at ``inference_levels(steps, meta.shift)``, as
``cdm_core.sampling.sample`` does. A pipeline export (``workflows.pipeline_folders.export_pipeline``) records
its student's exact levels in ``cdm_model.json`` ``inference_sigmas`` (already shifted; K values, or K + 1
with the terminal 0 as ``workflows.export`` writes them: K steps either way) and carries
``shift: 1`` (its diffusers scheduler must not shift them again), so ``inference_levels(K, 1)`` would be wrong:

- ``steps == K`` (the distilled step count): the recorded levels, exactly, then 0;
- other step counts: ``inference_levels(steps, s)`` with the distillation shift ``s`` recovered from the
  recorded levels (the student was distilled on that shift's levels), when the recorded levels are exactly
  ``inference_levels(K, s)`` to their 6 decimals; otherwise (K = 1, or levels of another form) only K is served
  and other step counts are refused (``Levels.supports``).
A pipeline folder without recorded levels (a teacher served as is) is sampled at its scheduler's shift.

Pipeline side (:class:`PipelineSide`): the folder's text encoders (``PipelineTextEncoder``) and VAE
(``LatentDecoder``), loaded once per replica. Prompts are encoded one at a time and latents decoded in chunks of
exactly ``min_forward_batch`` rows, so a request's bytes never depend on what shares its batch. The prompt
cache key names the encoders by their content (``encoder_identity``), never by where they lie.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from cdm_core.conditioning import Cond
from cdm_core.schedule import inference_levels

_WHOLE_FILE = 8 << 20  # text-side files up to this size are hashed whole; larger ones by size, head and tail
_EDGE = 1 << 20


def recorded_levels(folder: str | Path) -> list[float] | None:
    """A pipeline export's ``inference_sigmas`` as K levels (decreasing, 1 first; a recorded terminal 0, as
    ``workflows.export`` writes it, is the end level, not a step), or None when it records none."""
    path = Path(folder) / "cdm_model.json"
    if not path.exists():
        return None
    raw = json.loads(path.read_text()).get("inference_sigmas")
    if raw is None:
        return None
    if isinstance(raw, list) and len(raw) > 1 and raw[-1] == 0:  # the terminal 0 written with the levels
        raw = raw[:-1]
    ok = isinstance(raw, list) and raw and all(isinstance(s, (int, float)) and 0 < s <= 1 for s in raw)
    if not ok or any(a <= b for a, b in zip(raw, raw[1:])):
        raise ValueError("model: cdm_model.json inference_sigmas must be decreasing levels in (0, 1]")
    return [float(s) for s in raw]


def _rounded(steps: int, shift: float) -> list[float]:
    return [round(float(s), 6) for s in inference_levels(steps, shift)[:-1]]


def recover_shift(levels: list[float]) -> float | None:
    """The shift ``s`` with ``inference_levels(K, s)`` = ``levels`` (to 6 decimals), the simplest such value."""
    k = len(levels)
    if k < 2 or levels[0] != 1.0 or levels[1] >= 1.0:
        return None
    u = 1.0 - 1.0 / k  # sigma_1 = s u / (1 + (s - 1) u)  <=>  s = sigma_1 (1 - u) / (u (1 - sigma_1))
    s = levels[1] * (1.0 - u) / (u * (1.0 - levels[1]))
    want = [round(v, 6) for v in levels]
    for digits in range(7):
        if _rounded(k, round(s, digits)) == want:
            return round(s, digits)
    return None


class Levels:
    """``steps -> (steps + 1,)`` float32 levels a model is sampled at (module docstring)."""

    def __init__(self, shift: float, recorded: list[float] | None = None):
        self.recorded = recorded
        self.shift = shift if recorded is None else recover_shift(recorded)

    @property
    def native_steps(self) -> int | None:
        return len(self.recorded) if self.recorded else None

    def supports(self, steps: int) -> bool:
        return steps >= 1 and (steps == self.native_steps or self.shift is not None)

    def __call__(self, steps: int) -> torch.Tensor:
        if steps == self.native_steps:
            return torch.tensor([*self.recorded, 0.0], dtype=torch.float32)
        if not self.supports(steps):
            raise ValueError(f"steps: this model runs {self.native_steps} steps only")
        return inference_levels(steps, self.shift)


def levels_of(folder: str | Path, meta) -> Levels:
    return Levels(meta.shift, recorded_levels(folder) if meta.latent else None)


def steps_run(folder: str | Path, allowed: list[int]) -> list[int]:
    """The deployment's allowed step counts that a model folder runs (``GET /v1/models``, ``/generate``)."""
    from workflows.model_folder import read_meta

    levels = levels_of(folder, read_meta(folder))
    return [k for k in allowed if levels.supports(k)]


def encoder_identity(folder: str | Path) -> str:
    """The pipeline class and a content hash of its text encoders and tokenizers (path-independent)."""
    p = Path(folder)
    index = json.loads((p / "model_index.json").read_text())
    h = hashlib.sha256(str(index.get("_class_name")).encode())
    parts = sorted(k for k in index if k.startswith(("text_encoder", "tokenizer", "text_processor")))
    for part in parts:
        for f in sorted((p / part).rglob("*")) if (p / part).is_dir() else []:
            if not f.is_file():
                continue
            size = f.stat().st_size
            h.update(f"{f.relative_to(p).as_posix()}\0{size}\0".encode())
            with f.open("rb") as fh:
                if size <= _WHOLE_FILE:
                    h.update(fh.read())
                else:
                    h.update(fh.read(_EDGE))
                    fh.seek(size - _EDGE)
                    h.update(fh.read(_EDGE))
    return f"{index.get('_class_name')}:{h.hexdigest()[:16]}"


class PipelineSide:
    """A pipeline folder's text encoders and VAE in a replica: ``encode(prompts) -> Cond``, ``decode(latents)``."""

    def __init__(self, folder: str | Path, device: str = "cpu", chunk: int = 4):
        from workflows.pipeline_folders import LatentDecoder, PipelineTextEncoder

        self.encoder = PipelineTextEncoder(folder, device)
        self.decoder = LatentDecoder(folder, device)
        self.encoder_id = encoder_identity(folder)
        self.chunk = max(1, chunk)
        self.vae_factor = 2 ** (len(self.decoder.vae.config.block_out_channels) - 1)

    def encode(self, prompts: list[str]) -> Cond:
        return Cond.cat([self.encoder.encode([p]) for p in prompts])

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, 3, H, W) in [-1, 1], in forwards of exactly ``chunk`` rows (the last one padded)."""
        out = []
        for i in range(0, latents.shape[0], self.chunk):
            z = latents[i : i + self.chunk]
            k = z.shape[0]
            if k < self.chunk:
                z = torch.cat([z, z[:1].expand(self.chunk - k, *z.shape[1:])])
            out.append(self.decoder(z)[:k])
        return torch.cat(out)
