"""What ``cdm distill --dry-run`` prints beside the resolved config: the workers and resources the job will ask
Ray for, and the estimated memory per GPU of the chosen mode and ZeRO stage (``workflows.memory_plan``), from the
teacher folder's transformer config, or, when the folder is not on this machine, from the reference config of the
class the preset expects (SD3-Medium, LongCat-Image)."""

from __future__ import annotations

import json
from pathlib import Path

from workflows.distill_config import DistillConfig

REFERENCE = {"StableDiffusion3Pipeline": "sd3-medium", "LongCatImagePipeline": "longcat-image"}
TEXT_TOKENS = {"SD3Transformer2DModel": 333, "LongCatImageTransformer2DModel": 512}  # the pipelines' encode_prompt
GPU_SIZES_GIB = (80, 141)


def _transformer(cfg: DistillConfig, folder: Path | None) -> tuple[str, dict, str]:
    """(class name, config, where it came from)."""
    from workflows.memory_plan import BACKBONES

    if folder is not None and (folder / "transformer" / "config.json").exists():
        conf = json.loads((folder / "transformer" / "config.json").read_text())
        return conf["_class_name"], {k: v for k, v in conf.items() if not k.startswith("_")}, str(folder)
    if cfg.teacher_class in REFERENCE:
        name = REFERENCE[cfg.teacher_class]
        cls, conf = BACKBONES[name]
        return cls, dict(conf), f"the reference {name} config (teacher folder not found)"
    raise ValueError("teacher: no folder to read the transformer config from, and no teacher_class to assume")


def _tokens_hidden_layers(cls: str, conf: dict, image_size: int) -> tuple[int, int, int]:
    from workflows.memory_plan import dit_tokens

    hidden = int(conf["num_attention_heads"]) * int(conf["attention_head_dim"])
    text = TEXT_TOKENS.get(cls, 16)
    if cls == "LongCatImageTransformer2DModel":  # packed 2x2 latents, patch 1
        side = image_size // 16
        return side * side + text, hidden, int(conf["num_layers"]) + int(conf.get("num_single_layers", 0))
    latent = int(conf.get("sample_size", image_size // 8))
    return dit_tokens(latent, int(conf["patch_size"]), text), hidden, int(conf["num_layers"])


def job_plan(cfg: DistillConfig, teacher: Path | None) -> dict:
    """The memory estimate per GPU (GiB, term by term) of this job, and whether it fits common GPU sizes."""
    from workflows.memory_plan import count_params, dit_activation_bytes, fits, lora_params, plan

    cls, conf, source = _transformer(cfg, teacher)
    image_size = 1024
    if teacher is not None and teacher.exists():
        from workflows.model_folder import read_meta

        image_size = read_meta(teacher).image_size
    tokens, hidden, layers = _tokens_hidden_layers(cls, conf, image_size)
    mode = "lora" if cfg.lora.enabled else "full"
    gpu = cfg.scaling.use_gpu
    precision = "bf16" if cfg.deepspeed.precision == "bf16" or (cfg.deepspeed.precision == "auto" and gpu) else "fp32"
    n = count_params(cls, conf)
    act = dit_activation_bytes(
        tokens, hidden, layers, cfg.train.gradient_checkpointing, mode, bytes_per_elem=2 if precision == "bf16" else 4
    )
    targets = tuple(cfg.lora.target_modules)
    p = plan(
        n,
        mode,
        cfg.deepspeed.zero_stage,
        cfg.scaling.num_workers,
        precision,
        cfg.train.batch_size_per_worker,
        act,
        lora_params(cls, conf, cfg.lora.rank, targets) if mode == "lora" else 0,
        teacher_precision="fp32" if mode == "full" else None,  # full mode loads the frozen teacher in fp32
    )
    return {
        "transformer": cls,
        "config_from": source,
        "image_size": image_size,
        "tokens_per_sample": tokens,
        **p,
        "fits_gib": {str(g): fits(p, g) for g in GPU_SIZES_GIB},
        "note": "estimate (workflows.memory_plan.plan: formula per term; fragmentation and comm buckets ignored)",
    }
