"""Every integer seed of a distillation, in one place.

Each random stream gets its own formula of (base seed, rank, iteration, stream), so two generators never
replay the same sequence and a run resumed at any iteration draws what an uninterrupted one would.
The constants are the ones results were recorded with: changing one changes every figure.
"""

from __future__ import annotations

_MOD = 2**62


def schedule_seed(seed: int, step: int) -> int:
    """Iteration ``step``'s schedule (N and the anchor levels): identical on every rank."""
    return (int(seed) * 1_000_003 + int(step) * 7_919 + 12_345) % _MOD


def rank_seed(seed: int, rank: int, step: int, stream: int = 0) -> int:
    """Per-(seed, rank, step) seed of one stream of the CDM step, different on each rank.

    Streams: 0 = noise and noise levels, 1 = anchor indices, 2 = fake-mix draws, 3 = fake-final draws.
    """
    return (int(seed) * 1_000_003 + int(rank) * 999_983 + int(step) * 7_919 + int(stream) * 104_729 + 777) % _MOD


def prompt_stream(seed: int, rank: int | None = None) -> int:
    """Base seed of the prompt batches: the single-process loop uses ``seed`` itself, each Ray Train worker
    its own stream ``7919 seed + rank`` (two formulas, kept so that recorded results reproduce)."""
    return int(seed) if rank is None else int(seed) * 7919 + int(rank)


def batch_seed(stream: int, iteration: int) -> int:
    """Iteration ``iteration``'s prompt batch within a prompt stream."""
    return int(stream) * 1_000_003 + int(iteration) * 31 + 99


def replica_seed(seed: int, rank: int, step: int) -> int:
    """The teacher's data-parallel replicas: a stream per (seed, rank, start step)."""
    return int(seed) + 1_000_003 * (int(rank) + 1) + int(step)
