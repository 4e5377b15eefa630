"""The one prepared GPU check: 4-NFE latency at 1024^2 and the peak memory of a LoRA training step, random weights.

    python benchmarks/gpu_check.py                              # GPU, bf16 -> results/gpu.{json,md} (< 8 min)
    python benchmarks/gpu_check.py --smoke --out /tmp/gpu-smoke # CPU, tiny sizes, fp32, no compile (< 60 s)

SD3-Medium's and LongCat-Image's transformers from their real configs, random weights (nothing downloaded), bf16.
Latency per image: 4 Euler steps (guidance 1: 4 NFE) on 128^2 latents (1024^2 images) at batch 1 and 4, eager and
compiled, and the decode of SD3's VAE config; text encoders not timed. Memory: the CUDA peak of one LoRA step at
batch 2 (peft adapters, MSE on the velocity, AdamW) with and without gradient checkpointing, beside the planner's
prediction. A stage whose estimate would overrun ``--budget-s`` is skipped; results are written after every stage.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import diffusers  # noqa: E402
import torch  # noqa: E402

from cdm_core.models import tiny_sd3_config  # noqa: E402
from workflows import memory_plan as mp  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PAPER_MS_PER_IMG = 246  # CDM_SPEC.md: "~246 ms/img at 1024^2 on GPU" (4 NFE; the paper's GPU and scope as reported)
LEVELS = (1.0, 0.9, 0.75, 0.5, 0.0)
ENC, DEC = "DownEncoderBlock2D", "UpDecoderBlock2D"
SD3_VAE = dict(  # stable-diffusion-3-medium-diffusers vae/config.json
    latent_channels=16,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=(ENC,) * 4,
    up_block_types=(DEC,) * 4,
    layers_per_block=2,
    sample_size=1024,
    scaling_factor=1.5305,
    shift_factor=0.0609,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
SMOKE_VAE = dict(SD3_VAE, block_out_channels=(16, 16), down_block_types=(ENC,) * 2, up_block_types=(DEC,) * 2)
SMOKE_VAE.update(layers_per_block=1, norm_num_groups=8)
SPECS = {
    "sd3-medium": dict(kind="sd3", config=mp.SD3_MEDIUM, latent=128, channels=16, text=333, text_dim=4096, pooled=2048),
    "longcat-image": dict(kind="longcat", config=mp.LONGCAT_IMAGE, latent=128, channels=16, text=512, text_dim=3584),
}
TINY_LONGCAT = dict(mp.LONGCAT_IMAGE, num_layers=1, num_single_layers=1, num_attention_heads=2, attention_head_dim=16)
TINY_LONGCAT["axes_dims_rope"] = [4, 6, 6]  # sums to the head dim
SMOKE_SPECS = {
    "sd3-medium": dict(SPECS["sd3-medium"], config=tiny_sd3_config(channels=16), latent=32, text=16, text_dim=384),
    "longcat-image": dict(SPECS["longcat-image"], config=TINY_LONGCAT, latent=16, text=8),
}
SMOKE_SPECS["sd3-medium"]["pooled"] = 384
CLASS = {"sd3": mp.BACKBONES["sd3-medium"][0], "longcat": mp.BACKBONES["longcat-image"][0]}


def latent_shape(spec: dict, batch: int) -> tuple[int, ...]:
    """What the transformer takes: SD3 a (B, C, H, W) latent; LongCat the same latent packed 2x2 into tokens."""
    c, n = spec["channels"], spec["latent"]
    return (batch, c, n, n) if spec["kind"] == "sd3" else (batch, (n // 2) ** 2, 4 * c)


def shape_of(spec: dict) -> tuple[int, int, int]:
    """(tokens, hidden, blocks): image + text tokens, heads x head_dim, dual + single blocks."""
    cfg = spec["config"]
    patch = cfg["patch_size"] if spec["kind"] == "sd3" else 2  # LongCat packs 2x2 latent pixels per token
    hidden, blocks = cfg["num_attention_heads"] * cfg["attention_head_dim"], cfg["num_layers"]
    return mp.dit_tokens(spec["latent"], patch, spec["text"]), hidden, blocks + cfg.get("num_single_layers", 0)


def cond_kwargs(spec: dict, batch: int, device, dtype) -> dict:
    """Random text conditioning of the real shapes (and LongCat's position ids, as its pipeline builds them)."""
    kw = {"encoder_hidden_states": torch.randn(batch, spec["text"], spec["text_dim"], device=device, dtype=dtype)}
    if spec["kind"] == "sd3":
        kw["pooled_projections"] = torch.randn(batch, spec["pooled"], device=device, dtype=dtype)
        return kw
    n, t = spec["latent"] // 2, spec["text"]
    ar = torch.arange(t, device=device, dtype=torch.float32)
    kw["txt_ids"] = torch.stack([torch.zeros_like(ar), ar, ar], dim=-1)
    rows, cols = torch.meshgrid(torch.arange(n, device=device), torch.arange(n, device=device), indexing="ij")
    kw["img_ids"] = torch.stack([torch.ones_like(rows), rows + t, cols + t], dim=-1).reshape(-1, 3).float()
    return kw


def forward_kwargs(spec: dict, x: torch.Tensor, sigma: float, cond: dict) -> dict:
    """Keyword arguments of one velocity call at noise level ``sigma`` (SD3 takes 1000 sigma, LongCat sigma)."""
    t = torch.full((x.shape[0],), sigma * (1000.0 if spec["kind"] == "sd3" else 1.0), device=x.device, dtype=x.dtype)
    return {"hidden_states": x, "timestep": t, "return_dict": False, **cond}


def example_inputs(spec: dict, batch: int, device, dtype) -> dict:
    """One call's inputs (e.g. on the meta device, for :func:`workflows.memory_plan.traced_activation_bytes`)."""
    x = torch.randn(latent_shape(spec, batch), device=device, dtype=dtype)
    return forward_kwargs(spec, x, 1.0, cond_kwargs(spec, batch, device, dtype))


def build(spec: dict, device, dtype) -> torch.nn.Module:
    """The transformer with random weights, initialised on ``device``."""
    with torch.device(device):
        model = mp.transformer_class(CLASS[spec["kind"]])(**spec["config"])
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def sync(device) -> None:
    torch.cuda.synchronize() if torch.device(device).type == "cuda" else None


def timed(fn, device, reps: int) -> dict:
    """Median wall time of ``fn()`` over ``reps`` calls after one warm-up call (its time kept: it compiles)."""
    times = []
    for _ in range(reps + 1):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return {"first_call_s": times[0], "median_s": statistics.median(times[1:]), "reps": reps}


@torch.inference_mode()
def sample(model, spec: dict, x: torch.Tensor, cond: dict) -> torch.Tensor:
    """4 Euler steps of the flow (guidance 1: one call per step)."""
    for s, s_next in zip(LEVELS[:-1], LEVELS[1:]):
        x = x + (s_next - s) * model(**forward_kwargs(spec, x, s, cond))[0]
    return x


def stage_transformer(a, spec: dict, compiled: bool) -> dict:
    """Per-image latency of a 4-NFE sample at each batch (``dynamic=False``: one compile per batch size)."""
    model = build(spec, a.device, a.dtype)
    run = torch.compile(model, dynamic=False) if compiled else model
    out = {}
    for b in a.batches:
        x = torch.randn(latent_shape(spec, b), device=a.device, dtype=a.dtype)
        cond = cond_kwargs(spec, b, a.device, a.dtype)
        r = timed(lambda x=x, cond=cond: sample(run, spec, x, cond), a.device, a.reps)
        out[f"batch_{b}"] = {**r, "ms_per_image": 1000 * r["median_s"] / b, "nfe": len(LEVELS) - 1}
    return out


def stage_vae(a, compiled: bool) -> dict:
    """Per-image latency of the VAE decode of 128^2 x 16 latents (1024^2 RGB) at each batch."""
    from diffusers import AutoencoderKL

    with torch.device(a.device):
        vae = AutoencoderKL(**a.vae).to(device=a.device, dtype=a.dtype).eval()
    decode = torch.compile(vae.decode, dynamic=False) if compiled else vae.decode
    out = {}
    for b in a.batches:
        z = torch.randn(b, 16, a.vae_latent, a.vae_latent, device=a.device, dtype=a.dtype)
        with torch.inference_mode():
            r = timed(lambda z=z: decode(z, return_dict=False), a.device, a.reps)
            shape = list(decode(z, return_dict=False)[0].shape)
        out[f"batch_{b}"] = {**r, "ms_per_image": 1000 * r["median_s"] / b, "image_shape": shape}
    return out


def lora_step(a, spec: dict, model, checkpointing: bool) -> dict:
    """One step of fresh AdamW on the adapters: x_t from random latents, MSE of the velocity on eps - x0."""
    toggle = model.enable_gradient_checkpointing if checkpointing else model.disable_gradient_checkpointing
    toggle()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    b = a.lora_batch
    x0, eps = (torch.randn(latent_shape(spec, b), device=a.device, dtype=a.dtype) for _ in range(2))
    t = torch.rand(b, device=a.device, dtype=a.dtype).view(-1, *[1] * (x0.ndim - 1))
    cond = cond_kwargs(spec, b, a.device, a.dtype)
    gc.collect()
    before = torch.cuda.memory_allocated() / mp.GIB if a.cuda else None
    torch.cuda.reset_peak_memory_stats() if a.cuda else None
    t0 = time.perf_counter()
    v = model(**forward_kwargs(spec, (1 - t) * x0 + t * eps, 0.5, cond))[0]
    loss = torch.nn.functional.mse_loss(v.float(), (eps - x0).float())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync(a.device)
    peak = torch.cuda.max_memory_allocated() / mp.GIB if a.cuda else None  # no allocator peak on the CPU
    out = {"checkpointing": checkpointing, "batch": b, "step_s": time.perf_counter() - t0, "loss": loss.item()}
    return {**out, "allocated_before_gib": before, "peak_allocated_gib": peak}


def predicted_activations(spec: dict, rank: int, batch: int, dtype) -> dict:
    """The planner's view of the same step: the meta-device trace (fused attention) and the checkpointed formula
    with the traced per-block constant."""
    from peft import LoraConfig

    meta = mp.meta_model(CLASS[spec["kind"]], spec["config"]).to(dtype).requires_grad_(False)
    meta.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(mp.LORA_TARGETS)))
    whole = mp.traced_activation_bytes(meta.to("meta"), example_inputs(spec, batch, "meta", dtype))
    s, h, n = shape_of(spec)
    c = whole / (batch * n * s * h * dtype.itemsize)
    ckpt = batch * mp.dit_activation_bytes(s, h, n, True, "lora", 1, dtype.itemsize, c)
    return {"traced_no_ckpt_gib": whole / mp.GIB, "formula_ckpt_gib": ckpt / mp.GIB, "elems_per_layer": c}


