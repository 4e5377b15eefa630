"""The evaluator: a :class:`cdm_core.feature_net.FeatureNet` trained on the training split, plus
reference statistics of the held-out **test** split (never the training split the teacher copies).

    cdm evaluator train --out workflows/assets/evaluator [--device cuda]

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
from cdm_core.metrics import FeatureStats, feature_stats, high_frequency_energy
from workflows.fashion_mnist import load_split
from workflows.progress import console

PR_REFERENCE = 5000


@torch.no_grad()
def _features(net: FeatureNet, images: torch.Tensor, batch: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    dev = next(net.parameters()).device
    fs, ls = [], []
    for i in range(0, images.shape[0], batch):
        f, lg = net.features_and_logits(images[i : i + batch].to(dev))
        fs.append(f.float().cpu())
        ls.append(lg.float().cpu())
    return torch.cat(fs), torch.cat(ls)


def train_evaluator(out_dir: str | Path, epochs: int = 4, batch_size: int = 128, lr: float = 2e-3,
                    device: str = "cpu", seed: int = 0, data_dir: str | None = None, command: str = "") -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device)
    torch.manual_seed(seed)
    x_tr, y_tr = load_split("train", data_dir)
    x_te, y_te = load_split("test", data_dir)
    x_tr, y_tr = x_tr.to(dev), y_tr.to(dev)
    net = FeatureNet().to(dev)
    steps = epochs * (x_tr.shape[0] // batch_size)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    t0 = time.time()
    step = 0
    for ep in range(epochs):
        perm = torch.randperm(x_tr.shape[0], device=dev)
        net.train()
        for i in range(0, x_tr.shape[0] - batch_size + 1, batch_size):
            idx = perm[i : i + batch_size]
            x = x_tr[idx]
            # light augmentation: 1-pixel shifts keep the features robust to small misalignment
            dx, dy = torch.randint(-1, 2, (2,)).tolist()
            x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
            loss = torch.nn.functional.cross_entropy(net(x), y_tr[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
        net.eval()
        _, logits = _features(net, x_te)
        acc = float((logits.argmax(1) == y_te).float().mean())
        console.print(f"evaluator epoch {ep + 1}/{epochs} loss={float(loss):.4f} test_acc={acc:.4f} "
                      f"({time.time() - t0:.0f}s)")
    net = net.cpu().eval()
    feats, logits = _features(net, x_te)
    stats = feature_stats(feats)
    g = torch.Generator().manual_seed(1234)
    pr_idx = torch.randperm(feats.shape[0], generator=g)[:PR_REFERENCE]
    info = {
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
    torch.save({"mu": stats.mu, "cov": stats.cov, "n": stats.n, "pr_features": feats[pr_idx].clone(),
                "hf_real": info["hf_real"]}, out / "reference.pt")
    (out / "evaluator.json").write_text(json.dumps(info, indent=2) + "\n")
    console.print(f"evaluator written to {out}: {info}")
    return info


@dataclass
class Evaluator:
    net: FeatureNet
    reference: FeatureStats
    pr_features: torch.Tensor
    hf_real: float
    info: dict

    @classmethod
    def load(cls, folder: str | Path, device: str = "cpu") -> "Evaluator":
        p = Path(folder)
        for name in ("feature_net.safetensors", "reference.pt", "evaluator.json"):
            if not (p / name).exists():
                raise FileNotFoundError(f"evaluator folder {p} lacks {name} (train one with `cdm evaluator train`)")
        net = FeatureNet()
        net.load_state_dict(load_file(str(p / "feature_net.safetensors")))
        ref = torch.load(p / "reference.pt", map_location="cpu", weights_only=True)
        return cls(net.to(device).eval(), FeatureStats(ref["mu"], ref["cov"], int(ref["n"])),
                   ref["pr_features"], float(ref["hf_real"]), json.loads((p / "evaluator.json").read_text()))

    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _features(self.net, images.clamp(-1, 1))
