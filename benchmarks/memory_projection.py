"""Per-GPU memory of CDM distillation on SD3-Medium and LongCat-Image (projected by ``workflows.memory_plan``), and
a standalone CPU measurement of that memory model on the tiny built-in teacher.

    OMP_NUM_THREADS=1 python benchmarks/memory_projection.py     # -> results/memory.{json,md}

Projection: 8 GPUs at the paper's per-GPU batch, bf16, gradient checkpointing, full and LoRA rank 64, ZeRO-2 and 3.
Measurement: one plain-torch CDM-shaped CPU step of student + fake + teacher copies vs one frozen base with two peft
adapters, each in a fresh process (``--measure``); it tests the memory model, not the project's training job.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from peft import LoraConfig  # noqa: E402

from benchmarks.gpu_check import SPECS, example_inputs, latent_shape, shape_of  # noqa: E402
from cdm_core.conditioning import Cond  # noqa: E402
from cdm_core.models import SD3Family  # noqa: E402
from workflows import memory_plan as mp  # noqa: E402
from workflows.config import DEFAULT_TEACHER  # noqa: E402
from workflows.model_folder import load_transformer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
GLOBAL_BATCH = {"sd3-medium": 128, "longcat-image": 64}  # CDM_SPEC.md reference hyperparameters
N_GPUS, RANK, GPUS_GIB = 8, 64, (80, 141)
TINY = dict(kind="sd3", latent=32, channels=1, text=16, text_dim=384, pooled=384)  # the built-in teacher's shapes
SOURCES = {
    "sd3-medium": "stabilityai/stable-diffusion-3-medium-diffusers transformer config (the brief's values; "
    "dual_attention_layers and qk_norm at the class's SD3.0 defaults)",
    "longcat-image": "NOT the released config.json (not in diffusers' source or docs here): 10 dual + 20 single blocks "
    "as third-party ports of the checkpoint give them; the class defaults (19 + 38, FLUX.1-sized) are ~11.9B, not 6B",
}


def lora(rank: int) -> LoraConfig:
    return LoraConfig(r=rank, lora_alpha=rank, target_modules=list(mp.LORA_TARGETS))


def elems_per_layer(name: str, mode: str) -> float:
    """Activation elements per (block x token x hidden) of one bf16 forward with gradient, traced on the meta
    device; LoRA: frozen base, adapters in bf16 (DeepSpeed's bf16 casts the whole module)."""
    cls, cfg = mp.BACKBONES[name]
    model = mp.meta_model(cls, cfg)
    if mode == "lora":
        model.requires_grad_(False).add_adapter(lora(RANK))
    model = model.to(device="meta", dtype=torch.bfloat16)
    s, h, n = shape_of(SPECS[name])
    return mp.traced_activation_bytes(model, example_inputs(SPECS[name], 1, "meta", torch.bfloat16)) / (n * s * h * 2)


def backbone(name: str) -> dict:
    cls, cfg = mp.BACKBONES[name]
    s, h, n = shape_of(SPECS[name])
    facts = {"class": cls, "config": cfg, "config_source": SOURCES[name], "tokens": s, "hidden": h, "blocks": n}
    facts.update(n_params=mp.count_params(cls, cfg), lora_rank=RANK, lora_params=mp.lora_params(cls, cfg, RANK))
    facts["elems_per_layer"] = {m: elems_per_layer(name, m) for m in ("full", "lora")}
    return facts


def row(name: str, f: dict, variant: str, mode: str, stage: int, ckpt: bool = True, **plan_kw) -> dict:
    """One plan at the paper's per-GPU batch on 8 GPUs, its activations from the traced per-block constant."""
    c = f["elems_per_layer"][mode]
    act = mp.dit_activation_bytes(f["tokens"], f["hidden"], f["blocks"], ckpt, mode, elems_per_layer=c)
    micro = GLOBAL_BATCH[name] // N_GPUS
    p = mp.plan(f["n_params"], mode, stage, N_GPUS, "bf16", micro, act, f["lora_params"], **plan_kw)
    fit = {f"fits_{g}": mp.fits(p, g) for g in GPUS_GIB}
    return {"backbone": name, "variant": variant, "checkpointing": ckpt, **p, **fit, "plan_kwargs": plan_kw}


def projection() -> dict:
    facts = {name: backbone(name) for name in GLOBAL_BATCH}
    rows = []
    for name, f in facts.items():
        rows += [row(name, f, "recipe", m, s) for m in ("full", "lora") for s in (2, 3)]
        fp32 = "fp32 frozen teacher (before the bf16 cast)"
        rows += [row(name, f, fp32, "full", s, teacher_precision="fp32") for s in (2, 3)]
        rows.append(row(name, f, "recipe", "full", 2, False))
        rows.append(row(name, f, "teacher in its own ZeRO-3 engine", "full", 3, teacher_sharded=True))
    return {"backbones": facts, "rows": rows}


def status_mib(*keys: str) -> list[float]:
    """Fields of /proc/self/status in MiB (VmRSS: resident now; VmHWM: peak, what getrusage's ru_maxrss reads)."""
    lines = Path("/proc/self/status").read_text().splitlines()
    kib = {ln.split(":")[0]: ln.split()[1] for ln in lines if ln.startswith(("Vm", "Rss"))}
    return [int(kib[k]) / 1024 for k in keys]


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so the peak is the measured phase's own."""
    try:
        return Path("/proc/self/clear_refs").write_text("5") == 1
    except OSError:
        return False


def networks(mode: str, rank: int):
    """``use(role) -> velocity``, the two trained parameter lists, the EMA update. Full: three modules; LoRA: one
    frozen base, adapters "student" and "fake", the real teacher = adapters off (peft's set_adapter also sets which
    adapter requires grad, so the student is re-selected before its backward)."""
    base = load_transformer(DEFAULT_TEACHER)  # fp32, frozen
    if mode == "full":
        mods = {"real": base, **{r: copy.deepcopy(base).requires_grad_(True) for r in ("student", "fake")}}
        shadow = copy.deepcopy(mods["student"]).requires_grad_(False)
        params = {r: list(mods[r].parameters()) for r in ("student", "fake")}
        use = lambda role: SD3Family.velocity(mods[role])
    else:
        for role in ("student", "fake"):
            base.add_adapter(lora(rank), adapter_name=role)
        params = {r: [p for n, p in base.named_parameters() if f".{r}." in n] for r in ("student", "fake")}
        shadow = [p.detach().clone() for p in params["student"]]

        def use(role):
            if role == "real":
                base.disable_adapters()
            else:
                base.enable_adapters()
                base.set_adapter(role)
            return SD3Family.velocity(base)

    targets = list(shadow.parameters()) if mode == "full" else shadow
    ema = lambda: torch._foreach_lerp_(targets, [p.detach() for p in params["student"]], 0.001)
    return use, params, ema


def cdm_shaped_step(use, params, ema, x0: torch.Tensor, eps: torch.Tensor, cond: Cond) -> dict:
    """A fake step (regress eps - x0 at a fresh level), then a student step holding two graphs at once (CA+DM's
    x0_hat and CDM's x0_hat', DM-shaped targets from real - fake), AdamW on each, then the EMA update."""
    b, g = x0.shape[0], torch.Generator().manual_seed(0)
    lvl = lambda: (0.02 + 0.96 * torch.rand(b, generator=g)).view(-1, 1, 1, 1)
    mse = torch.nn.functional.mse_loss
    opt = {r: torch.optim.AdamW(params[r], lr=1e-5, weight_decay=1e-4) for r in params}
    t, tau = lvl(), lvl()
    x = (1 - t) * x0 + t * eps
    with torch.no_grad():
        x0_s = x - t * use("student")(x, t.flatten(), cond)
    z = (1 - tau) * x0_s + tau * eps
    mse(use("fake")(z, tau.flatten(), cond), eps - x0_s).backward()
    opt["fake"].step()
    opt["fake"].zero_grad(set_to_none=True)
    losses = []
    for t in (lvl(), lvl()):
        xt = (1 - t) * x0_s + t * eps
        x0_hat = xt - t * use("student")(xt, t.flatten(), cond)
        with torch.no_grad():
            z, tau = (1 - t) * x0_hat + t * eps, t.flatten()
            direction = -t * (use("real")(z, tau, cond) - use("fake")(z, tau, cond))
        losses.append(mse(x0_hat, (x0_hat + direction).detach()))
    use("student")
    sum(losses).backward()
    with_grad = sum(p.grad is not None for p in params["student"])
    opt["student"].step()
    opt["student"].zero_grad(set_to_none=True)
    ema()
    return {"student_params_with_grad": with_grad, "student_params": len(params["student"])}


def measure(mode: str, batch: int, rank: int) -> dict:
    """Run in a fresh process. A throwaway teacher load and no-grad forward first (one-time library state: lazy
    imports, kernel caches), then the baseline RSS, the networks, one step; VmHWM is reset at the baseline."""
    torch.manual_seed(0)
    x0, eps = (torch.randn(latent_shape(TINY, batch)) for _ in range(2))
    cond = Cond(*(torch.randn(batch, *d) for d in ((TINY["text"], TINY["text_dim"]), (TINY["pooled"],))))
    with torch.no_grad():
        SD3Family.velocity(load_transformer(DEFAULT_TEACHER))(x0[:1], torch.ones(1), cond.index(slice(0, 1)))
    out = {"mode": mode, "batch": batch, "rank": rank if mode == "lora" else None, "peak_reset": reset_peak()}
    (before,) = status_mib("VmRSS")
    use, params, ema = networks(mode, rank)
    (built,) = status_mib("VmRSS")
    out.update(
        cdm_shaped_step(use, params, ema, x0, eps, cond), trained_params=sum(map(torch.numel, params["student"]))
    )
    (peak,) = status_mib("VmHWM")
    return {**out, "rss_before_mib": before, "weights_mib": built - before, "peak_minus_before_mib": peak - before}


def predicted(mode: str, batch: int, rank: int) -> dict:
    """The planner on the same step: fp32, one device, no overhead; activations = two student graphs, each what a
    real CPU forward of the tiny teacher saves for backward (the CPU's own attention backend, traced)."""
    model = load_transformer(DEFAULT_TEACHER)
    n_params = sum(p.numel() for p in model.requires_grad_(mode == "full").parameters())
    if mode == "lora":
        model.add_adapter(lora(rank))
    phi = sum(p.numel() for p in model.parameters() if p.requires_grad) if mode == "lora" else 0
    act = mp.traced_activation_bytes(model, example_inputs(TINY, batch, "cpu", torch.float32), fused_attention=False)
    p = mp.plan(n_params, mode, 2, 1, "fp32", batch, 2 * act / batch, phi, overhead_gib=0.0)
    mib = {k: v * 1024 for k, v in p["terms_gib"].items()}
    # this step's plain torch AdamW holds the two moments only: no ZeRO flat fp32 partition (4 of the 12 bytes)
    mib["optimizer"] *= 8 / 12
    out = {"n_params": n_params, "adapter_params": phi, "terms_mib": mib, "total_mib": sum(mib.values())}
    return {**out, "weights_mib": mib["base"] + mib["trainable"] + mib["ema"]}


def measured_section(batch: int, rank: int) -> dict:
    """Each mode in a fresh interpreter (peaks are per process), beside the planner's prediction. glibc's mmap
    threshold is pinned at 64 KiB so freed tensors leave the RSS (with the adaptive default, heap holes kept a LoRA
    graph at 52 MiB of RSS for 31 MiB of saved tensors)."""
    out = {"what": "standalone measurement of the memory model, NOT the project's training job", "modes": {}}
    out["method"] = "peak RSS (VmHWM, what ru_maxrss reads, reset via /proc/self/clear_refs: ru_maxrss keeps the "
    out["method"] += "parent's peak across exec) minus the RSS before building; MALLOC_MMAP_THRESHOLD_=65536; "
    out["method"] += "the step uses plain torch AdamW, so the prediction leaves out ZeRO's flat fp32 partition"
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    for mode in ("full", "lora"):
        cmd = [sys.executable, __file__, "--measure", mode, "--batch", str(batch), "--rank", str(rank)]
        got = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout.splitlines()[-1]
        out["modes"][mode] = {"measured": json.loads(got), "predicted": predicted(mode, batch, rank)}
    return out


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    py = f"Python {platform.python_version()}, torch {torch.__version__}"
    return f"{platform.node()}: {cpu}, {os.cpu_count()} CPUs, 1 torch thread, {py}"


def table(res: dict) -> list[str]:
    terms = ["base", "trainable", "gradients", "optimizer", "ema", "activations", "zero3_gather", "overhead"]
    md = ["| backbone | variant | mode | ZeRO | batch/GPU | " + " | ".join(terms) + " | total GiB | 80 GiB | 141 GiB |"]
    md.append("|" + "---|" * (len(terms) + 8))
    for r in res["rows"]:
        cells = [r["backbone"], r["variant"] + ("" if r["checkpointing"] else ", no ckpt"), r["mode"], r["zero_stage"]]
        cells += [r["micro_batch"]] + [f"{r['terms_gib'][t]:.1f}" for t in terms] + [f"**{r['total_gib']:.1f}**"]
        md.append("| " + " | ".join(str(c) for c in cells + [r["fits_80"], r["fits_141"]]) + " |")
    return md


def markdown(res: dict) -> str:
    """Parameters, the projection table and its notes, the CPU measurement against its prediction."""
    md = ["# CDM memory per GPU: projection and a CPU check", "", f"`{res['command']}` on {res['machine']}", ""]
    md += [
        "## Parameters (meta device)",
        "",
        "| backbone | class | params | LoRA r64 / adapter | elems per block-token-",
    ]
    md[-1] += "hidden, full / LoRA | config |"
    md.append("|---|---|---|---|---|---|")
    for name, f in res["projection"]["backbones"].items():
        e, size = f["elems_per_layer"], f"{f['n_params'] / 1e9:.3f} B | {f['lora_params'] / 1e6:.1f} M"
        md.append(f"| {name} | {f['class']} | {size} | {e['full']:.1f} / {e['lora']:.1f} | {f['config_source']} |")
    md += ["", f"## Projection: GiB per GPU (estimates), {N_GPUS} GPUs, bf16, the paper's batch", ""]
    md += table(res["projection"]) + ["", *res["notes"], "", "## Measured (CPU, tiny teacher)", ""]
    m = res["measured"]
    md += [f"{m['what']}: {m['method']}.", "", "| mode | batch | trained params | weights MiB measured / predicted "]
    md[-1] += "| peak MiB measured / predicted |"
    md.append("|---|---|---|---|---|")
    for mode, r in m["modes"].items():
        got, pred = r["measured"], r["predicted"]
        w = f"{got['weights_mib']:.1f} / {pred['weights_mib']:.1f}"
        tot = f"{got['peak_minus_before_mib']:.1f} / {pred['total_mib']:.1f}"
        label = f"{mode} (rank {got['rank']}, 2 adapters)" if got["rank"] else f"{mode} (3 copies + EMA)"
        md.append(f"| {label} | {got['batch']} | {got['trained_params']} | {w} | {tot} |")
    return "\n".join(md) + "\n"


NOTES = [
    "- Estimates: each term's formula is in `workflows/memory_plan.plan`; ignored: fragmentation, ZeRO's communication "
    "buckets (~0.9 GiB each by default), the fp32 gradient copy at the step, no-gradient forwards, the batch itself; "
    "`overhead` = 1 GiB (CUDA context).",
    "- Activations: a meta-device trace of one forward with gradient at 1024^2 (fused attention: no score matrix), "
    "x2 for the two student graphs of a CDM student step, per-block checkpointing (block inputs + one block).",
    "- ZeRO-3 gather: the larger of the live layers during compute (DeepSpeed's 1e9-parameter default) and the "
    "fake->student blend, which gathers both networks while no activations are held.",
    "- 'fp32 frozen teacher': what full mode cost before the workers cast the frozen teacher (LoRA: the shared base) "
    "to the engines' bf16 (`workflows.worker_roles.freeze_to`, measured in `memory_jobs.md`); the recipe rows hold "
    "it in bf16. LoRA + ZeRO-3 is refused by today's config (LoRA runs on ZeRO-2): that row is what it would take. "
    "80 / 141 GiB are nominal (an H200 reports ~140 GiB usable).",
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--measure", choices=["full", "lora"], help="(internal) one CPU step in this process")
    p.add_argument("--batch", type=int, default=16, help="batch of the CPU measurement")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank of the CPU measurement (the tiny width is 128)")
    p.add_argument("--out", default=str(RESULTS))
    a = p.parse_args()
    torch.set_num_threads(1)
    if a.measure:
        print(json.dumps(measure(a.measure, a.batch, a.rank)))
        return
    t0 = time.time()
    res = {"command": "OMP_NUM_THREADS=1 python " + " ".join(sys.argv), "machine": machine(), "notes": NOTES}
    res.update(projection=projection(), measured=measured_section(a.batch, a.rank), wall_s=time.time() - t0)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / "memory.md").write_text(markdown(res))
    print("\n".join(table(res["projection"])))


if __name__ == "__main__":
    main()
