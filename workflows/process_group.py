"""Data-parallel processes for single-job trainers (``cdm teacher train``) launched by ``torchrun``.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 -m cdm_cli teacher train ...

``torchrun`` sets ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``; without them everything here is a no-op for one
process. Gradients go through DDP (NCCL on GPUs, gloo on CPUs). Wall-time decisions (the learning rate
paced by ``max_minutes``, when to stop) are rank 0's and are shared over a gloo group every step, so the
replicas never apply different learning rates or stop at different steps.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class Group:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    _ctrl: object = None  # gloo group for host-side control values (also when the data group is NCCL)
    _owned: bool = False  # this module created the default group (and so destroys it)

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """DDP around ``model`` (gradients averaged over the replicas); ``model`` itself for one process."""
        if not self.distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def from_main(self, value: float) -> float:
        """Rank 0's ``value`` on every rank (one 8-byte broadcast over gloo)."""
        if not self.distributed:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64)
        dist.broadcast(t, src=0, group=self._ctrl)
        return float(t.item())

    def mean(self, value: float) -> float:
        """The mean of ``value`` over the replicas (every rank must call it)."""
        if not self.distributed:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t, group=self._ctrl)
        return float(t.item()) / self.world

    def check_replicas_agree(self, model: torch.nn.Module) -> None:
        """Raise if the replicas' weights have drifted apart (they must stay bit-identical under DDP)."""
        if not self.distributed:
            return
        import torch.distributed as dist

        with torch.no_grad():
            s = torch.tensor([sum(float(p.double().sum()) for p in model.parameters())], dtype=torch.float64)
        all_s = [torch.zeros(1, dtype=torch.float64) for _ in range(self.world)]
        dist.all_gather(all_s, s, group=self._ctrl)
        if len({float(x.item()) for x in all_s}) != 1:
            raise RuntimeError(f"data-parallel replicas disagree: weight sums {[float(x) for x in all_s]}")

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier(group=self._ctrl)

    def close(self) -> None:
        if self._owned:
            import torch.distributed as dist

            dist.destroy_process_group()


def init_from_env(device: str) -> Group:
    """The process group ``torchrun`` asked for, or a one-process group. ``device``: "cpu" or "cuda"."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = torch.device(device)
    if world <= 1:
        return Group(device=dev)
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    ctrl = dist.new_group(backend="gloo") if dev.type == "cuda" else dist.group.WORLD
    return Group(rank=dist.get_rank(), world=dist.get_world_size(), device=dev, _ctrl=ctrl, _owned=owned)
