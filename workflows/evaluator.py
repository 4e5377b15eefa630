"""The judges: a feature network trained on the training split, plus reference statistics of the held-out
**test** split (never the training split the teacher copies).

Two independent judges ship with the project, of different network families and training recipes:

- ``cnn`` (``workflows/assets/evaluator``, the first judge): :class:`cdm_core.feature_net.FeatureNet`, a plain
  CNN with group norm and SiLU, AdamW + one-cycle, 1-pixel roll augmentation, label smoothing, seed 0.
- ``resnet`` (``workflows/assets/judge2``, the second judge): :class:`cdm_core.judge_net.JudgeResNet`, a
  ResNet with batch norm and ReLU, SGD + Nesterov momentum + cosine decay, random 2-pixel shifts and
  horizontal flips, no label smoothing, seed 1.

    cdm evaluator train --out workflows/assets/evaluator [--device cuda]
    cdm evaluator train --kind resnet --out workflows/assets/judge2 --epochs 3

Folder: ``feature_net.safetensors``, ``reference.pt`` (mu, cov of all 10k test features; 5k test
features for precision/recall; the test split's high-frequency energy), ``evaluator.json``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from cdm_core.feature_net import FeatureNet
from cdm_core.judge_net import JudgeResNet
from cdm_core.metrics import FeatureStats, feature_stats, high_frequency_energy
from workflows.fashion_mnist import load_split
from workflows.progress import console

PR_REFERENCE = 5000
KINDS = {"cnn": FeatureNet, "resnet": JudgeResNet}


@torch.no_grad()
def _features(net: torch.nn.Module, images: torch.Tensor, batch: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    dev = next(net.parameters()).device
    fs, ls = [], []
    for i in range(0, images.shape[0], batch):
        f, lg = net.features_and_logits(images[i : i + batch].to(dev))
        fs.append(f.float().cpu())
        ls.append(lg.float().cpu())
    return torch.cat(fs), torch.cat(ls)


def _shift_flip(x: torch.Tensor, g: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random shifts of up to ``pad`` pixels (background -1 fills in) and horizontal flips, per image."""
    b, _, h, w = x.shape
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad), value=-1.0)
    dy, dx = torch.randint(0, 2 * pad + 1, (2, b), generator=g).tolist()
    out = torch.stack([xp[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(b)])
    flip = torch.rand(b, generator=g) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def train_evaluator(
    out_dir: str | Path,
    epochs: int = 4,
    batch_size: int = 128,
    lr: float | None = None,
    device: str = "cpu",
    seed: int | None = None,
    data_dir: str | None = None,
    command: str = "",
    kind: str = "cnn",
) -> dict:
    """Train one judge of ``kind`` (cnn | resnet, each with its own recipe, see the module docstring)."""
    if kind not in KINDS:
        raise ValueError(f"judge kind must be one of {sorted(KINDS)}, got {kind!r}")
    lr = lr if lr is not None else (2e-3 if kind == "cnn" else 0.1)
    seed = seed if seed is not None else (0 if kind == "cnn" else 1)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device)
    torch.manual_seed(seed)
    g_aug = torch.Generator().manual_seed(seed + 17)
    x_tr, y_tr = load_split("train", data_dir)
    x_te, y_te = load_split("test", data_dir)
    x_tr, y_tr = x_tr.to(dev), y_tr.to(dev)
    net = KINDS[kind]().to(dev)
    steps = epochs * (x_tr.shape[0] // batch_size)
    if kind == "cnn":
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    else:
        opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    t0 = time.time()
    step = 0
    for ep in range(epochs):
        perm = torch.randperm(x_tr.shape[0], device=dev)
        net.train()
        for i in range(0, x_tr.shape[0] - batch_size + 1, batch_size):
            idx = perm[i : i + batch_size]
            x = x_tr[idx]
            if kind == "cnn":
                # light augmentation: 1-pixel shifts keep the features robust to small misalignment
                dx, dy = torch.randint(-1, 2, (2,)).tolist()
                x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
                loss = torch.nn.functional.cross_entropy(net(x), y_tr[idx], label_smoothing=0.05)
            else:
                x = _shift_flip(x.cpu(), g_aug).to(dev)
                loss = torch.nn.functional.cross_entropy(net(x), y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step % 100 == 0:
                console.print(
                    f"judge {kind} step {step}/{steps} loss={float(loss.detach()):.4f} ({time.time() - t0:.0f}s)"
                )
        net.eval()
        _, logits = _features(net, x_te)
        acc = float((logits.argmax(1) == y_te).float().mean())
        console.print(
            f"evaluator epoch {ep + 1}/{epochs} loss={float(loss):.4f} test_acc={acc:.4f} ({time.time() - t0:.0f}s)"
        )
    net = net.cpu().eval()
    feats, logits = _features(net, x_te)
    stats = feature_stats(feats)
    g = torch.Generator().manual_seed(1234)
    pr_idx = torch.randperm(feats.shape[0], generator=g)[:PR_REFERENCE]
    info = {
        "kind": kind,
        "test_accuracy": float((logits.argmax(1) == y_te).float().mean()),
        "epochs": epochs,
        "n_reference": int(feats.shape[0]),
        "hf_real": high_frequency_energy(x_te),
        "wall_s": round(time.time() - t0, 1),
        "device": device,
        "seed": seed,
        "command": command,
    }
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out / "feature_net.safetensors"))
    torch.save(
        {
            "mu": stats.mu,
            "cov": stats.cov,
            "n": stats.n,
            "pr_features": feats[pr_idx].clone(),
            "hf_real": info["hf_real"],
        },
        out / "reference.pt",
    )
    (out / "evaluator.json").write_text(json.dumps(info, indent=2) + "\n")
    console.print(f"evaluator written to {out}: {info}")
    return info


@dataclass
class Evaluator:
    net: torch.nn.Module
    reference: FeatureStats
    pr_features: torch.Tensor
    hf_real: float
    info: dict

    @classmethod
    def load(cls, folder: str | Path, device: str = "cpu") -> Evaluator:
        p = Path(folder)
        for name in ("feature_net.safetensors", "reference.pt", "evaluator.json"):
            if not (p / name).exists():
                raise FileNotFoundError(f"evaluator folder {p} lacks {name} (train one with `cdm evaluator train`)")
        info = json.loads((p / "evaluator.json").read_text())
        kind = info.get("kind", "cnn")
        if kind not in KINDS:
            raise ValueError(f"evaluator folder {p}: unknown judge kind {kind!r} (known: {sorted(KINDS)})")
        net = KINDS[kind]()
        net.load_state_dict(load_file(str(p / "feature_net.safetensors")))
        ref = torch.load(p / "reference.pt", map_location="cpu", weights_only=True)
        return cls(
            net.to(device).eval(),
            FeatureStats(ref["mu"], ref["cov"], int(ref["n"])),
            ref["pr_features"],
            float(ref["hf_real"]),
            info,
        )

    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _features(self.net, images.clamp(-1, 1))
