"""The per-worker loop of a distillation job (runs inside Ray Train's TorchTrainer).

Each worker holds the frozen real teacher and two DeepSpeed engines (student, fake teacher); the
student EMA lives beside the student. ``cdm_core.step.CDMStep`` does all the maths. Every
``checkpoint_every`` student steps every rank writes its shards and reports them through
``ray.train.report``; rank 0 then flushes its buffered MLflow metrics (so a restart never logs a
step twice). Resume: ``ray.train.get_checkpoint()`` -> ``engine.load_checkpoint``.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

CKPT_TAG = "ckpt"
BEST_EMA, BEST_META = "best_ema.pt", "best.json"  # eval.keep_best: the best-validation EMA and its step


def say(msg: str) -> None:
    """One progress line on the driver's console. Ray Train patches ``print`` to also log through its logger
    when ``sys.stdout`` is wrapped, which showed every line twice; the real stdout avoids the tee."""
    import sys

    print(msg, file=sys.__stdout__ or sys.stdout, flush=True)


def max_across_ranks(value: int) -> int:
    t = torch.tensor([value], dtype=torch.int64)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t.item())


def _load_embeddings(path: str):
    from cdm_core.conditioning import Cond

    blob = torch.load(path, map_location="cpu", weights_only=True)
    return Cond(blob["tokens"], blob["pooled"]), Cond(blob["empty_tokens"], blob["empty_pooled"])


def train_loop_per_worker(config: dict) -> None:
    import deepspeed
    import ray.train

    from cdm_core.ema import EMA
    from cdm_core.models.sd3 import SD3Velocity
    from cdm_core.reference_loop import prompt_batch
    from cdm_core.step import CDMStep
    from workflows import lineage
    from workflows.deepspeed_engine import DeepSpeedTrainable, blend, ds_config, ema_update
    from cdm_core.trainable import warmup_adamw
    from workflows.distill_config import DistillConfig
    from workflows.model_folder import load_transformer, read_meta

    cfg = DistillConfig.model_validate(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    dev = torch.device("cuda", ctx.get_local_rank()) if cfg.scaling.use_gpu else torch.device("cpu")
    job_dir = Path(config["job_dir"])
    (job_dir / "pids").mkdir(parents=True, exist_ok=True)
    node = ray.get_runtime_context().get_node_id()
    (job_dir / "pids" / f"rank{rank}.pid").write_text(f"{os.getpid()} {node}\n")
    pg = ray.util.get_current_placement_group()
    if rank == 0 and pg is not None:  # a sweep frees the group of a trial its scheduler stopped (tuning.sweep)
        with open(job_dir / "pids" / "placement_groups.txt", "a") as f:
            f.write(pg.id.hex() + "\n")

    meta = read_meta(config["teacher_path"])
    teacher = load_transformer(config["teacher_path"], dev)
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    fake = copy.deepcopy(teacher).train().requires_grad_(True)
    ema = EMA(student, cfg.optim.ema_decay)
    o = cfg.optim
    b = cfg.train.batch_size_per_worker

    def engine(module, lr, total_steps):
        opt, sched = warmup_adamw(module, lr, (o.beta1, o.beta2), o.weight_decay, o.warmup_steps, total_steps,
                                  o.lr_decay, o.min_lr_ratio)
        eng, *_ = deepspeed.initialize(model=module, optimizer=opt, lr_scheduler=sched,
                                       config=ds_config(b, cfg.deepspeed.zero_stage, cfg.deepspeed.precision,
                                                        o.max_grad_norm, cfg.scaling.use_gpu))
        return DeepSpeedTrainable(eng, cfg.deepspeed.zero_stage)

    st = engine(student, o.lr_student, cfg.train.student_steps)
    ft = engine(fake, o.lr_student * o.fake_lr_ratio, cfg.train.student_steps * cfg.cdm.update_ratio)
    core = cfg.cdm.to_core()
    step = CDMStep(core, st, ft, SD3Velocity(teacher), ema, rank=rank, blend=blend, ema_update=ema_update,
                   sync_depth=max_across_ranks if cfg.deepspeed.zero_stage == 3 and world > 1 else None)

    prompts, empty = _load_embeddings(config["embeddings"])
    shard = prompts.index(slice(rank, None, world)) if len(prompts) >= world else prompts
    empty_b = empty.expand(b).to(dev)
    shape = (b, meta.channels, meta.image_size, meta.image_size)
    dtype = torch.bfloat16 if st.engine.bfloat16_enabled() else torch.float32

    iteration, samples_seen = 0, 0
    # eval.keep_best: the EMA with the best validation score (eval.select_by) so far rides along in every checkpoint (rank 0)
    best: dict | None = None
    best_ema: dict | None = None
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            try:
                m = json.loads((Path(d) / "meta.json").read_text())
                st.engine.load_checkpoint(str(Path(d) / "student"), tag=CKPT_TAG)
                ft.engine.load_checkpoint(str(Path(d) / "fake"), tag=CKPT_TAG)
                ema.load_state_dict(torch.load(Path(d) / "ema.pt", map_location="cpu", weights_only=False))
                if rank == 0 and (Path(d) / BEST_META).exists():
                    best = json.loads((Path(d) / BEST_META).read_text())
                    best_ema = torch.load(Path(d) / BEST_EMA, map_location="cpu", weights_only=False)
            except Exception as e:
                raise RuntimeError(f"checkpoint {d} is corrupt or incompatible: {type(e).__name__}: {e}") from None
        iteration, step.student_steps, samples_seen = m["iteration"], m["student_steps"], m["samples_seen"]
        if rank == 0:
            say(f"[cdm] resumed from checkpoint at student step {step.student_steps}")
            with open(job_dir / "resumes.jsonl", "a") as f:
                f.write(json.dumps({"student_steps": step.student_steps, "time": time.time()}) + "\n")

    c = lineage.client(config["tracking_uri"]) if rank == 0 else None
    run_id = config["run_id"]
    buffer = lineage.MetricBuffer(c, run_id)
    total = cfg.train.student_steps
    t_start, steps_at_start = time.time(), step.student_steps
    t_window, iters_window = time.time(), 0
    acc: dict[str, float] = {}
    n_acc = 0

    def save_and_report(metrics: dict) -> None:
        tmp = Path(tempfile.mkdtemp(prefix=f"cdm-ckpt-r{rank}-"))
        try:
            st.engine.save_checkpoint(str(tmp / "student"), tag=CKPT_TAG)
            ft.engine.save_checkpoint(str(tmp / "fake"), tag=CKPT_TAG)
            if rank == 0:
                torch.save(ema.state_dict(), tmp / "ema.pt")
                if best is not None:
                    torch.save(best_ema, tmp / BEST_EMA)
                    (tmp / BEST_META).write_text(json.dumps(best))
                (tmp / "meta.json").write_text(json.dumps({
                    "iteration": iteration, "student_steps": step.student_steps, "samples_seen": samples_seen,
                    "world_size": world, "zero_stage": cfg.deepspeed.zero_stage, "config_hash": config["config_hash"],
                }))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(tmp)),
                             checkpoint_dir_name=f"step_{step.student_steps:08d}")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if rank == 0:
            buffer.flush(c, run_id)

    val_every = cfg.eval.val_every
    validator = Validator(cfg, meta, dev) if val_every and rank == 0 else None
    val_to_mlflow = config.get("val_to_mlflow", True)

    while step.student_steps < total:
        cond = prompt_batch(shard, b, cfg.cdm.seed * 7919 + rank, iteration).to(dev)
        res = step(iteration, cond, empty_b, shape, device=dev, dtype=dtype)
        iteration += 1
        iters_window += 1
        samples_seen += b * world
        for k, v in res.metrics.items():
            acc[k] = acc.get(k, 0.0) + v
        n_acc += 1
        if not res.student_updated:
            continue
        s = step.student_steps
        if rank == 0 and s == steps_at_start + 1:
            (job_dir / "first_step.json").write_text(json.dumps({"student_steps": s, "time": time.time()}))
        if s % cfg.train.log_every == 0 or s == total:
            dt = time.time() - t_window
            m = {k: v / n_acc for k, v in acc.items()}
            m["throughput/samples_per_s"] = iters_window * b * world / max(dt, 1e-9)
            m["throughput/student_steps_per_s"] = iters_window / core.update_ratio / max(dt, 1e-9)
            acc.clear()
            n_acc = 0
            t_window, iters_window = time.time(), 0
            if rank == 0:
                buffer.add(s, m)
                done = s - steps_at_start
                eta = (total - s) * (time.time() - t_start) / max(done, 1)
                say(f"[cdm] step {s}/{total} " + " ".join(
                    f"{k.split('/')[-1] if k.startswith('loss/') else k}={m[k]:.4g}"
                    for k in ("loss/ca", "loss/dm", "loss/cdm", "loss/fake") if k in m)
                    + f" N={m['schedule/n']:.1f} {m['throughput/samples_per_s']:.1f} samples/s eta {eta:.0f}s")
        if rank == 0 and (s % cfg.train.sample_every == 0 or s == total):
            _log_grid(c, run_id, ema, s, prompts, empty, shape, dev, meta)
        val_due = bool(val_every) and s % val_every == 0
        if s % cfg.train.checkpoint_every == 0 or s == total or val_due:
            report = {"student_steps": s, "iteration": iteration}
            if validator is not None:  # every report carries the validation metrics (a sweep's scheduler reads them)
                val = validator(ema)
                report.update(val)
                key = f"val_{cfg.eval.select_by}"
                # a best.json from before select_by holds only {"val_fd": ...}: unless it is the metric selected by,
                # it counts as no best and is replaced at this validation
                held = best.get("value", best.get(key, float("inf"))) if best is not None else None
                if cfg.eval.keep_best and (best is None or val[key] < held):
                    best = {"student_steps": s, "metric": key, "value": val[key], **val}
                    best_ema = copy.deepcopy(ema.state_dict())
                say(f"[cdm] step {s}/{total} validation " + " ".join(f"{k}={v:.4g}" for k, v in val.items()))
                if val_to_mlflow:
                    buffer.add(s, val)
            save_and_report(report)


class Validator:
    """Validation metrics of the EMA student: 4-step samples on the held-out prompts with noise seed
    ``eval.val_seed`` (never a test seed), scored by both judges and the pixel panel like the final evaluation."""

    def __init__(self, cfg, meta, dev):
        from cdm_core.schedule import inference_levels
        from workflows.config import DEFAULT_EVALUATOR, DEFAULT_JUDGE2
        from workflows.evaluation import eval_set
        from workflows.evaluator import Evaluator

        self.es = eval_set(cfg.eval.val_n_samples, cfg.eval.val_seed, (meta.channels, meta.image_size,
                                                                        meta.image_size))
        self.levels = inference_levels(4, cfg.cdm.shift)
        self.ev = Evaluator.load(DEFAULT_EVALUATOR)
        self.ev2 = Evaluator.load(DEFAULT_JUDGE2)
        self.dev = dev

    @torch.no_grad()
    def __call__(self, ema) -> dict[str, float]:
        from workflows.evaluation import generate, score

        model = ema.shadow.to(self.dev)
        was_training = model.training
        model.eval()
        imgs = generate(model, self.es, self.levels, 1.0, 500, self.dev)
        model.train(was_training)
        return {f"val_{k}": float(v) for k, v in score(self.ev, imgs, self.es.labels, None,
                                                              self.ev2).items()}


@torch.no_grad()
def _log_grid(c, run_id, ema, s, prompts, empty, shape, dev, meta) -> None:
    """EMA samples of the first 10 prompts x 4 seeds at the 4-step inference levels, as a PNG artifact."""
    from cdm_core.models.sd3 import SD3Velocity
    from cdm_core.sampling import sample_euler
    from cdm_core.schedule import inference_levels
    from workflows.evaluation import save_grid

    k = min(10, len(prompts))
    rows = torch.arange(k).repeat(4)
    g = torch.Generator().manual_seed(1234)
    noise = torch.randn((rows.numel(), *shape[1:]), generator=g).to(dev)
    x = sample_euler(SD3Velocity(ema.shadow.to(dev)), noise, inference_levels(4, meta.shift),
                     prompts.index(rows).to(dev), empty.expand(rows.numel()).to(dev))
    with tempfile.TemporaryDirectory() as d:
        p = save_grid(x.float().cpu(), Path(d) / f"samples_step_{s:08d}.png", nrow=k)
        c.log_artifact(run_id, str(p), "samples")