def stage_lora(a, spec: dict) -> dict:
    """Rank-``a.rank`` adapters (fp32, peft's default on a bf16 base) on a fresh model: two steps, planner beside."""
    from peft import LoraConfig

    model = build(spec, a.device, a.dtype)
    model.train().add_adapter(LoraConfig(r=a.rank, lora_alpha=a.rank, target_modules=list(mp.LORA_TARGETS)))
    trained = [p for p in model.parameters() if p.requires_grad]
    out = {"rank": a.rank, "adapter_params": sum(p.numel() for p in trained), "adapter_dtype": str(trained[0].dtype)}
    out["steps"] = [lora_step(a, spec, model, ckpt) for ckpt in (True, False)]
    return {**out, "predicted": predicted_activations(spec, a.rank, a.lora_batch, a.dtype)}


def plan_stages(a) -> list:
    """(name, estimated seconds on an H200, run) in priority order; the guard skips what would overrun."""
    sd3, lc = a.specs["sd3-medium"], a.specs["longcat-image"]
    stages = [
        ("sd3_transformer_eager", 40, lambda: stage_transformer(a, sd3, False)),
        ("sd3_lora_step", 40, lambda: stage_lora(a, sd3)),
        ("vae_decode_eager", 30, lambda: stage_vae(a, False)),
        ("longcat_transformer_eager", 60, lambda: stage_transformer(a, lc, False)),
        ("longcat_lora_step", 60, lambda: stage_lora(a, lc)),
        ("sd3_transformer_compiled", 200, lambda: stage_transformer(a, sd3, True)),
        ("vae_decode_compiled", 150, lambda: stage_vae(a, True)),
    ]
    return [s for s in stages if a.compile or not s[0].endswith("_compiled")]


