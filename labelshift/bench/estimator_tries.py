"""Label-free remedies for the dataset-level target prior across world seeds (issue 15, measurement only).

Per world seed of ``labelshift.bench.per_image`` (its cached target-val / selection-split logits, plus the
target-train and source-val logits cached here once, at the output stride, under ``<out>/seed<N>/``), each
remedy gives a pixel prior π̂; IA (the default raw space, ``ia_transform(AdjustConfig())``) toward it is
evaluated on target val: mIoU, share of the oracle gain (IA with the target-train pixel oracle − none), prior L1
and log-ratio error against the target-train pixel oracle. Remedies (none changes the library's defaults):

- ``em_rerun``: EM on BCTS-calibrated posteriors, as the estimate stage (a fresh 200 000-pixel sample): a check;
- ``shrink_w``: geometric shrinkage toward the source pixel prior, π ∝ π_s^(1−w)·π_em^w, w fixed a priori
  (0.5) or chosen on the selection split (``splits/select.txt``) from ``SHRINK_GRID``;
- ``combo_<a>+<b>``: the estimators' IA shifts averaged, log π − log π_s = mean_e (log π̂_e − log π_s^(kind e)),
  with π_s of each estimator's kind (as IA applies them);
- ``em_ts``: EM on temperature-scaled posteriors (no BCTS bias) under the source training pixel prior (a
  calibration that does not absorb the 150-image source-val class mix);
- ``bias_m<m>``: the stage's BCTS bias shrunk toward 0 by the class's calibration pixel count n_c,
  b_c·n_c/(n_c + m) (m a pseudo-count fixed a priori, ``BIAS_PSEUDO_COUNTS``), EM on those posteriors under the
  calibration sample's class mix π_cal (as the stage); ``bias_m<m>_blend``: the same posteriors, EM under the
  prior shrunk alike, log π = log π_s + λ_c·(log π_cal − log π_s), λ_c = n_c/(n_c + m), π_s the source pixel prior;
- ``em_cal_large``: BCTS refitted on ``LARGE_CALIBRATION_PIXELS`` source-val pixels (stage: 300 000), EM under
  that sample's class mix.

``python -m labelshift.bench.estimator_tries [--world-seeds 0,1,2,3,4]``; prints markdown and one JSON line.
Includes one forward pass per uncached split; with caches about 2.5 minutes on 2 shared CPU cores.
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

from labelshift.adjust import ia_transform
from labelshift.artifacts import oracle_name
from labelshift.bench.per_image import (
    SeedRun,
    SplitLogits,
    cached_logits,
    log_ratio_error,
    miou_with_rows,
    prepare_seed,
    seed_config,
)
from labelshift.calibrate import Calibration, fit_calibration
from labelshift.classes import IGNORE_INDEX
from labelshift.config import AdjustConfig
from labelshift.estimate import ensemble
from labelshift.estimate.em import em_label_shift
from labelshift.priors import ClassPrior, floor_probabilities, prior_l1

SHRINK_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)
SAMPLE_PIXELS = 200_000
COMBOS = (("em", "reference"), ("em", "presence"), ("em", "reference", "presence"))
BIAS_PSEUDO_COUNTS = (100, 1000)  # calibration pixels; fixed a priori, not chosen on any labelled target split
LARGE_CALIBRATION_PIXELS = 1_200_000


def upsampled_sample(split: SplitLogits, pixels: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) float32 logits at the label size of ``pixels`` uniformly drawn pixels (per image equally) and
    their (M,) labels."""
    from labelshift.models import upsample_logits

    size = tuple(split.labels.shape[-2:])
    per_image = -(-pixels // len(split))
    generator = torch.Generator().manual_seed(seed)
    logits, labels = [], []
    for index in range(len(split)):
        full = upsample_logits(split.low_res(index)[None], size, align_corners=split.align_corners)[0]
        picks = torch.randperm(size[0] * size[1], generator=generator)[:per_image]
        logits.append(full.reshape(full.shape[0], -1)[:, picks].T)
        labels.append(split.labels[index].reshape(-1)[picks].long())
    return torch.cat(logits)[:pixels], torch.cat(labels)[:pixels]


def em_prior(logits: torch.Tensor, calibration: Calibration, source: np.ndarray, names: list[str]) -> ClassPrior:
    """EM / MLLS on softmax(calibration(logits)) (M, K) held under ``source`` (K,)."""
    posteriors = calibration.apply(logits.double()).softmax(1).numpy()
    estimate, _, converged = em_label_shift(posteriors, source)
    if not converged:
        raise RuntimeError("EM did not converge")
    return ClassPrior(names, estimate, "pixel")


def bias_shrunk_priors(run: SeedRun, target_logits: torch.Tensor, names: list[str]) -> dict[str, ClassPrior]:
    """EM on softmax(z/T + b_c·λ_c) (λ_c = n_c/(n_c + m), n_c the class's pixels in the stage's calibration
    sample) under π_cal (``bias_m<m>``) and under π_s^(1−λ)·π_cal^λ renormalised (``bias_m<m>_blend``)."""
    calibrated, calibration = run.source.calibrated, run.calibration
    counts = (calibrated.counts if calibrated.counts is not None
              else calibrated.probs * calibration.metrics["num_samples"])
    priors = {}
    for pseudo_count in BIAS_PSEUDO_COUNTS:
        kept = counts / (counts + pseudo_count)
        shrunk = Calibration(calibration.temperature, calibration.bias * kept, "bcts")
        log_blend = np.log(run.source.pixel.probs) + kept * (np.log(calibrated.probs) - np.log(run.source.pixel.probs))
        blend = np.exp(log_blend - log_blend.max())
        priors[f"bias_m{pseudo_count}"] = em_prior(target_logits, shrunk, calibrated.probs, names)
        priors[f"bias_m{pseudo_count}_blend"] = em_prior(target_logits, shrunk, blend / blend.sum(), names)
    return priors


def large_calibration_prior(run: SeedRun, extra: dict[str, SplitLogits], target_logits: torch.Tensor,
                            names: list[str]) -> ClassPrior:
    """EM on posteriors calibrated by BCTS refitted on ``LARGE_CALIBRATION_PIXELS`` source-val pixels, under
    that sample's class mix."""
    logits, labels = upsampled_sample(extra["source_val"], LARGE_CALIBRATION_PIXELS, seed=run.seed + 2000)
    valid = labels != IGNORE_INDEX
    calibration = fit_calibration(logits[valid], labels[valid], "bcts")
    mix = np.bincount(labels[valid].numpy(), minlength=len(names)).astype(np.float64)
    return em_prior(target_logits, calibration, floor_probabilities(mix / mix.sum(), warn=False), names)


def shifted_prior(run: SeedRun, methods: Sequence[str], weights: Sequence[float]) -> ClassPrior:
    """The pixel prior whose raw-IA shift is Σ_e w_e·(log π̂_e − log π_s^(kind e)) (weights sum to 1)."""
    return ensemble.shifted_prior([run.estimate(method) for method in methods], weights, run.source)


def ia_miou(run: SeedRun, prior: ClassPrior, split: str = "target_val") -> float:
    transform = ia_transform(AdjustConfig(), run.source, prior, run.calibration)
    return miou_with_rows(run.caches[split], lambda index, logits: transform(logits))


def remedies(run: SeedRun, extra: dict[str, SplitLogits]) -> tuple[dict[str, ClassPrior], dict[str, Any]]:
    """Every remedy's pixel prior for one seed, and what was chosen without target-val labels."""
    names = list(run.source.pixel.classes)
    target_logits, _ = upsampled_sample(extra["target"], SAMPLE_PIXELS, seed=run.seed)
    priors = {"em (stage)": run.estimate("em"),
              "em_rerun": em_prior(target_logits, run.calibration, run.source.calibrated.probs, names)}
    shrunk = {w: shifted_prior(run, ("em",), (w,)) for w in SHRINK_GRID}
    select = {w: ia_miou(run, prior, "target_select") for w, prior in shrunk.items()}
    chosen = max(select, key=select.get)
    priors["shrink_w0.5"], priors["shrink_w_select"] = shrunk[0.5], shrunk[chosen]
    for combo in COMBOS:
        priors["combo_" + "+".join(combo)] = shifted_prior(run, combo, [1.0 / len(combo)] * len(combo))
    source_logits, source_labels = upsampled_sample(extra["source_val"], 300_000, seed=run.seed + 1000)
    temperature = fit_calibration(source_logits, source_labels, "temperature")
    priors["em_ts"] = em_prior(target_logits, temperature, run.source.pixel.probs, names)
    priors.update(bias_shrunk_priors(run, target_logits, names))
    priors["em_cal_large"] = large_calibration_prior(run, extra, target_logits, names)
    return priors, {"shrink_w_chosen": chosen, "shrink_select_miou": select,
                    "temperature": temperature.temperature}


def seed_rows(run: SeedRun, extra: dict[str, SplitLogits]) -> dict[str, Any]:
    """Per remedy: L1, log-ratio error, IA mIoU and share of the oracle gain on target val."""
    truth = run.priors[oracle_name("pixel")]
    none, oracle = miou_with_rows(run.caches["target_val"], None), ia_miou(run, truth)
    priors, chosen = remedies(run, extra)
    rows = {}
    for name, prior in priors.items():
        miou = ia_miou(run, prior)
        rows[name] = {"l1": prior_l1(prior.probs, truth.probs), "log_ratio": log_ratio_error(prior.probs, truth.probs),
                      "ia_miou": miou, "share": (miou - none) / (oracle - none)}
    return {"none": none, "oracle": oracle, "rows": rows, **chosen}


def markdown(per_seed: dict[int, dict[str, Any]]) -> str:
    seeds = list(per_seed)
    lines = ["| remedy | L1 (mean) | log-ratio error (mean) | share mean / worst | per seed " + " / ".join(map(str, seeds))
             + " (%) | IA mIoU per seed |", "|---|---:|---:|---:|---:|---:|"]
    for name in per_seed[seeds[0]]["rows"]:
        rows = [per_seed[s]["rows"][name] for s in seeds]
        shares = [100 * r["share"] for r in rows]
        lines.append(f"| `{name}` | {np.mean([r['l1'] for r in rows]):.3f} | "
                     f"{np.mean([r['log_ratio'] for r in rows]):.3f} | {np.mean(shares):.0f} % / {min(shares):.0f} % | "
                     + " / ".join(f"{s:.0f}" for s in shares) + " | "
                     + " / ".join(f"{r['ia_miou']:.2f}" for r in rows) + " |")
    lines.append("")
    lines.append("none / oracle per seed: " + "; ".join(f"{per_seed[s]['none']:.2f} / {per_seed[s]['oracle']:.2f}"
                                                      for s in seeds))
    lines.append("shrink w chosen on the selection split per seed: "
                 + ", ".join(f"{per_seed[s]['shrink_w_chosen']:g}" for s in seeds))
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m labelshift.bench.estimator_tries")
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--out", default="outputs/bench_per_image")
    parser.add_argument("--seed0-stages", default="outputs/demo/stages")
    parser.add_argument("--world-seeds", default="0,1,2,3,4")
    args = parser.parse_args(argv)
    out, seed0 = Path(args.out).resolve(), Path(args.seed0_stages).resolve()
    log = lambda line: print(line, file=sys.stderr, flush=True)
    per_seed = {}
    for seed in (int(part) for part in args.world_seeds.split(",")):
        run = prepare_seed(args.config, out, seed, seed0, log)
        cfg, stages = seed_config(args.config, out, seed, seed0)
        extra = {split: cached_logits(cfg, stages / "pretrain" / "model.safetensors", split,
                                      out / f"seed{seed}" / f"cache_{split}.pt") for split in ("target", "source_val")}
        per_seed[seed] = seed_rows(run, extra)
        log(f"seed {seed} done")
    print(markdown(per_seed))
    print(json.dumps({str(seed): result for seed, result in per_seed.items()}, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
