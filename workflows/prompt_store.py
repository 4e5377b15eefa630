"""A training worker's view of the embedding store (``workflows.embedding_job``): its shard, read part by part.

- A store of at most ``HOLD_WHOLE_MIB`` is held whole and rank ``r`` of ``w`` draws from rows ``r, r + w, ...``
  (as the workers always have: small prompt lists, the built-in teacher's, train exactly as before).
- A larger store is streamed: rank ``r`` owns parts ``r, r + w, ...`` (all parts, rows ``r::w`` of each, when there
  are fewer parts than ranks) and holds **one** at a time. It draws ``ceil(rows_per_part / batch)`` batches from a
  part, then moves to its next, cycling. Which part and which rows an iteration draws depend on the iteration
  number only, so a resumed worker draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from cdm_core.conditioning import Cond
from cdm_core.reference_loop import prompt_batch
from workflows.embedding_job import INDEX

HOLD_WHOLE_MIB = 1024.0


def _load(path: Path) -> Cond:
    blob = torch.load(path, map_location="cpu", weights_only=True)
    return Cond(blob["tokens"], blob["pooled"])


class PromptStore:
    def __init__(self, folder: str | Path, rank: int = 0, world: int = 1, hold_whole_mib: float = HOLD_WHOLE_MIB):
        self.folder = Path(folder)
        try:
            self.index = json.loads((self.folder / INDEX).read_text())
        except (FileNotFoundError, json.JSONDecodeError) as e:
            raise RuntimeError(f"prompt embeddings: {self.folder} is not a complete store ({e})") from None
        self.rank, self.world = rank, world
        self.empty = _load(self.folder / "empty.pt")
        parts = [self.folder / p["file"] for p in self.index["parts"]]
        self.whole = self.index["bytes"] <= hold_whole_mib * 2**20
        if self.whole:
            every = Cond.cat([_load(p) for p in parts])
            self.shard = every.index(slice(rank, None, world)) if len(every) >= world else every
            self.parts, self.slice_rows = [], False
        else:
            self.shard = None
            self.slice_rows = len(parts) < world
            self.parts = parts if self.slice_rows else parts[rank::world]
        self._held: tuple[int, Cond] | None = None

    def __len__(self) -> int:
        """Prompts this rank draws from."""
        if self.whole:
            return len(self.shard)
        rows = {p["file"]: p["rows"] for p in self.index["parts"]}
        n = [rows[p.name] for p in self.parts]
        return sum(len(range(self.rank, r, self.world)) for r in n) if self.slice_rows else sum(n)

    def part_of(self, iteration: int, batch: int) -> int:
        """Which of this rank's parts iteration ``iteration`` draws from (streamed stores)."""
        per_part = max(1, math.ceil(self.index["rows_per_part"] / batch))
        return (iteration // per_part) % len(self.parts)

    def _part(self, k: int) -> Cond:
        if self._held is None or self._held[0] != k:
            c = _load(self.parts[k])
            if self.slice_rows and len(c) >= self.world:
                c = c.index(slice(self.rank, None, self.world))
            self._held = (k, c)  # one part in memory at a time
        return self._held[1]

    def head(self, k: int) -> Cond:
        """The first ``k`` prompts of the whole source (sample grids show the same prompts on every run)."""
        return _load(self.folder / self.index["parts"][0]["file"]).index(slice(0, k))

    def batch(self, batch: int, stream: int, iteration: int) -> Cond:
        """Iteration ``iteration``'s prompts (``batch`` rows drawn with the stream's seed for that iteration)."""
        pool = self.shard if self.whole else self._part(self.part_of(iteration, batch))
        return prompt_batch(pool, batch, stream, iteration)
