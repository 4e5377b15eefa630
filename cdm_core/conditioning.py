"""Text conditioning as the SD3 family consumes it.

``Cond.tokens``  (B, L, D_tok): per-token text states  -> ``encoder_hidden_states``;
``Cond.pooled``  (B, D_pool):   pooled text vector      -> ``pooled_projections``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Cond:
    """A batch of prompt embeddings."""

    tokens: torch.Tensor
    pooled: torch.Tensor

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def index(self, idx: torch.Tensor | slice) -> Cond:
        return Cond(self.tokens[idx], self.pooled[idx])

    def to(self, *args, **kwargs) -> Cond:
        return Cond(self.tokens.to(*args, **kwargs), self.pooled.to(*args, **kwargs))

    def expand(self, batch: int) -> Cond:
        """Repeat a single-prompt ``Cond`` (batch 1) to ``batch`` rows."""
        if len(self) != 1:
            raise ValueError(f"expand needs a batch-1 Cond, got batch {len(self)}")
        return Cond(self.tokens.expand(batch, -1, -1), self.pooled.expand(batch, -1))

    @staticmethod
    def cat(conds: list[Cond]) -> Cond:
        return Cond(torch.cat([c.tokens for c in conds]), torch.cat([c.pooled for c in conds]))

    def where(self, mask: torch.Tensor, other: Cond) -> Cond:
        """Rows of ``other`` where ``mask`` (B,) is true, else rows of ``self`` (CFG dropout)."""
        m_tok = mask.reshape(-1, 1, 1)
        m_pool = mask.reshape(-1, 1)
        return Cond(torch.where(m_tok, other.tokens, self.tokens), torch.where(m_pool, other.pooled, self.pooled))
