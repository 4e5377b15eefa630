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

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from workflows import checkpoints, lineage
from workflows.config import DEFAULT_TEACHER, config_hash, flatten
from workflows.distill_config import DistillConfig
from workflows.embedding_job import prompt_embeddings
from workflows.model_folder import check_model_folder, class_name_of
from workflows.progress import console


def teacher_path(cfg: DistillConfig) -> Path:
    """The checked teacher folder: it exists, has a transformer of a known family, and when ``teacher_class``
    is set it is a diffusers pipeline folder of that class (one error line naming what is wrong)."""
    from workflows.pipeline_folders import is_pipeline_folder, spec_of

    p = DEFAULT_TEACHER if cfg.teacher == "builtin" else Path(cfg.teacher).expanduser().resolve()
    try:
        check_model_folder(p)
        if cfg.teacher_class and not is_pipeline_folder(p):
            raise ValueError(f"{p} is not a pipeline folder (no model_index.json); expected a {cfg.teacher_class}")
        if is_pipeline_folder(p):
            found = spec_of(p).pipeline
            if cfg.teacher_class and found != cfg.teacher_class:
                raise ValueError(f"{p} is a {found} folder; this preset expects a {cfg.teacher_class}")
        class_name_of(p)
    except ValueError as e:
        raise ValueError(f"teacher: {e}") from None
    return p


def check_prompts(cfg: DistillConfig):
    """The prompt source validated in one streamed pass (``workflows.prompt_files.Scan``: count, chunk starts,
    content hash); one error naming the file and line when something in it is wrong."""
    from workflows.embedding_job import ROWS_PER_PART
    from workflows.prompt_files import scan

    return scan(cfg.prompts, ROWS_PER_PART)


def load_prompts(cfg: DistillConfig) -> list[str]:
    """Every prompt as a list (small sources; the job itself streams them: ``check_prompts``, the embedding job)."""
    from workflows.prompt_files import iter_prompts

    check_prompts(cfg)
    return list(iter_prompts(cfg.prompts))


def compute_dtype(cfg: DistillConfig) -> str:
    """ "bfloat16" or "float32": what the DeepSpeed engines compute in (``deepspeed.precision``; auto: bf16 on GPU)."""
    p = cfg.deepspeed.precision
    return "bfloat16" if p == "bf16" or (p == "auto" and cfg.scaling.use_gpu) else "float32"


# Sections that judge a finished job rather than define it: not part of its hash (a new gate re-judges, no retrain)
NOT_IN_JOB_HASH = {"gate", "teacher_class"}


def job_hash(cfg: DistillConfig) -> str:
    """The config hash that names the job (``cdm.config_hash``; checkpoints' ``config_hash``). Fields added after
    jobs existed are left out while at their default, so those jobs keep their keys (and resume)."""
    exclude: dict = {k: True for k in NOT_IN_JOB_HASH}
    if not cfg.lora.enabled:
        exclude["lora"] = True
    if not cfg.train.gradient_checkpointing:
        exclude["train"] = {"gradient_checkpointing"}
    return config_hash(cfg, exclude=exclude)


def job_key(cfg: DistillConfig) -> str:
    return f"{cfg.name}-{job_hash(cfg)[:10]}"


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
        ray.init(
            num_cpus=max(math.ceil(num_cpus), os.cpu_count() or 1), include_dashboard=True, dashboard_host="127.0.0.1"
        )


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
    embeddings: Path | None  # None until prepare() computed them


def storage_dir(cfg: DistillConfig) -> Path:
    """Where the job's checkpoints and embeddings live: ``storage_path``, resolved (the job's folder is
    ``storage_dir(cfg) / job_key(cfg)``)."""
    return Path(cfg.storage_path).expanduser().resolve()


def resume_point(cfg: DistillConfig) -> Path | None:
    """The newest checkpoint of the job, checked (``checkpoints.check``: one clear error when it is corrupt)."""
    key = job_key(cfg)
    ckpt = checkpoints.latest(storage_dir(cfg) / key)
    if ckpt is not None:
        checkpoints.check(ckpt)
        console.print(f"\\[cdm] job {key}: resuming from {ckpt}")
    return ckpt


