"""A finished job's student: the EMA of a checkpoint (the last one, or the best validation one with
``eval.keep_best``) exported as a diffusers folder, evaluated on the test seeds, logged and registered.

Used by ``cdm distill`` after training and by the sweep for its best trial (``tuning.export``), which opens
the job with ``distill.open_job`` (no Ray, no embeddings).
"""

from __future__ import annotations

import json
from pathlib import Path

from cdm_core.schedule import inference_levels, unshifted_levels
from workflows import checkpoints, lineage
from workflows.config import EvalConfig, build
from workflows.distill import Job
from workflows.distill_config import DistillConfig
from workflows.model_folder import ModelMeta, empty_like, load_transformer, read_meta, save_model_folder
from workflows.progress import console


def export_student(
    ckpt: Path, teacher: Path, out: Path, cfg: DistillConfig, tags: dict, ema_file: str = checkpoints.EMA
) -> Path:
    """EMA weights of a checkpoint (``ema.pt``, or ``best_ema.pt`` for the best-validation EMA) -> a
    diffusers folder whose scheduler reproduces the student's ``cdm.sampler_steps`` levels."""
    state = checkpoints.load_ema_state(ckpt, ema_file)
    adapter = base = None
    if cfg.lora.enabled:  # the EMA adapter merged into the teacher; the adapter alone beside it
        from workflows.lora import ema_adapter_weights, merged_student

        base = load_transformer(teacher)
        adapter = ema_adapter_weights(base, cfg.lora, state["shadow"])
        model = merged_student(base, cfg.lora, adapter)
    else:
        model = empty_like(teacher)
        model.load_state_dict({k: v.float() for k, v in state["shadow"].items()})
    tmeta = read_meta(teacher)
    k = cfg.cdm.sampler_steps
    sigmas = unshifted_levels(k)
    levels = [round(float(v), 4) for v in inference_levels(k, cfg.cdm.shift)]
    if tmeta.latent:  # a pipeline folder: the user's folder with this transformer and an exact-levels scheduler
        from workflows.pipeline_folders import export_pipeline

        card = {**vars(tmeta), "shift": 1.0, "default_steps": k, "default_guidance": 1.0}
        card["provenance"] = {"distilled_by": "cdm distill", **tags}
        exact = [float(v) for v in inference_levels(k, cfg.cdm.shift)]
        folder = export_pipeline(Path(teacher), model, out, exact, card)
        return _with_adapter(folder, base, cfg, adapter)
    meta = ModelMeta(
        family=tmeta.family,
        text_encoder=tmeta.text_encoder,
        max_tokens=tmeta.max_tokens,
        image_size=tmeta.image_size,
        channels=tmeta.channels,
        shift=cfg.cdm.shift,
        default_steps=k,
        default_guidance=1.0,
        dataset=tmeta.dataset,
        provenance={
            "distilled_by": "cdm distill",
            **tags,
            "inference_sigmas": sigmas,
            "note": f"diffusers: scheduler.set_timesteps(sigmas={sigmas}) applies shift "
            f"{cfg.cdm.shift:g} -> levels {levels}",
        },
    )
    return _with_adapter(save_model_folder(model, out, meta), base, cfg, adapter)


def _with_adapter(folder: Path, base, cfg: DistillConfig, adapter: dict | None) -> Path:
    """LoRA mode: the EMA adapter alone under ``<folder>/lora_adapter`` (diffusers' ``save_lora_adapter``
    format: ``transformer.load_lora_adapter(path, weight_name="pytorch_lora_weights.safetensors")``;
    SD3 pipelines: ``pipe.load_lora_weights(path)``)."""
    if adapter is not None:
        from workflows.lora import save_adapter

        save_adapter(base, cfg.lora, adapter, folder / "lora_adapter")
    return folder


def finish(job: Job, final: Path, metrics: dict | None = None) -> dict:
    """Export the EMA student of ``final``, evaluate it on the test set (``cfg.eval``), log and register it."""
    from workflows.evaluation import METRICS, evaluate_folder

    cfg, c, run_id, job_dir = job.cfg, job.client, job.run_id, job.job_dir
    out = job_dir / "student"
    step = (
        checkpoints.read_meta(final).get("student_steps", cfg.train.student_steps)
        if (final / checkpoints.META).exists()
        else cfg.train.student_steps
    )
    ema_file, chosen = checkpoints.EMA, {"cdm.export.selection": "last", "cdm.export.student_steps": str(step)}
    best = checkpoints.best(final) if cfg.eval.keep_best else None
    if best is not None:
        ema_file = checkpoints.BEST_EMA
        metric = best.get("metric", "val_fd")
        chosen = {
            "cdm.export.selection": f"best_{metric}",
            "cdm.export.student_steps": str(best["student_steps"]),
            f"cdm.export.{metric}": f"{best[metric]:.6g}",
        }
        console.print(
            f"\\[cdm] exporting the EMA of student step {best['student_steps']} (best {metric} "
            f"{best[metric]:.4g} on validation seed {cfg.eval.val_seed}; the job ran to step {step})"
        )
    for k, v in chosen.items():
        c.set_tag(run_id, k, v)
    folder = export_student(
        final,
        job.teacher,
        out,
        cfg,
        {
            "mlflow_run_id": run_id,
            "job_key": job.key,
            "teacher": str(job.teacher),
            "teacher_hash": job.teacher_hash,
            **chosen,
        },
        ema_file,
    )
    ev_cfg = build(
        EvalConfig,
        dict(
            steps=cfg.cdm.sampler_steps,
            n_samples=cfg.eval.n_samples,
            seeds=cfg.eval.seeds,
            reference_steps=cfg.eval.reference_steps,
        ),
    )
    if read_meta(job.teacher).latent:  # the judges know the built-in domain only
        console.print("\\[cdm] evaluation: no judges for this teacher's domain; the student is exported unscored")
        ev = {}
    else:
        ev = evaluate_folder(folder, ev_cfg, job_dir / "eval", job.teacher)
    metrics = {**{f"eval.{k}": ev[k]["mean"] for k in METRICS if k in ev}, **(metrics or {})}
    lineage.log_metrics(c, run_id, [(int(step), metrics)])
    c.log_artifacts(run_id, str(folder), "student")
    if ev:
        c.log_artifact(run_id, str(job_dir / "eval" / "eval.json"), "eval")
        c.log_artifact(run_id, str(job_dir / "eval" / "grid.png"), "eval")
    version = lineage.register_version(c, cfg.mlflow.registered_model, run_id, {**job.tags, **chosen}, metrics)
    c.set_terminated(run_id, status="FINISHED")
    summary = {
        "job_key": job.key,
        "run_id": run_id,
        "model": cfg.mlflow.registered_model,
        "version": version,
        "student_folder": str(folder),
        "checkpoint": str(final),
        "tracking_uri": job.uri,
        "exported_student_steps": int(chosen["cdm.export.student_steps"]),
        "selection": chosen["cdm.export.selection"],
        **metrics,
    }
    (job_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
