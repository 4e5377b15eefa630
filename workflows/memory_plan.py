"""Per-GPU memory estimate of a CDM distillation job, before any weights exist.

What a worker holds (``cdm_core.distiller.build_distiller``, ``workflows.train_worker``): a frozen real teacher,
a trainable student and a trainable fake teacher (copies of the teacher, each a DeepSpeed engine with AdamW),
an EMA of the student, and the activations of one micro-batch. In LoRA mode the student and the fake teacher are
two adapters on ONE frozen base whose adapters-off forward is the real teacher: one copy of the base, and only the
adapters are trained, optimised and EMA'd.

Parameter counts come from the diffusers class instantiated on the meta device (shapes only: no weights, no
download). Everything returned is a plain dict or number, so ``cdm distill --dry-run`` can print or log it.
These are estimates; what they leave out is listed in :func:`plan`.
"""

from __future__ import annotations

import torch

from workflows.model_folder import CLASS_OF

GIB = 2**30
# the attention projections of SD3's and LongCat's blocks (image stream, then the context stream's add_*)
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
# activation elements autograd keeps per (layer x token x hidden) in one forward with gradient, bf16, fused SDPA:
# about the midpoint of the meta-device traces of SD3-Medium (full 21.1, LoRA 12.2) and LongCat-Image
# (26.5 / 14.8) at 1024^2 (benchmarks/results/memory.md); use traced_activation_bytes for a given model
ELEMS_PER_LAYER = {"full": 24.0, "lora": 14.0}
CDM_GRAD_GRAPHS = 2  # a student step holds two student graphs with gradient: x0_hat (CA+DM) and x0_hat' (CDM)
ZERO3_MAX_LIVE_PARAMS = 10**9  # DeepSpeed's default stage3_max_live_parameters
BYTES = {"bf16": 2, "fp32": 4}

# SD3-Medium's transformer (stabilityai/stable-diffusion-3-medium-diffusers); the last two fields are the class's
# SD3.0 defaults (SD3.5 sets them)
SD3_MEDIUM = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    out_channels=16,
    pos_embed_max_size=192,
    dual_attention_layers=(),
    qk_norm=None,
)
# LongCat-Image: not in diffusers' source; 10 dual + 20 single blocks as third-party ports of the released
# checkpoint give them (the class defaults, 19 + 38 blocks, are FLUX.1's size, ~11.9B)
LONGCAT_IMAGE = dict(
    patch_size=1,
    in_channels=64,
    num_layers=10,
    num_single_layers=20,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=3584,
    pooled_projection_dim=3584,
    axes_dims_rope=[16, 56, 56],
)
BACKBONES = {
    "sd3-medium": (CLASS_OF["sd3"], SD3_MEDIUM),
    "longcat-image": (CLASS_OF["longcat"], LONGCAT_IMAGE),
}


def transformer_class(class_name: str) -> type:
    """The diffusers model class of that name (as a folder's ``_class_name`` spells it)."""
    import diffusers

    cls = getattr(diffusers, class_name, None)
    if cls is None or not isinstance(cls, type):
        raise ValueError(f"diffusers has no model class {class_name!r}")
    return cls


def meta_model(class_name: str, config: dict) -> torch.nn.Module:
    """The model built on the meta device: real shapes, no storage. ``.to("meta")`` also moves the buffers some
    classes build from numpy on the CPU (SD3's sin-cos position table)."""
    cfg = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device("meta"):
        model = transformer_class(class_name)(**cfg)
    return model.to("meta")


def count_params(transformer_class_name: str, config: dict) -> int:
    """Number of parameters of the class at that config (counted on the meta device)."""
    return sum(p.numel() for p in meta_model(transformer_class_name, config).parameters())


def _targeted(name: str, targets) -> bool:
    """peft's rule for a list of target names: the module's full name is the target or ends with ``.target``."""
    return any(name == t or name.endswith(f".{t}") for t in targets)