def run_all(a) -> dict:
    """Every stage in order, skipping those the budget does not allow; results written after each."""
    t_start, out = time.perf_counter(), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    res = dict(device=a.device_name, smoke=a.smoke, dtype=str(a.dtype), command=" ".join(sys.argv), stages={})
    res.update(torch=torch.__version__, budget_s=a.budget_s, paper_ms_per_image=PAPER_MS_PER_IMG)
    for name, estimate, fn in plan_stages(a):
        spent = time.perf_counter() - t_start
        if not a.smoke and spent + estimate > a.budget_s:
            res["stages"][name] = {"skipped": f"budget: {spent:.0f} s spent + ~{estimate} s > {a.budget_s} s"}
            continue
        t0 = time.perf_counter()
        try:
            res["stages"][name] = fn()
        except Exception as e:  # an OOM or a compile failure must not lose the other stages
            res["stages"][name] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
        res["stages"][name]["stage_s"] = time.perf_counter() - t0
        gc.collect()
        torch.cuda.empty_cache()  # a no-op where CUDA was never initialised
        torch._dynamo.reset()
        res["wall_s"] = time.perf_counter() - t_start
        (out / "gpu.json").write_text(json.dumps(res, indent=2) + "\n")
        (out / "gpu.md").write_text(markdown(res))
        print(f"[gpu_check] {name}: {res['stages'][name]['stage_s']:.1f} s", flush=True)
    return res


