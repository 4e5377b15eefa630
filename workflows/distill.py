"""``cdm distill``: a CDM distillation job on Ray Train with DeepSpeed ZeRO and MLflow lineage.

    cdm distill --config tiny                                   # local Ray (started when RAY_ADDRESS is unset)
    cdm distill --config tiny --set scaling.num_workers=4 --set deepspeed.zero_stage=3
    ray job submit --working-dir . -- cdm distill --config tiny  # against a running cluster
    cdm distill --config tiny --dry-run                         # resolved config, job key, resources

Resume = run the same command again: the job key (name + config hash) finds the checkpoints under
``storage_path/<job key>`` and the MLflow run tagged with it. Steps: prompt embeddings (Ray Data,
cached per teacher) -> TorchTrainer (workers in ``workflows.train_worker``) -> export the EMA student
as a diffusers folder -> evaluate -> register a model version with lineage tags and metrics.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from workflows import lineage
from workflows.config import DEFAULT_TEACHER, EvalConfig, build, config_hash, flatten
from workflows.distill_config import DistillConfig
from workflows.files import save_atomic
from workflows.model_folder import ModelMeta, check_model_folder, read_meta, save_model_folder
from workflows.progress import console

MAX_PROMPT_CHARS = 1000


def teacher_path(cfg: DistillConfig) -> Path:
    p = DEFAULT_TEACHER if cfg.teacher == "builtin" else Path(cfg.teacher).expanduser().resolve()
    try:
        return check_model_folder(p)
    except ValueError as e:
        raise ValueError(f"teacher: {e}") from None


def load_prompts(cfg: DistillConfig) -> list[str]:
    if cfg.prompts == "builtin":
        from workflows.prompts import train_prompts

        return [p for p, _ in train_prompts()]
    path = Path(cfg.prompts).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"prompts: {path} is not a file (one prompt per line)")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"prompts: {path} is not UTF-8 text") from None
    prompts = [ln.strip() for ln in lines if ln.strip()]
    if not prompts:
        raise ValueError(f"prompts: {path} holds no prompt")
    long = [i + 1 for i, ln in enumerate(lines) if len(ln) > MAX_PROMPT_CHARS]
    if long:
        raise ValueError(f"prompts: {path} line {long[0]} is longer than {MAX_PROMPT_CHARS} characters")
    return prompts


def job_key(cfg: DistillConfig) -> str:
    return f"{cfg.name}-{config_hash(cfg)[:10]}"


def resources(cfg: DistillConfig) -> dict:
    s = cfg.scaling
    per = {"CPU": s.cpus_per_worker, **({"GPU": s.gpus_per_worker} if s.use_gpu else {}), **s.resources_per_worker}
    return {"workers": s.num_workers, "per_worker": per, "total": {k: v * s.num_workers for k, v in per.items()}}


def scaling_config(cfg: DistillConfig):
    from ray.train import ScalingConfig

    s = cfg.scaling
    per = {"CPU": s.cpus_per_worker, **s.resources_per_worker}
    if s.use_gpu:
        per["GPU"] = s.gpus_per_worker
    return ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu, resources_per_worker=per)


class _PromptEncoder:
    """Ray Data actor: prompt batch -> token states + pooled vectors (loads the encoder once)."""

    def __init__(self):
        from workflows.text_encoder import TextEncoder

        self.enc = TextEncoder()

    def __call__(self, batch):
        import numpy as np

        c = self.enc.encode([str(p) for p in batch["prompt"]])
        return {"idx": batch["idx"], "tokens": c.tokens.numpy().astype(np.float32),
                "pooled": c.pooled.numpy().astype(np.float32)}


def prompt_embeddings(prompts: list[str], teacher_hash: str, storage: Path) -> Path:
    """Embeddings of the prompts and of the empty prompt, computed once per (teacher, prompts) with Ray Data."""
    h = hashlib.sha256("\x00".join(prompts).encode()).hexdigest()[:16]
    path = storage / "embeddings" / f"emb-{teacher_hash}-{h}.pt"
    if path.exists():
        return path
    import numpy as np
    import ray.data

    items = [{"idx": i, "prompt": p} for i, p in enumerate(prompts + [""])]
    batch = 256  # one block per encoder batch: a block per handful of prompts only adds actor calls
    ds = ray.data.from_items(items, override_num_blocks=-(-len(items) // batch)).map_batches(
        _PromptEncoder, batch_size=batch, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=1)
    rows = sorted(ds.take_all(), key=lambda r: int(r["idx"]))
    tokens = torch.from_numpy(np.stack([r["tokens"] for r in rows]))
    pooled = torch.from_numpy(np.stack([r["pooled"] for r in rows]))
    save_atomic({"tokens": tokens[:-1], "pooled": pooled[:-1], "empty_tokens": tokens[-1:],
                 "empty_pooled": pooled[-1:], "prompts": prompts}, path)
    return path


def latest_checkpoint(job_dir: Path) -> Path | None:
    cands = sorted(p for p in job_dir.glob("step_*") if p.is_dir())
    return cands[-1] if cands else None


def check_checkpoint(ckpt: Path) -> None:
    """Fail before starting workers when the checkpoint to resume from is unusable."""
    meta = ckpt / "meta.json"
    try:
        m = json.loads(meta.read_text())
        int(m["student_steps"]), int(m["iteration"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RuntimeError(f"checkpoint {ckpt} is corrupt: meta.json unreadable ({type(e).__name__}: {e}); "
                           f"delete {ckpt} to resume from the one before") from None
    for part in ("student", "fake"):
        states = list((ckpt / part / "ckpt").glob("*model_states.pt"))
        if not states:
            raise RuntimeError(f"checkpoint {ckpt} is corrupt: no {part} model states; delete it to resume "
                               "from the one before")
        for f in states:
            try:
                torch.load(f, map_location="cpu", weights_only=False)
            except Exception as e:
                raise RuntimeError(f"checkpoint {ckpt} is corrupt: {f.name} does not load ({type(e).__name__}); "
                                   "delete it to resume from the one before") from None
    if not (ckpt / "ema.pt").exists():
        raise RuntimeError(f"checkpoint {ckpt} is corrupt: ema.pt is missing")


def init_ray(num_cpus: float) -> None:
    """Join ``RAY_ADDRESS`` when set, else start a local Ray with at least ``num_cpus`` (and every core)."""
    import ray

    if ray.is_initialized():
        return
    addr = os.environ.get("RAY_ADDRESS")
    if addr:
        ray.init(address=addr, log_to_driver=True)
    else:
        # The dashboard serves the state API that Ray Train v2's PlacementGroupCleaner polls every second;
        # without it the cleaner cannot work and prints a warning per poll into the job's output.
        ray.init(num_cpus=max(math.ceil(num_cpus), os.cpu_count() or 1), include_dashboard=True,
                 dashboard_host="127.0.0.1")


def export_student(ckpt: Path, teacher: Path, out: Path, cfg: DistillConfig, tags: dict,
                   ema_file: str = "ema.pt") -> Path:
    """EMA weights of a checkpoint (``ema.pt``, or ``best_ema.pt`` for the best-validation EMA) -> a
    diffusers folder whose scheduler reproduces the 4-step levels."""
    from diffusers import SD3Transformer2DModel

    state = torch.load(ckpt / ema_file, map_location="cpu", weights_only=False)
    model = SD3Transformer2DModel.from_config(SD3Transformer2DModel.load_config(str(teacher / "transformer")))
    model.load_state_dict({k: v.float() for k, v in state["shadow"].items()})
    tmeta = read_meta(teacher)
    meta = ModelMeta(family=tmeta.family, text_encoder=tmeta.text_encoder, max_tokens=tmeta.max_tokens,
                     image_size=tmeta.image_size, channels=tmeta.channels, shift=cfg.cdm.shift, default_steps=4,
                     default_guidance=1.0, dataset=tmeta.dataset,
                     provenance={"distilled_by": "cdm distill", **tags,
                                 "inference_sigmas": [1.0, 0.75, 0.5, 0.25],
                                 "note": "diffusers: scheduler.set_timesteps(sigmas=[1.0, 0.75, 0.5, 0.25]) "
                                         "applies shift 3 -> levels [1, .9, .75, .5, 0]"})
    return save_model_folder(model, out, meta)


@dataclass
class Job:
    """A prepared distillation job: its config, paths, MLflow run and cached prompt embeddings."""

    cfg: DistillConfig
    key: str
    teacher: Path
    teacher_hash: str
    storage: Path
    job_dir: Path
    uri: str
    client: object
    run_id: str
    resumed: bool
    tags: dict
    embeddings: Path


def prepare(cfg: DistillConfig, command: str = "", parent_run_id: str | None = None,
            extra_tags: dict | None = None, check_resume: bool = True) -> Job:
    """Resolve inputs, find or create the job's MLflow run (nested under ``parent_run_id`` when given),
    log params and compute (or reuse) the prompt embeddings. ``check_resume=False`` skips the early check
    of the newest checkpoint folder (a sweep trial killed mid-save leaves one that Ray Train never
    committed and will not resume from)."""
    from workflows.evaluation import folder_hash

    teacher = teacher_path(cfg)
    prompts = load_prompts(cfg)
    key = job_key(cfg)
    storage = Path(cfg.storage_path).expanduser().resolve()
    job_dir = storage / key
    uri = lineage.tracking_uri(cfg.mlflow.tracking_uri)
    ckpt = latest_checkpoint(job_dir)
    if ckpt is not None and check_resume:
        check_checkpoint(ckpt)
        console.print(f"\\[cdm] job {key}: resuming from {ckpt}")
    t_hash = folder_hash(teacher)
    c = lineage.client(uri)
    init_ray(cfg.scaling.num_workers * cfg.scaling.cpus_per_worker + 1)
    submission = lineage.ray_job_id()
    tags = {"cdm.teacher": str(teacher), "cdm.teacher_hash": t_hash, "cdm.config_hash": config_hash(cfg),
            "cdm.code_version": lineage.code_version(), "cdm.ray_job_id": str(submission),
            "cdm.checkpoint_path": str(job_dir), "cdm.zero_stage": str(cfg.deepspeed.zero_stage),
            **({"cdm.command": command[:1000]} if command else {})}
    run_tags = {**tags, **(extra_tags or {})}
    if parent_run_id:
        run_tags["mlflow.parentRunId"] = parent_run_id
    run_id, resumed = lineage.find_or_create_run(c, cfg.mlflow.experiment, key, key, run_tags,
                                                 parent_run_id=parent_run_id)
    for k, v in run_tags.items():  # a resumed job records where it runs now
        c.set_tag(run_id, k, v)
    lineage.log_params_once(c, run_id, flatten(cfg.model_dump(mode="json")))
    console.print(f"\\[cdm] MLflow run {run_id} ({'resumed' if resumed else 'new'}) at {uri}")
    emb = prompt_embeddings(prompts, t_hash, storage)
    return Job(cfg, key, teacher, t_hash, storage, job_dir, uri, c, run_id, resumed, tags, emb)


def train(job: Job, callbacks: list | None = None, val_to_mlflow: bool = True) -> tuple[Path, float]:
    """Run the TorchTrainer to ``train.student_steps`` (resuming from the job's checkpoints).

    ``callbacks`` go to the Train run config (a sweep passes ``TuneReportCallback``); with
    ``val_to_mlflow=False`` the workers leave the validation metrics to the caller (the sweep driver
    logs them from Tune's results). Returns (final checkpoint, train wall seconds)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from workflows.train_worker import train_loop_per_worker

    cfg, c, run_id = job.cfg, job.client, job.run_id
    t0 = time.time()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "teacher_path": str(job.teacher),
                           "embeddings": str(job.embeddings), "run_id": run_id, "tracking_uri": job.uri,
                           "job_dir": str(job.job_dir), "config_hash": config_hash(cfg),
                           "val_to_mlflow": val_to_mlflow},
        scaling_config=scaling_config(cfg),
        run_config=RunConfig(name=job.key, storage_path=str(job.storage),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.num_to_keep),
                             failure_config=FailureConfig(max_failures=cfg.train.max_failures),
                             callbacks=list(callbacks or [])),
    )
    try:
        result = trainer.fit()
    except Exception as e:
        c.set_terminated(run_id, status="FAILED")
        msg = str(e).strip().splitlines()
        detail = next((ln for ln in reversed(msg) if "Error" in ln or "error" in ln), msg[-1] if msg else repr(e))
        raise RuntimeError(f"distillation job {job.key} failed: {detail.strip()} "
                           f"(rerun the same command to resume from the last checkpoint)") from None
    train_s = time.time() - t0
    final = latest_checkpoint(job.job_dir)
    if final is None and result.checkpoint is not None:
        final = Path(result.checkpoint.path)
    return final, train_s