def lora_params(
    transformer_class_name: str, config: dict, rank: int, target_modules: tuple[str, ...] = LORA_TARGETS
) -> int:
    """Parameters ONE LoRA adapter of that rank adds: ``rank x (in + out)`` per targeted ``nn.Linear`` (peft's
    ``lora_A`` is in->rank, ``lora_B`` rank->out, both without bias)."""
    model = meta_model(transformer_class_name, config)
    return sum(
        rank * (m.in_features + m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and _targeted(name, target_modules)
    )


def dit_tokens(latent_size: int, patch_size: int, text_tokens: int) -> int:
    """Sequence length of a joint-attention DiT: image patches of a square latent plus the text tokens."""
    return (latent_size // patch_size) ** 2 + text_tokens


def dit_activation_bytes(
    tokens: int,
    hidden: int,
    num_layers: int,
    checkpointing: bool = True,
    mode: str = "full",
    graphs: int = CDM_GRAD_GRAPHS,
    bytes_per_elem: int = 2,
    elems_per_layer: float | None = None,
) -> int:
    """Activation bytes PER SAMPLE that a training step of a DiT keeps for its backward.

    One block keeps ``c * tokens * hidden`` elements (``c = elems_per_layer``, default :data:`ELEMS_PER_LAYER`
    of the mode: what the block's ops save for backward, measured by :func:`traced_activation_bytes`; a frozen
    base saves less, its weights need no input copies). Without checkpointing: ``graphs * L * c * s * h * p``.
    With per-block gradient checkpointing (diffusers' ``enable_gradient_checkpointing``) each graph keeps only
    the block inputs, ``L * s * h * p`` (image + text streams), and backward recomputes one block at a time:
    ``graphs * L * s * h * p + c * s * h * p``.

    Assumptions: fused attention (flash / memory-efficient SDPA: q, k, v, out and a log-sum-exp are kept, no
    ``s^2`` score matrix; the math backend would add ``heads * s^2`` per layer), no dropout, the embedders and
    the output head ignored (one layer's worth or less), ``graphs`` graphs alive at once (CDM's student step
    has 2; the fake step 1) and ``p`` bytes per element (bf16: 2).
    """
    c = ELEMS_PER_LAYER[mode] if elems_per_layer is None else elems_per_layer
    per_layer = tokens * hidden * bytes_per_elem
    if not checkpointing:
        return int(graphs * num_layers * c * per_layer)
    return int(graphs * num_layers * per_layer + c * per_layer)


def traced_activation_bytes(module: torch.nn.Module, inputs: dict, fused_attention: bool = True) -> int:
    """Bytes autograd saves for backward in one forward of ``module(**inputs)`` (meta tensors work: shapes only).

    Counted once per storage (a view counts as its base), parameters excluded. Scaled-dot-product attention is
    counted as fused kernels keep it (q, k, v, output and a float32 log-sum-exp per head and token), whatever
    backend runs here: on the meta device and on CPUs PyTorch takes the math path, which keeps the score matrix
    (``fused_attention=False`` counts what the backend that runs really keeps).
    """
    import torch.nn.functional as F

    params = {id(p) for p in module.parameters()}
    kept: dict[int, tuple[torch.Tensor, int]] = {}
    lse = [0]

    def keep(t: torch.Tensor) -> torch.Tensor:
        root = t._base if t._base is not None else t
        if id(root) not in params:
            kept[id(root)] = (root, root.numel() * root.element_size())  # holding root keeps its id unique
        return t

    sdpa = F.scaled_dot_product_attention

    def fused_sdpa(*args, **kwargs):
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):  # its own saves not counted
            out = sdpa(*args, **kwargs)
        q, k, v = (list(args) + [kwargs.get(n) for n in ("query", "key", "value")[len(args) :]])[:3]
        for t in (q, k, v, out):
            keep(t)
        lse[0] += q[..., 0].numel() * 4
        return out

    if fused_attention:
        F.scaled_dot_product_attention = fused_sdpa
    try:
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            module(**inputs)
    finally:
        F.scaled_dot_product_attention = sdpa
    return sum(n for _, n in kept.values()) + lse[0]


def plan(
    n_params: int,
    mode: str = "full",
    zero_stage: int = 2,
    n_gpus: int = 8,
    precision: str = "bf16",
    micro_batch: int = 16,
    activation_bytes_per_sample: float = 0,
    lora_params: int = 0,
    text_encoder_params: int = 0,
    ema_on_rank0: bool = True,
    teacher_sharded: bool | None = None,
    teacher_precision: str | None = None,
    overhead_gib: float = 1.0,
) -> dict:
    """GiB per GPU (the busiest one, rank 0) of a CDM job, term by term; ``total_gib`` is the sum of the terms.

    Notation: ``P`` = base parameters (``n_params``), ``T`` = trainable parameters of ONE network (``P`` in full
    mode, ``lora_params`` of one adapter in LoRA mode), ``p`` = bytes per weight (bf16 2, fp32 4), ``N`` =
    ``n_gpus``, ``S`` = ``N`` under ZeRO-3 else 1.

    - ``base``: the frozen real teacher (full) or the one shared frozen base (LoRA), ``P * p_t / (N if sharded
      else 1)``. Sharded by default only in LoRA mode under ZeRO-3 (the base sits inside the engine, and ZeRO-3
      partitions every parameter of it); in full mode the teacher is a plain module on every rank, as
      ``train_worker`` holds it (``teacher_sharded=True`` models wrapping it in a ZeRO-3 engine of its own).
      ``p_t``: ``teacher_precision`` (default ``precision``).
    - ``trainable``: student + fake, ``2 * T * p / S`` (ZeRO-3 partitions parameters, ZeRO-2 does not).
    - ``gradients``: ``T * p / N``: ZeRO-2 and 3 keep each rank's partition of the reduced gradients; one network
      backpropagates at a time (fake step, then student step) and ``engine.step`` frees them.
    - ``optimizer``: AdamW for both networks, ``2 * T * k / N`` with ``k = 12``: fp32 ``m``, ``v`` and the flat fp32
      partition the optimizer steps, which ZeRO keeps beside the module's weights in fp32 as in bf16 (measured:
      ``benchmarks/results/memory_jobs.md``, the ``masters`` column); ZeRO-2 and 3 partition them.
    - ``ema``: the student's fp32 shadow, ``T * 4`` on rank 0 (``ema_on_rank0``; the worker today builds it on
      every rank, which does not change the busiest GPU), or ``T * 4 / N`` if it were partitioned.
    - ``activations``: ``micro_batch * activation_bytes_per_sample`` (see :func:`dit_activation_bytes`).
    - ``text_encoder``: ``text_encoder_params * p``, frozen and replicated (0 here: prompts are pre-embedded).
    - ``zero3_gather`` (ZeRO-3 only): what gathering full weights adds to the peak. During a forward/backward the
      live layers, ``G = min(P, 1e9) * p`` (DeepSpeed's ``stage3_max_live_parameters``), on top of the
      activations; between steps the fake->student blend gathers both networks, ``B = 2 * T * p * (1 - 1/N)``,
      while no activations are held. Peak = rest + max(A + G, B), so the term is ``max(G, B - A)``.
    - ``overhead``: ``overhead_gib``, the CUDA context, cuBLAS/cuDNN workspaces and allocator slack (~1 GiB).

    Ignored: allocator fragmentation beyond the overhead, ZeRO's communication buckets (reduce / all-gather,
    default 5e8 elements, ~0.9 GiB each in bf16), the transient fp32 gradient copy at the optimizer step (taken
    after activations are freed), the activations of the no-gradient forwards (rollout, real and fake teacher:
    one layer at a time), the batch's latents and text embeddings, compile and CUDA-graph workspaces.
    """
    if mode not in ("full", "lora"):
        raise ValueError(f"mode must be full or lora, got {mode!r}")
    if zero_stage not in (2, 3):
        raise ValueError(f"zero_stage must be 2 or 3, got {zero_stage!r}")
    if precision not in BYTES or (teacher_precision or precision) not in BYTES:
        raise ValueError(f"precision must be one of {sorted(BYTES)}")
    if n_gpus < 1 or micro_batch < 1 or min(n_params, lora_params, text_encoder_params) < 0:
        raise ValueError("n_gpus and micro_batch must be >= 1, parameter counts >= 0")
    if mode == "lora" and lora_params <= 0:
        raise ValueError("mode lora needs lora_params > 0 (one adapter's parameters)")
    p, p_t = BYTES[precision], BYTES[teacher_precision or precision]
    z3 = zero_stage == 3
    shard = n_gpus if z3 else 1
    t = n_params if mode == "full" else lora_params
    if teacher_sharded is None:
        teacher_sharded = z3 and mode == "lora"
    k = 12  # moments + ZeRO's flat fp32 partition, whatever the module's precision
    live = min(n_params, ZERO3_MAX_LIVE_PARAMS) * p
    blend = 2 * t * p * (1 - 1 / n_gpus)
    activations = micro_batch * activation_bytes_per_sample
    terms = {
        "base": n_params * p_t / (n_gpus if teacher_sharded else 1),
        "trainable": 2 * t * p / shard,
        "gradients": t * p / n_gpus,
        "optimizer": 2 * t * k / n_gpus,
        "ema": t * 4 / (1 if ema_on_rank0 else n_gpus),
        "activations": activations,
        "text_encoder": text_encoder_params * p,
        "zero3_gather": max(live, blend - activations) if z3 else 0.0,
    }
    gib = {name: v / GIB for name, v in terms.items()}
    gib["overhead"] = float(overhead_gib)
    return {
        "mode": mode,
        "zero_stage": zero_stage,
        "n_gpus": n_gpus,
        "precision": precision,
        "teacher_precision": teacher_precision or precision,
        "teacher_sharded": bool(teacher_sharded),
        "micro_batch": micro_batch,
        "n_params": n_params,
        "trainable_params_per_network": t,
        "terms_gib": gib,
        "total_gib": sum(gib.values()),
    }


def fits(plan_result: dict, gpu_gib: float) -> bool:
    """Whether a plan's total fits a GPU of ``gpu_gib`` GiB (the estimate, no safety margin beyond its overhead)."""
    return plan_result["total_gib"] <= gpu_gib