def markdown(res: dict) -> str:
    """The latency and memory tables, then what was skipped or failed."""
    gib = lambda v: "n/a" if v is None else f"{v:.2f}"
    head = f"`{res['command']}`, torch {res['torch']}, {res['dtype']}, random weights, text encoders not timed"
    md = [f"# GPU check on {res['device']}", "", f"{head}; the paper: ~{res['paper_ms_per_image']} ms/img at 1024^2."]
    md += ["", "| stage | batch | ms / image | first call s |", "|---|---|---|---|"]
    for name, r in res["stages"].items():
        batches = [(k[6:], v) for k, v in r.items() if k.startswith("batch_")]
        md += [f"| {name} | {b} | {v['ms_per_image']:.1f} | {v['first_call_s']:.1f} |" for b, v in batches]
    md += ["", "| LoRA step | ckpt | batch | peak GiB | weights GiB | predicted activations GiB |", "|" + "---|" * 6]
    for name, r in res["stages"].items():
        for st in r.get("steps", []):
            pred = r["predicted"]["formula_ckpt_gib" if st["checkpointing"] else "traced_no_ckpt_gib"]
            peak, before = (gib(st[k]) for k in ("peak_allocated_gib", "allocated_before_gib"))
            md.append(f"| {name} | {st['checkpointing']} | {st['batch']} | {peak} | {before} | {pred:.3f} |")
    bad = {n: r.get("skipped") or r.get("error") for n, r in res["stages"].items()}
    return "\n".join(md + [""] + [f"- {n}: {why}" for n, why in bad.items() if why]) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU, tiny sizes, fp32, no compile")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--budget-s", type=float, default=420.0, help="skip stages whose estimate would overrun this")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--reps", type=int, default=3)
    a = p.parse_args()
    diffusers.utils.logging.set_verbosity_error()  # not the "kept in float32" note of every random-weight build
    a.cuda = torch.cuda.is_available() and not a.smoke
    if not a.cuda and not a.smoke:
        sys.exit("no CUDA device: run with --smoke for the CPU check")
    a.device, a.dtype = ("cuda", torch.bfloat16) if a.cuda else ("cpu", torch.float32)
    a.device_name = torch.cuda.get_device_name() if a.cuda else f"CPU ({torch.get_num_threads()} threads)"
    a.specs, a.vae = (SMOKE_SPECS, SMOKE_VAE) if a.smoke else (SPECS, SD3_VAE)
    a.vae_latent, a.batches, a.lora_batch = (8 if a.smoke else 128), (1, 4), 2
    a.rank, a.compile = (4 if a.smoke else 64), not (a.smoke or a.no_compile)
    res = run_all(a)
    print(json.dumps({k: v for k, v in res.items() if k != "stages"}, indent=1))


if __name__ == "__main__":
    main()
