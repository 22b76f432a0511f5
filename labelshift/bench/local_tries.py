"""A two-level try for per-image priors (issue 15, measurement only): hard EM under a Dirichlet fitted to the
dataset's spread of image priors, whose MAP can remove a class from an image outright.

The shipped estimators shrink an image's prior toward the dataset estimate π̂ (a Dirichlet(κ·π̂ + 1) prior): a
class the image does not show keeps λ·π̂_c. The per-image oracle's headroom comes mostly from classes absent
from an image, so this try fits the Dirichlet instead, label-free, on target train: each image's argmax histogram
after global IA toward π̂ (on the grid ``adjust.local.sample_pixels`` reads) gives, per class, the spread of image
shares around π̂; moments give the precision s_c = π̂_c(1 − π̂_c)/Var_c − 1 and α_c = s_c·π̂_c (``per_class``), or
one precision s = median_c s_c (``pooled``). The MAP step is then

    q_c ∝ max(n_eff·h_c(q) + α_c − 1, 0)   (then floored at 0.01·π̂_c, as the library's estimates),

with α_c < 1 for the rare classes: a class the image barely predicts drops to the floor. n_eff ∈ {100, 300,
1000, 3000} and 1–3 steps are chosen on the selection split (``splits/select.txt``); target val reports the
choice against global IA with the same π̂ (the config's ``prior.method``).

``python -m labelshift.bench.local_tries [--seeds 0,1,2]``: reuses ``labelshift.bench.per_image``'s seeds and
caches (and ``cache_target.pt``, the target-train logits at the output stride, computed once); prints one line
per setting and ends with one JSON line. About 1.5 minutes per seed on 2 CPU cores with the caches.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from labelshift.adjust import LocalIA
from labelshift.bench.per_image import (
    cached_logits,
    local_transform,
    miou_with_priors,
    prepare_seed,
    seed_config,
    stacked_logits,
)
from labelshift.estimate.per_image import ImagePriors, floor_rows, grid_pixels

EFFECTIVE_PIXELS = (100.0, 300.0, 1000.0, 3000.0)
STEPS = (1, 2, 3)
FLOOR = 0.01
SAMPLE_PIXELS = 4096


def argmax_shares(transform: LocalIA, logits: torch.Tensor, priors: torch.Tensor) -> torch.Tensor:
    """(N, K) share of each image's grid pixels won by each class after IA toward ``priors`` (N, K)."""
    grid = grid_pixels(logits, SAMPLE_PIXELS)
    rows = ImagePriors(priors, *(torch.zeros(len(priors), dtype=dtype) for dtype in (torch.int64, torch.bool,
                                                                                       torch.int64)))
    winners = transform.apply(grid, rows).argmax(1)
    counts = torch.stack([torch.bincount(row, minlength=priors.shape[1]) for row in winners])
    return counts.double() / grid.shape[-1]


def fitted_alpha(shares: torch.Tensor, centre: torch.Tensor, per_class: bool) -> torch.Tensor:
    """Dirichlet parameters (K,) centred on ``centre`` whose precision matches the images' spread (moments)."""
    variance = shares.var(0).clamp_min(1e-12)
    precision = (centre * (1 - centre) / variance - 1).clamp_min(1e-3)
    return (precision if per_class else precision.median()) * centre


def sparse_map(transform: LocalIA, logits: torch.Tensor, centre: torch.Tensor, alpha: torch.Tensor,
               effective_pixels: float, steps: int) -> torch.Tensor:
    """Per-image hard-EM MAP under Dirichlet(α), from q = π̂; (N, K) floored priors."""
    priors = centre[None].expand(len(logits), -1).clone()
    for _ in range(steps):
        numerator = (effective_pixels * argmax_shares(transform, logits, priors) + alpha[None] - 1).clamp_min(0)
        priors, _ = floor_rows(numerator / numerator.sum(1, keepdim=True), centre.numpy(), FLOOR)
    return priors


def seed_result(config: str, out: Path, seed0: Path, seed: int, centre_method: str) -> dict[str, Any]:
    run = prepare_seed(config, out, seed, seed0, lambda line: None)
    cfg, stages = seed_config(config, out, seed, seed0)
    target = cached_logits(cfg, stages / "pretrain" / "model.safetensors", "target", out / f"seed{seed}" / "cache_target.pt")
    centre = torch.tensor(np.array(run.estimate(centre_method).probs, dtype=np.float64))
    transform = local_transform(run, run.estimate(centre_method))
    shares = argmax_shares(transform, stacked_logits(target), centre[None].expand(len(target), -1))
    splits = ("target_select", "target_val")
    global_ia = {split: miou_with_priors(run.caches[split], transform, centre[None].expand(len(run.caches[split]), -1))
                 for split in splits}
    settings = []
    for per_class in (False, True):
        alpha = fitted_alpha(shares, centre, per_class)
        for effective_pixels in EFFECTIVE_PIXELS:
            for steps in STEPS:
                gains = {split: miou_with_priors(run.caches[split], transform, sparse_map(
                    transform, stacked_logits(run.caches[split]), centre, alpha, effective_pixels, steps))
                    - global_ia[split] for split in splits}
                settings.append({"alpha": "per_class" if per_class else "pooled", "effective_pixels": effective_pixels,
                                 "steps": steps, **gains})
                print(f"seed {seed} {settings[-1]}", file=sys.stderr, flush=True)
    chosen = max(settings, key=lambda setting: setting["target_select"])
    return {"centre": centre_method, "global_ia": global_ia, "settings": settings, "chosen": chosen,
            "gain_val": chosen["target_val"]}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m labelshift.bench.local_tries", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--out", default="outputs/bench_per_image")
    parser.add_argument("--seed0-stages", default="outputs/demo/stages")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--centre", default=None, help="default: the config's prior.method")
    args = parser.parse_args(argv)
    if args.centre is None:
        from labelshift.config import load_config

        args.centre = load_config(args.config).prior.method
    out, seed0 = Path(args.out).resolve(), Path(args.seed0_stages).resolve()
    results = {seed: seed_result(args.config, out, seed0, seed, args.centre)
               for seed in (int(part) for part in args.seeds.split(","))}
    gains = [result["gain_val"] for result in results.values()]
    print(json.dumps({"per_seed": {seed: {"chosen": r["chosen"], "gain_val": r["gain_val"]} for seed, r in results.items()},
                      "gain_mean": float(np.mean(gains)), "gain_min": float(np.min(gains))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
