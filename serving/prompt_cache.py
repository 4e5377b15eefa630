"""A replica's prompt-embedding cache: a bounded LRU keyed by (encoder id, prompt).

Services see the same prompts again and again (a UI's suggestions, a client retrying with another seed), and the
text encoder is a fixed share of every request's work, so each replica keeps the embeddings it computed. An entry
is the prompt's rows of :class:`~cdm_core.conditioning.Cond` (token states and pooled vector), copied out of the
batch they were computed in. The encoder gives the same bits for a prompt alone or inside a batch, so a hit is
bit-identical to a miss and the seed still decides the bytes. Bounded by entries and by bytes: a large encoder's
token states (T5 in SD3: 333 x 4096 floats, ~5 MiB a prompt) would otherwise fill memory long before 4096 entries.

Hits and misses count one lookup per distinct prompt of a sampler batch.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch

from cdm_core.conditioning import Cond


class PromptCache:
    """``encode(prompts) -> Cond`` through an LRU of per-prompt rows; ``capacity`` 0 turns caching off."""

    def __init__(self, encode: Callable[[list[str]], Cond], encoder_id: str, capacity: int, max_bytes: int):
        if capacity < 0 or max_bytes <= 0:
            raise ValueError(f"prompt cache: capacity {capacity} must be >= 0 and max_bytes {max_bytes} > 0")
        self._encode, self.encoder_id = encode, encoder_id
        self.capacity, self.max_bytes = capacity, max_bytes
        self._rows: OrderedDict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._rows)

    def encode(self, prompts: list[str]) -> Cond:
        """Embeddings of ``prompts`` in order: hits from the cache, the misses encoded together in one call."""
        keys = [(self.encoder_id, p) for p in prompts]
        missing = list(dict.fromkeys(k[1] for k in keys if k not in self._rows))
        self.misses += len(missing)
        self.hits += len(set(prompts)) - len(missing)
        fresh: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        if missing:
            cond = self._encode(missing)
            for i, p in enumerate(missing):
                fresh[p] = (cond.tokens[i].clone(), cond.pooled[i].clone())
        rows = []
        for k in keys:
            row = fresh.get(k[1])
            if row is None:
                row = self._rows[k]
                self._rows.move_to_end(k)
            rows.append(row)
        for p, row in fresh.items():
            self._put((self.encoder_id, p), row)
        return Cond(torch.stack([t for t, _ in rows]), torch.stack([q for _, q in rows]))

    def _put(self, key: tuple[str, str], row: tuple[torch.Tensor, torch.Tensor]) -> None:
        if self.capacity == 0 or _nbytes(row) > self.max_bytes:
            return
        if key in self._rows:
            self.bytes -= _nbytes(self._rows.pop(key))
        self._rows[key] = row
        self.bytes += _nbytes(row)
        while len(self._rows) > self.capacity or self.bytes > self.max_bytes:
            self.bytes -= _nbytes(self._rows.popitem(last=False)[1])

    def stats(self) -> dict:
        looked_up = self.hits + self.misses
        return {
            "hits": self.hits,
            "misses": self.misses,
            "hit_rate": round(self.hits / looked_up, 4) if looked_up else None,
            "size": len(self._rows),
            "capacity": self.capacity,
            "bytes": self.bytes,
        }


def _nbytes(row: tuple[torch.Tensor, ...]) -> int:
    return sum(t.element_size() * t.nelement() for t in row)
