"""Sensitivity table of the two judges and the pixel panel: how each reacts to known distortions of real
images and to the teacher's own step count. A judge that cannot tell these apart cannot judge students.

    OMP_NUM_THREADS=1 python benchmarks/judges.py --n-samples 1000      # writes results/judges.json|md

Rows: real test images (N of them; the judges' reference statistics use all 10k test images, so this is the
noise floor at this N), the real images blurred (Gaussian, sigma 0.5 and 1 pixel), contrast-stretched (x1.6
around mid-grey, clipped), gamma-brightened (0.6 on [0, 1]), with additive noise (std 0.1), and the built-in
teacher at 1, 2, 4 and 100 Euler steps (cfg 1) on the evaluation set of seed 0. Nothing here selects anything.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from workflows.config import DEFAULT_EVALUATOR, DEFAULT_JUDGE2, DEFAULT_TEACHER  # noqa: E402
from workflows.evaluation import eval_set, generate, score, teacher_reference  # noqa: E402
from workflows.evaluator import Evaluator  # noqa: E402
from workflows.fashion_mnist import load_split  # noqa: E402
from workflows.model_folder import load_model  # noqa: E402
from workflows.pixel_reference import pixel_reference  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
COLUMNS = [
    "fd",
    "precision",
    "recall",
    "fd2",
    "precision2",
    "recall2",
    "near_white",
    "near_black",
    "edge_energy",
    "intensity_w1",
    "class_mean_gap",
]


def blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    r = max(1, int(3 * sigma + 0.5))
    k = torch.exp(-(torch.arange(-r, r + 1, dtype=torch.float32) ** 2) / (2 * sigma**2))
    k = k / k.sum()
    xp = torch.nn.functional.pad(x, (r, r, r, r), mode="replicate")
    xp = torch.nn.functional.conv2d(xp, k.view(1, 1, 1, -1))
    return torch.nn.functional.conv2d(xp, k.view(1, 1, -1, 1))


DISTORTIONS = {
    "real": lambda x, g: x,
    "blur σ 0.5": lambda x, g: blur(x, 0.5),
    "blur σ 1": lambda x, g: blur(x, 1.0),
    "contrast ×1.6": lambda x, g: (x * 1.6).clamp(-1, 1),
    "gamma 0.6": lambda x, g: ((x + 1) / 2).clamp(0, 1).pow(0.6) * 2 - 1,
    "noise σ 0.1": lambda x, g: (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(-1, 1),  # 0.1 in [0, 1]
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-samples", type=int, default=1000)
    ap.add_argument("--teacher-steps", default="1,2,4,100")
    ap.add_argument("--out", default=str(RESULTS))
    a = ap.parse_args()
    torch.set_num_threads(1)
    ev, ev2 = Evaluator.load(DEFAULT_EVALUATOR), Evaluator.load(DEFAULT_JUDGE2)
    x, y = load_split("test")
    g = torch.Generator().manual_seed(7)
    idx = torch.randperm(x.shape[0], generator=g)[: a.n_samples]
    rows = []
    for name, f in DISTORTIONS.items():
        imgs = f(x[idx], torch.Generator().manual_seed(8))
        rows.append({"name": name, **score(ev, imgs, y[idx], None, ev2)})
        print(json.dumps(rows[-1]), flush=True)
    teacher = load_model(DEFAULT_TEACHER)
    es = eval_set(a.n_samples, 0, teacher.shape)
    for k in [int(s) for s in a.teacher_steps.split(",")]:
        t0 = time.time()
        if k == 100:  # the cached 100-step reference of the evaluation set (shared with cdm eval / the ablation)
            imgs = teacher_reference(DEFAULT_TEACHER, es, 0, 100, 250, "cpu")
        else:
            imgs = generate(teacher.velocity(), es, k, teacher.meta.shift, 1.0, 250, "cpu")
        rows.append(
            {
                "name": f"teacher, {k} steps",
                "wall_s": round(time.time() - t0, 1),
                **score(ev, imgs, es.labels, None, ev2),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    ref = pixel_reference()
    res = {
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}, 1 thread",
        "command": "OMP_NUM_THREADS=1 python benchmarks/judges.py " + " ".join(sys.argv[1:]),
        "n_samples": a.n_samples,
        "judges": {"fd": "workflows/assets/evaluator (cnn)", "fd2": "workflows/assets/judge2 (resnet)"},
        "real_split": {"near_white": ref.near_white, "near_black": ref.near_black, "edge_energy": ref.edge_energy},
        "rows": rows,
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "judges.json").write_text(json.dumps(res, indent=2) + "\n")
    lines = [
        "# Sensitivity of the two judges and the pixel panel",
        "",
        f"Machine: {res['machine']}. N = {a.n_samples} images per row. Command: `{res['command']}`.",
        "",
        "Judge 1 = the project's evaluator (plain CNN, group norm); judge 2 = an independent ResNet with batch "
        "norm, another training recipe and seed. Both use reference statistics of the 10k-image test split. "
        f"Real test split: near-white {ref.near_white:.4f}, near-black {ref.near_black:.4f}, edge energy "
        f"{ref.edge_energy:.4f} (pixels in [0, 1], 28 x 28 centre).",
        "",
        "| row | " + " | ".join(COLUMNS) + " |",
        "|---|" + "---|" * len(COLUMNS),
    ]
    for r in rows:
        lines.append(f"| {r['name']} | " + " | ".join(f"{r[c]:.4f}" for c in COLUMNS) + " |")
    (out / "judges.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