def open_job(
    cfg: DistillConfig,
    command: str = "",
    parent_run_id: str | None = None,
    extra_tags: dict | None = None,
    check_resume: bool = True,
) -> Job:
    """Resolve inputs and find or create the job's MLflow run (nested under ``parent_run_id`` when given),
    logging its params; no Ray and no embeddings (what exporting a finished job's checkpoint needs).
    ``check_resume=False`` skips the early check of the newest checkpoint folder (a sweep trial killed
    mid-save leaves one that Ray Train never committed and will not resume from)."""
    from workflows.evaluation import folder_hash

    teacher = teacher_path(cfg)
    key = job_key(cfg)
    storage = storage_dir(cfg)
    job_dir = storage / key
    uri = lineage.tracking_uri(cfg.mlflow.tracking_uri)
    if check_resume:
        resume_point(cfg)
    t_hash = folder_hash(teacher)
    c = lineage.client(uri)
    submission = lineage.ray_job_id()
    tags = {
        "cdm.teacher": str(teacher),
        "cdm.teacher_hash": t_hash,
        "cdm.config_hash": job_hash(cfg),
        "cdm.code_version": lineage.code_version(),
        "cdm.ray_job_id": str(submission),
        "cdm.checkpoint_path": str(job_dir),
        "cdm.zero_stage": str(cfg.deepspeed.zero_stage),
        **({"cdm.command": command[:1000]} if command else {}),
    }
    run_tags = {**tags, **(extra_tags or {})}
    if parent_run_id:
        run_tags["mlflow.parentRunId"] = parent_run_id
    run_id, resumed = lineage.find_or_create_run(
        c, cfg.mlflow.experiment, key, key, run_tags, parent_run_id=parent_run_id
    )
    for k, v in run_tags.items():  # a resumed job records where it runs now
        c.set_tag(run_id, k, v)
    lineage.log_params_once(c, run_id, flatten(cfg.model_dump(mode="json")))
    console.print(f"\\[cdm] MLflow run {run_id} ({'resumed' if resumed else 'new'}) at {uri}")
    return Job(cfg, key, teacher, t_hash, storage, job_dir, uri, c, run_id, resumed, tags, None)


def embed(cfg: DistillConfig, teacher_hash: str, storage: Path, teacher: Path, checked=None) -> Path:
    """The job's prompt-embedding store (computed by the Ray Data job the first time): one encoder actor per
    worker GPU on a GPU cluster, one CPU actor here. ``checked``: the ``check_prompts`` result, not scanned again."""
    gpu = cfg.scaling.use_gpu
    return prompt_embeddings(
        checked if checked is not None else cfg.prompts,
        teacher_hash,
        storage,
        teacher,
        actors=cfg.scaling.num_workers if gpu else 1,
        use_gpu=gpu,
        dtype=compute_dtype(cfg),
    )


def prepare(
    cfg: DistillConfig,
    command: str = "",
    parent_run_id: str | None = None,
    extra_tags: dict | None = None,
    check_resume: bool = True,
) -> Job:
    """What :func:`train` needs: the checked inputs, Ray (joined or started), the job's MLflow run
    (:func:`open_job`) and the prompt embeddings (computed once per teacher and prompt list)."""
    checked = check_prompts(cfg)
    teacher_path(cfg)
    if check_resume:  # before Ray starts: a corrupt checkpoint is one error line, not a cluster start-up
        resume_point(cfg)
    init_ray(cfg.scaling.num_workers * cfg.scaling.cpus_per_worker + 1)
    job = open_job(cfg, command, parent_run_id, extra_tags, check_resume=False)
    job.embeddings = embed(cfg, job.teacher_hash, job.storage, job.teacher, checked)
    return job


def train(job: Job, callbacks: list | None = None) -> tuple[Path, float]:
    """Run the TorchTrainer to ``train.student_steps`` (resuming from the job's checkpoints).

    ``callbacks`` go to the Train run config (a sweep passes ``TuneReportCallback``). The workers log every
    metric, validation included, into the job's MLflow run. Returns (final checkpoint, train wall seconds)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from workflows.train_worker import WorkerSpec, train_loop_per_worker

    if job.embeddings is None:
        raise RuntimeError(f"job {job.key}: train() needs a prepared job (distill.prepare), not open_job")
    cfg, c, run_id = job.cfg, job.client, job.run_id
    t0 = time.time()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=WorkerSpec(
            cfg=cfg,
            teacher_path=str(job.teacher),
            embeddings=str(job.embeddings),
            run_id=run_id,
            tracking_uri=job.uri,
            config_hash=job_hash(cfg),
        ).model_dump(mode="json"),
        scaling_config=scaling_config(cfg),
        run_config=RunConfig(
            name=job.key,
            storage_path=str(job.storage),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.num_to_keep),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            callbacks=list(callbacks or []),
        ),
    )
    try:
        result = trainer.fit()
    except Exception as e:
        c.set_terminated(run_id, status="FAILED")
        msg = str(e).strip().splitlines()
        detail = next((ln for ln in reversed(msg) if "Error" in ln or "error" in ln), msg[-1] if msg else repr(e))
        raise RuntimeError(
            f"distillation job {job.key} failed: {detail.strip()} "
            f"(rerun the same command to resume from the last checkpoint)"
        ) from None
    train_s = time.time() - t0
    final = checkpoints.latest(job.job_dir)
    if final is None and result.checkpoint is not None:
        final = Path(result.checkpoint.path)
    return final, train_s


def run_distill(cfg: DistillConfig, command: str = "", extra_tags: dict | None = None) -> dict:
    from workflows.export import finish

    job = prepare(cfg, command, extra_tags=extra_tags)
    final, train_s = train(job)
    return finish(job, final, {"train.wall_s": train_s})
