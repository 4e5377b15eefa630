"""``cdm teacher train``: the built-in teacher, rectified flow on Fashion-MNIST with prompt dropout.

    cdm teacher train --config teacher-tiny --out outputs/teacher-tiny            # CPU
    cdm teacher train --config teacher-tiny --set device=cuda --out outputs/t     # one GPU

Objective: ``x_t = (1-t) x0 + t eps``, regress ``v(x_t, t, c)`` on ``eps - x0``; with probability
``cfg_dropout`` the prompt is replaced by the empty prompt's embedding so CFG works at sampling time.
The EMA weights are exported as a diffusers folder. Resume = run the same command again (the job
keeps ``checkpoint.pt`` in its output folder).

Several processes (data parallel, gradients averaged by DDP; ``batch_size`` is the global batch):

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 -m cdm_cli teacher train ...

Learning rate: linear warm-up, then a cosine decay to 0. With ``max_minutes`` > 0 the decay is paced by
whichever runs out first, the step count or the wall-time budget, so a time-limited run still ends with
its decay complete (a run cut off mid-decay leaves an under-annealed, noisy teacher).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from cdm_core.ema import EMA
from cdm_core.flow import flow_matching_loss
from cdm_core.models import SD3Family, tiny_sd3_config
from cdm_core.seeds import replica_seed
from workflows.config import TeacherTrainConfig
from workflows.embeddings import encode_prompts
from workflows.fashion_mnist import load_split
from workflows.files import save_atomic
from workflows.model_folder import ModelMeta, load_transformer, new_model, save_model_folder
from workflows.process_group import Group, init_from_env
from workflows.progress import StepLogger, console
from workflows.prompts import TRAIN_TEMPLATES, train_prompts


def _sample_t(n: int, kind: str, device) -> torch.Tensor:
    if kind == "logit_normal":
        return torch.sigmoid(torch.randn(n, device=device))
    return torch.rand(n, device=device)


def lr_factor(step: int, warmup: int, progress: float) -> float:
    """Warm-up over ``warmup`` steps times a cosine that reaches 0 at ``progress`` = 1."""
    return min(1.0, (step + 1) / max(1, warmup)) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train_teacher(cfg: TeacherTrainConfig, out_dir: str | Path, command: str = "") -> Path:
    pg = init_from_env(cfg.device)
    try:
        return _train(cfg, Path(out_dir), command, pg)
    finally:
        pg.close()


def _train(cfg: TeacherTrainConfig, out: Path, command: str, pg: Group) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    if cfg.batch_size % pg.world:
        raise ValueError(f"batch_size: {cfg.batch_size} does not split over {pg.world} processes")
    dev, say = pg.device, (console.print if pg.is_main else (lambda *a, **k: None))
    if pg.distributed:
        say(f"teacher: {pg.world} data-parallel processes, {cfg.batch_size // pg.world} samples each per step")
    torch.manual_seed(cfg.seed)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True

    images, labels = load_split("train", cfg.data_dir)
    images, labels = images.to(dev), labels.to(dev)
    prompts = train_prompts()
    if not pg.is_main:
        pg.barrier()  # rank 0 fills the embedding cache first; the others then read it
    table = encode_prompts([p for p, _ in prompts] + [""]).to(dev)
    if pg.is_main:
        pg.barrier()
    cond_table, empty = table.index(slice(0, -1)), table.index(slice(-1, None))
    n_tmpl = len(TRAIN_TEMPLATES)

    model = new_model(SD3Family.name, tiny_sd3_config(**cfg.model.model_dump()))
    if cfg.init_from:
        init = load_transformer(cfg.init_from)
        if init.config.sample_size != model.config.sample_size or init.config.num_layers != model.config.num_layers:
            raise ValueError(f"init_from: {cfg.init_from} has another shape than model.* of this config")
        model.load_state_dict(init.state_dict())
        say(f"teacher: initialised from {cfg.init_from}")
    model = model.to(dev).train()
    ema = EMA(model, cfg.ema_decay)
    # fused AdamW: one kernel for all parameters (this model is launch-bound on a GPU)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=dev.type == "cuda")
    v_fn = SD3Family.velocity(pg.wrap(model))
    budget_s = 60.0 * cfg.max_minutes

    step, elapsed_before = 0, 0.0
    ckpt = out / "checkpoint.pt"
    if ckpt.exists():
        state = torch.load(ckpt, map_location=dev, weights_only=False)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
        if not pg.distributed:  # one process resumes its exact random stream
            torch.set_rng_state(state["rng_cpu"])
            if dev.type == "cuda" and state.get("rng_cuda") is not None:
                torch.cuda.set_rng_state(state["rng_cuda"])
        elapsed_before = float(state.get("elapsed_s", 0.0))
        say(f"resuming teacher training from {ckpt} at step {step}")
    if pg.distributed:  # each replica draws its own batches: a stream per (seed, rank, start step)
        torch.manual_seed(replica_seed(cfg.seed, pg.rank, step))

    def save_ckpt() -> None:
        pg.check_replicas_agree(model)  # every rank: a drift stops the run before it is saved
        if not pg.is_main:
            return
        save_atomic(
            {
                "model": model.state_dict(),
                "ema": ema.state_dict(),
                "opt": opt.state_dict(),
                "elapsed_s": elapsed(),
                "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state() if dev.type == "cuda" else None,
                "step": step,
                "config": cfg.model_dump(mode="json"),
            },
            ckpt,
        )

    log = StepLogger(
        cfg.steps, "teacher", cfg.log_every, start=step, budget_s=budget_s - elapsed_before if budget_s > 0 else None
    )
    t0 = time.time()

    def elapsed() -> float:
        return elapsed_before + time.time() - t0

    def progress() -> float:
        """Fraction of the run done (steps or wall time); rank 0's clock decides for every replica."""
        p = step / cfg.steps
        return pg.from_main(max(p, elapsed() / budget_s) if budget_s > 0 else p)

    b = cfg.batch_size // pg.world
    loss_avg = None  # a device tensor: read back only when logging, so the GPU is never stalled per step
    prog = progress()
    while step < cfg.steps and prog < 1.0:
        lr = cfg.lr * lr_factor(step, cfg.warmup_steps, prog)
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(0, images.shape[0], (b,), device=dev)
        x0, lab = images[idx], labels[idx]
        tmpl = torch.randint(0, n_tmpl, (b,), device=dev)
        cond = cond_table.index(lab * n_tmpl + tmpl)
        drop = torch.rand(b, device=dev) < cfg.cfg_dropout
        cond = cond.where(drop, empty.expand(b))
        t = _sample_t(b, cfg.time_sampling, dev)
        eps = torch.randn_like(x0)
        loss = flow_matching_loss(v_fn, x0, eps, t, cond)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        ema.update(model)
        step += 1
        lv = loss.detach()
        loss_avg = lv if loss_avg is None else 0.98 * loss_avg + 0.02 * lv
        prog = progress()
        done = step == cfg.steps or prog >= 1.0
        if done or log.due(step):  # the loss is read back (and averaged over the replicas) only here
            loss_mean = pg.mean(float(loss_avg))
            if pg.is_main:
                log(step, force=done, loss=loss_mean, lr=lr)
        if step % cfg.checkpoint_every == 0 or done:
            save_ckpt()
    if step < cfg.steps:
        say(
            f"teacher: time budget spent at step {step} of {cfg.steps} "
            f"(max_minutes={cfg.max_minutes}); the learning-rate decay is complete"
        )

    meta = ModelMeta(
        shift=cfg.shift,
        provenance={
            "trained_by": "cdm teacher train",
            "command": command,
            "steps_done": step,
            "config": cfg.model_dump(mode="json"),
            "final_loss_ema": pg.mean(float(loss_avg)) if loss_avg is not None else None,
            "wall_s": round(elapsed(), 1),
            "device": str(dev),
            "processes": pg.world,
            **({"launcher": f"torchrun --nproc_per_node {pg.world} -m cdm_cli (= cdm)"} if pg.world > 1 else {}),
        },
    )
    folder = out / "model"
    if pg.is_main:
        save_model_folder(ema.shadow.cpu(), folder, meta)
        say(f"teacher: EMA weights exported to {folder}")
    pg.barrier()
    return folder
