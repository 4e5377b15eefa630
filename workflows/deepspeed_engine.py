"""DeepSpeed engines behind cdm_core's :class:`~cdm_core.trainable.Trainable` protocol.

``deepspeed.initialize`` reuses the process group Ray Train set up (gloo on CPU, NCCL on GPU). ZeRO
stage 2 keeps full parameters on every rank (the EMA and the fake->student blend read them directly);
under stage 3 parameters are partitioned, so those two gather them first. On CPU: fp32 and torch AdamW
(DeepSpeed's fused/CPU Adam JIT-compile for a minute); on GPU: bf16.
"""

from __future__ import annotations

import contextlib

import torch

from cdm_core.ema import EMA
from cdm_core.optim import adamw_for
from cdm_core.trainable import ApplyResult, guard_loss


def ds_config(batch_per_worker: int, zero_stage: int, precision: str, max_grad_norm: float, use_gpu: bool) -> dict:
    bf16 = precision == "bf16" or (precision == "auto" and use_gpu)
    cfg = {
        "train_micro_batch_size_per_gpu": batch_per_worker,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": max_grad_norm,
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if zero_stage == 3:
        cfg["zero_optimization"].update(
            {"stage3_param_persistence_threshold": 0, "stage3_gather_16bit_weights_on_model_save": False}
        )
    return cfg


class DeepSpeedTrainable:
    """``velocity``/``parameters``/``apply`` over a DeepSpeed engine.

    ``apply``: the non-finite guard of every trainable (``cdm_core.trainable.guard_loss``, its flag reduced
    over the ranks, which must all run the same collectives), then ``engine.backward`` and ``engine.step``
    (clipping is in the DS config).
    """

    def __init__(self, engine, zero_stage: int, velocity_of):
        self.engine = engine
        self.zero_stage = zero_stage
        self._v = velocity_of(engine)

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    def velocity(self, x_t, t, cond):
        return self._v(x_t, t, cond)

    def parameters(self):
        return self.engine.module.parameters()

    def apply(self, loss: torch.Tensor) -> ApplyResult:
        loss, skipped = guard_loss(loss, self.engine.module.parameters(), _min_over_ranks)
        self.engine.backward(loss)
        self.engine.step()
        gn = self.engine.get_global_grad_norm()
        gn = float(gn) if gn is not None else float("nan")
        return ApplyResult(gn, skipped)

    @contextlib.contextmanager
    def gathered(self):
        """Full parameters inside the block (a no-op below ZeRO-3)."""
        if self.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.engine.module.parameters()), modifier_rank=None):
                yield
        else:
            yield


def _min_over_ranks(flag: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return flag


def deepspeed_trainable(
    optim,
    batch_per_worker: int,
    zero_stage: int,
    precision: str,
    use_gpu: bool,
    velocity_of,
    gradient_checkpointing: bool = False,
):
    """The ``trainable`` factory of ``cdm_core.distiller.build_distiller`` for DeepSpeed engines: the same
    AdamW + warm-up as the reference loop, handed to ``deepspeed.initialize`` with the job's ZeRO config
    (``gradient_checkpointing``: the diffusers model's own ``enable_gradient_checkpointing``)."""
    import deepspeed

    def make(module: torch.nn.Module, lr: float, total_steps: int) -> DeepSpeedTrainable:
        if gradient_checkpointing:
            if not hasattr(module, "enable_gradient_checkpointing"):
                raise ValueError(f"train.gradient_checkpointing: {type(module).__name__} does not support it")
            module.enable_gradient_checkpointing()
        opt, sched = adamw_for(module, optim, lr, total_steps)
        eng, *_ = deepspeed.initialize(
            model=module,
            optimizer=opt,
            lr_scheduler=sched,
            config=ds_config(batch_per_worker, zero_stage, precision, optim.max_grad_norm, use_gpu),
        )
        return DeepSpeedTrainable(eng, zero_stage, velocity_of)

    return make


def blend(fake: DeepSpeedTrainable, student: DeepSpeedTrainable, decay: float) -> None:
    """``phi <- decay phi + (1 - decay) theta`` on full parameters (gathered under ZeRO-3)."""
    if fake.zero_stage == 3:
        import deepspeed

        with (
            student.gathered(),
            deepspeed.zero.GatheredParameters(list(fake.engine.module.parameters()), modifier_rank=0),
        ):
            _lerp(fake, student, decay)
    else:
        _lerp(fake, student, decay)


@torch.no_grad()
def _lerp(fake, student, decay):
    for p_f, p_s in zip(fake.engine.module.parameters(), student.engine.module.parameters()):
        p_f.lerp_(p_s.detach().to(p_f.dtype), 1.0 - decay)


def ema_update(ema: EMA, student: DeepSpeedTrainable) -> float:
    with student.gathered():
        return ema.update(student.engine.module)


def prebuild_cpu_comm() -> str | None:
    """Compile DeepSpeed's shared-memory CPU collective op now (cached under ``~/.cache/torch_extensions``
    or ``$TORCH_EXTENSIONS_DIR``), so the first job's workers do not sit silent for minutes while they
    JIT-build it. Calls the very function DeepSpeed's torch backend calls at start-up, so both build the
    same op with the same checks. Returns the op's name, or None where there is no such op (GPUs)."""
    from deepspeed.comm.torch import build_shm_op

    op = build_shm_op()
    return op.__name__ if op is not None else None


if __name__ == "__main__":
    import time

    t0 = time.time()
    name = prebuild_cpu_comm()
    print(f"DeepSpeed op {name} ready ({time.time() - t0:.0f} s)" if name else "no DeepSpeed CPU op to build here")