def finish(job: Job, final: Path, metrics: dict | None = None) -> dict:
    """Export the EMA student of ``final``, evaluate it on the test set (``cfg.eval``), log and register it."""
    from workflows.evaluation import METRICS, evaluate_folder
    from workflows.train_worker import BEST_EMA, BEST_META

    cfg, c, run_id, job_dir = job.cfg, job.client, job.run_id, job.job_dir
    out = job_dir / "student"
    step = json.loads((final / "meta.json").read_text()).get("student_steps", cfg.train.student_steps) \
        if (final / "meta.json").exists() else cfg.train.student_steps
    ema_file, chosen = "ema.pt", {"cdm.export.selection": "last", "cdm.export.student_steps": str(step)}
    if cfg.eval.keep_best and (final / BEST_META).exists():
        best = json.loads((final / BEST_META).read_text())
        ema_file = BEST_EMA
        metric = best.get("metric", "val_fd")
        chosen = {"cdm.export.selection": f"best_{metric}", "cdm.export.student_steps": str(best["student_steps"]),
                  f"cdm.export.{metric}": f"{best[metric]:.6g}"}
        console.print(f"\\[cdm] exporting the EMA of student step {best['student_steps']} (best {metric} "
                      f"{best[metric]:.4g} on validation seed {cfg.eval.val_seed}; the job ran to step {step})")
    for k, v in chosen.items():
        c.set_tag(run_id, k, v)
    folder = export_student(final, job.teacher, out, cfg, {"mlflow_run_id": run_id, "job_key": job.key,
                                                          "teacher": str(job.teacher),
                                                          "teacher_hash": job.teacher_hash, **chosen}, ema_file)
    ev_cfg = build(EvalConfig, dict(steps=4, n_samples=cfg.eval.n_samples, seeds=cfg.eval.seeds,
                                    reference_steps=cfg.eval.reference_steps))
    ev = evaluate_folder(folder, ev_cfg, job_dir / "eval", job.teacher)
    metrics = {**{f"eval.{k}": ev[k]["mean"] for k in METRICS if k in ev}, **(metrics or {})}
    lineage.log_metrics(c, run_id, [(int(step), metrics)])
    c.log_artifacts(run_id, str(folder), "student")
    c.log_artifact(run_id, str(job_dir / "eval" / "eval.json"), "eval")
    c.log_artifact(run_id, str(job_dir / "eval" / "grid.png"), "eval")
    version = register(c, cfg.mlflow.registered_model, run_id, {**job.tags, **chosen}, metrics)
    c.set_terminated(run_id, status="FINISHED")
    summary = {"job_key": job.key, "run_id": run_id, "model": cfg.mlflow.registered_model, "version": version,
               "student_folder": str(folder), "checkpoint": str(final), "tracking_uri": job.uri,
               "exported_student_steps": int(chosen["cdm.export.student_steps"]),
               "selection": chosen["cdm.export.selection"], **metrics}
    (job_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def run_distill(cfg: DistillConfig, command: str = "") -> dict:
    job = prepare(cfg, command)
    final, train_s = train(job)
    return finish(job, final, {"train.wall_s": train_s})


def register(c, name: str, run_id: str, tags: dict, metrics: dict) -> str:
    """Register the run's ``student`` artifact as a version of ``name`` (once per run)."""
    from mlflow.exceptions import MlflowException

    try:
        c.get_registered_model(name)
    except MlflowException:
        c.create_registered_model(name, description="CDM 4-step students")
    for mv in c.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"):
        return mv.version
    run = c.get_run(run_id)
    mv_tags = {**tags, **{k: f"{v:.6g}" for k, v in metrics.items()}, "cdm.mlflow_run_id": run_id}
    mv = c.create_model_version(name, f"{run.info.artifact_uri}/student", run_id=run_id, tags=mv_tags)
    return mv.version
