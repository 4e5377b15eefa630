"""The per-worker loop of a distillation job (runs inside Ray Train's TorchTrainer).

Each worker holds the frozen real teacher and two DeepSpeed engines (student, fake teacher), built by the
same ``cdm_core.distiller.build_distiller`` as the reference loop; the student EMA lives beside the student.
``cdm_core.step.CDMStep`` does all the maths. Every ``checkpoint_every`` student steps every rank writes its
shards (``workflows.checkpoints``) and reports them through ``ray.train.report``; rank 0 first flushes its
buffered MLflow metrics, validation included (the job's run is the one writer of its metrics; the run's
high-water mark keeps a restart from logging a step twice).
Resume: ``ray.train.get_checkpoint()`` -> ``checkpoints.load``.
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

from workflows.config import Strict
from workflows.distill_config import DistillConfig

WORKERS_TAG = "cdm.workers"  # MLflow tag: where each rank of the latest (re)start runs (JSON)
RESUMES_TAG = "cdm.resumed_at"  # MLflow tag: the student steps this job was resumed from


class WorkerSpec(Strict):
    """What the driver hands every worker (``train_loop_config``)."""

    cfg: DistillConfig
    teacher_path: str
    embeddings: str
    run_id: str
    tracking_uri: str
    config_hash: str


def say(msg: str) -> None:
    """One progress line on the driver's console. Ray Train patches ``print`` to also log through its logger
    when ``sys.stdout`` is wrapped, which showed every line twice; the real stdout avoids the tee."""
    import sys

    print(msg, file=sys.__stdout__ or sys.stdout, flush=True)


def max_across_ranks(value: int) -> int:
    t = torch.tensor([value], dtype=torch.int64)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t.item())


def peak_memory(dev) -> dict[str, float]:
    """This worker's peak memory so far: host RSS (MiB; Linux reports ru_maxrss in KiB) and, on GPU, the peak
    allocated by torch's CUDA allocator."""
    import resource

    out = {"memory/peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if dev.type == "cuda":
        out["memory/peak_cuda_mib"] = torch.cuda.max_memory_allocated(dev) / 2**20
    return out


def _worker_layout(rank: int) -> list[dict]:
    """Every rank's node and process, gathered on all ranks (rank 0 records them in MLflow)."""
    import ray

    me = {"rank": rank, "node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}
    if not torch.distributed.is_initialized():
        return [me]
    out: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, me)
    return out


def train_loop_per_worker(config: dict) -> None:
    import ray.train

    from cdm_core.seeds import prompt_stream
    from workflows import checkpoints, lineage
    from workflows.model_folder import load_model
    from workflows.prompt_store import PromptStore
    from workflows.validation import Validator, log_sample_grid
    from workflows.worker_roles import build_roles, ema_model, freeze_to, held_mib, teacher_model

    spec = WorkerSpec.model_validate(config)
    cfg = spec.cfg
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    dev = torch.device("cuda", ctx.get_local_rank()) if cfg.scaling.use_gpu else torch.device("cpu")
    layout = _worker_layout(rank)

    teacher = load_model(spec.teacher_path, dev)
    b, core = cfg.train.batch_size_per_worker, cfg.cdm.to_core()
    roles = build_roles(cfg, teacher, rank, world, max_across_ranks)
    d = roles.distiller
    step, st, ft, ema = d.step, d.student, d.fake, d.ema

    store = PromptStore(spec.embeddings, rank, world)  # this rank's shard, whole or one part at a time
    empty_b = store.empty.expand(b).to(dev)
    shape = (b, *teacher.shape)
    dtype = torch.bfloat16 if st.engine.bfloat16_enabled() else torch.float32
    freeze_to(teacher.module, dtype)

    iteration, samples_seen, resumes = 0, 0, []
    # eval.keep_best: the EMA with the best validation score (eval.select_by) so far rides along in every
    # checkpoint (rank 0)
    best: dict | None = None
    best_ema: dict | None = None
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as cd:
            m, ema_state, best, best_ema = checkpoints.load(Path(cd), rank, st.engine, ft.engine, roles.frozen_base)
        ema.load_state_dict(ema_state)
        iteration, step.student_steps, samples_seen = m["iteration"], m["student_steps"], m["samples_seen"]
        resumes = list(m.get("resumes", [])) + [{"student_steps": step.student_steps, "time": time.time()}]
        if rank == 0:
            say(f"[cdm] resumed from checkpoint at student step {step.student_steps}")

    c = lineage.client(spec.tracking_uri) if rank == 0 else None
    run_id = spec.run_id
    if rank == 0:
        c.set_tag(run_id, WORKERS_TAG, json.dumps(layout))
        if resumes:
            c.set_tag(run_id, RESUMES_TAG, ",".join(str(r["student_steps"]) for r in resumes))
    buffer = lineage.MetricBuffer(c, run_id)
    total = cfg.train.student_steps
    t_start, steps_at_start = time.time(), step.student_steps
    t_window, iters_window = time.time(), 0
    acc: dict[str, float] = {}
    n_acc = 0

    def save_and_report(metrics: dict) -> None:
        tmp = Path(tempfile.mkdtemp(prefix=f"cdm-ckpt-r{rank}-"))
        try:
            checkpoints.save(
                tmp,
                rank,
                st.engine,
                ft.engine,
                ema.state_dict() if rank == 0 else None,
                {
                    "iteration": iteration,
                    "student_steps": step.student_steps,
                    "samples_seen": samples_seen,
                    "world_size": world,
                    "zero_stage": cfg.deepspeed.zero_stage,
                    "config_hash": spec.config_hash,
                    "resumes": resumes,
                },
                best,
                best_ema,
                roles.frozen_base,
            )
            if rank == 0:  # before the report: a sweep's scheduler may stop the trial on it (the run's
                buffer.flush(c, run_id)  # high-water mark keeps a restart from logging these steps again)
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(str(tmp)),
                checkpoint_dir_name=checkpoints.dir_name(step.student_steps),
            )
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    val_every = cfg.eval.val_every
    # validation scores the built-in domain (both judges, pixel panel); a pipeline folder's latents get grids only
    latent = teacher.meta.latent
    validator = None
    if val_every and rank == 0 and not latent:
        with teacher_model(roles, teacher.module) as base:
            validator = Validator(cfg, teacher.family, teacher.shape, dev, base)
    if val_every and rank == 0 and latent:
        say("[cdm] validation: no judges for this teacher's domain; sample grids only, the last EMA is exported")
    decode = None
    stream = prompt_stream(cfg.cdm.seed, rank)

    while step.student_steps < total:
        cond = store.batch(b, stream, iteration).to(dev)
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
        if s % cfg.train.log_every == 0 or s == total:
            dt = time.time() - t_window
            m = {k: v / n_acc for k, v in acc.items()}
            m["throughput/samples_per_s"] = iters_window * b * world / max(dt, 1e-9)
            m["throughput/student_steps_per_s"] = iters_window / core.update_ratio / max(dt, 1e-9)
            m.update(peak_memory(dev))
            m.update(held_mib(roles, teacher.module))
            acc.clear()
            n_acc = 0
            t_window, iters_window = time.time(), 0
            if rank == 0:
                buffer.add(s, m)
                done = s - steps_at_start
                eta = (total - s) * (time.time() - t_start) / max(done, 1)
                say(
                    f"[cdm] step {s}/{total} "
                    + " ".join(
                        f"{k.split('/')[-1] if k.startswith('loss/') else k}={m[k]:.4g}"
                        for k in ("loss/ca", "loss/dm", "loss/cdm", "loss/fake")
                        if k in m
                    )
                    + f" N={m['schedule/n']:.1f} {m['throughput/samples_per_s']:.1f} samples/s eta {eta:.0f}s"
                )
        if rank == 0 and (s % cfg.train.sample_every == 0 or s == total):
            if latent and decode is None:
                from workflows.pipeline_folders import LatentDecoder

                decode = LatentDecoder(spec.teacher_path, dev)
            with ema_model(roles) as m_ema:
                args = (store.head(10), store.empty, shape, dev, core.sampler_steps, core.shift, decode)
                log_sample_grid(c, run_id, m_ema, teacher.family, s, *args)
        val_due = bool(val_every) and s % val_every == 0
        if s % cfg.train.checkpoint_every == 0 or s == total or val_due:
            report = {"student_steps": s, "iteration": iteration}
            if validator is not None:  # every report carries the validation metrics (a sweep's scheduler reads them)
                with ema_model(roles) as m_ema:
                    val = validator(m_ema)
                report.update(val)
                key = f"val_{cfg.eval.select_by}"
                # a best.json from before select_by holds only {"val_fd": ...}: unless it is the metric selected by,
                # it counts as no best and is replaced at this validation
                held = best.get("value", best.get(key, float("inf"))) if best is not None else None
                if cfg.eval.keep_best and (best is None or val[key] < held):
                    best = {"student_steps": s, "metric": key, "value": val[key], **val}
                    best_ema = copy.deepcopy(ema.state_dict())
                say(f"[cdm] step {s}/{total} validation " + " ".join(f"{k}={v:.4g}" for k, v in val.items()))
                buffer.add(s, val)
            save_and_report(report)
