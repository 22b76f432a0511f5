"""Benchmark of per-image priors and of the dataset-level estimate across world seeds (issue 15).

Per world seed (each its own world and source model, the demo recipe; seed 0 reuses the demo's stages when
``--seed0-stages`` holds them) the job's ``pretrain``, ``estimate`` and ``evaluate_adapted`` stages run once
(in-process, CPU) under ``<out>/seed<N>/world``; the target-val and selection-split logits are then cached at
the model's output stride in float16 (``labelshift.logit_cache``; ``<out>/seed<N>/cache_<split>.pt``) and every
measurement reuses them. IA is applied at the stride and upsampled exactly (as a Tune trial does).

Parts: (0) per estimator over every seed: prior L1, log-ratio error, IA mIoU and share of the oracle gain;
(1) ceilings on target val: none, IA with the dataset oracle, with each image's own oracle prior, and that
shrunk toward the dataset oracle; (2) per-image estimators (``map_em`` over κ, ``map_count``), their safety
counts and cost per image; (3) the setting chosen on the selection split, reported on target val against global
IA with the same dataset estimate; (digits) the same ceilings and MAP-EM on small target batches.

``python -m labelshift.bench.per_image [--world-seeds 0,1,2,3,4] [--local-seeds 0,1,2] [--out DIR]``; prints
markdown, writes ``<out>/per_image_benchmark.{md,json}`` and ends with one JSON line. Training and caching are
done once per seed; the rest takes a few minutes on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from labelshift.adjust import LocalIA, ia_transform
from labelshift.artifacts import (NO_ADJUST, estimate_name, evaluation_key, ia_name, oracle_name, read_calibration,
                                  read_priors, source_priors_from)
from labelshift.atomic import write_json_atomic, write_text_atomic
from labelshift.calibrate import Calibration
from labelshift.config import AdjustConfig
from labelshift.config.sections import LocalAdjustConfig
from labelshift.priors import ClassPrior, SourcePriors, floor_probabilities, prior_l1

CACHED_SPLITS = ("target_val", "target_select")
SHRINK_STRENGTHS = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9)  # λ of (1 − λ)·q_image + λ·π_dataset


@dataclass
class SeedRun:
    """One world seed: its config, estimate outputs and cached logits."""

    seed: int
    stages: Path
    priors: dict[str, ClassPrior]
    calibration: Calibration
    caches: dict[str, SplitLogits]

    @property
    def source(self) -> SourcePriors:
        return source_priors_from(self.priors)

    def estimate(self, method: str) -> ClassPrior:
        return self.priors[estimate_name(method)]


# ------------------------------------------------------------------------------------------- preparation
def seed_config(config: str, out: Path, seed: int, seed0_stages: Path | None):
    """(config, stages dir) of world ``seed``: the demo's own for seed 0 when ``seed0_stages`` is complete,
    else the bench's world under ``<out>/seed<N>`` (:func:`labelshift.bench.priors.world_config`)."""
    from labelshift.bench.priors import world_config
    from labelshift.config import load_config

    if seed == 0 and seed0_stages is not None and (seed0_stages / "evaluate_adapted" / "manifest.json").is_file():
        return load_config(config), seed0_stages
    cfg = world_config(config, out / f"seed{seed}", [f"data.world.seed={seed}"])
    return cfg, Path(cfg.output_dir) / "stages"


def train_seed(config: str, out: Path, seed: int, log: Callable[[str], None]) -> None:
    """The job's pretrain, estimate and evaluate_adapted stages for world ``seed`` (skipped when complete)."""
    from labelshift.bench.priors import run_world

    run_world(config, out / f"seed{seed}", [f"data.world.seed={seed}"], log=log)


def selection_config(cfg):
    """``cfg`` with ``data.target_select`` = the world's ``splits/select.txt`` of target train (unless set)."""
    if cfg.data.target_select is not None:
        return cfg
    select = cfg.data.target.model_copy(update={"list_file": "splits/select.txt"})
    return cfg.model_copy(update={"data": cfg.data.model_copy(update={"target_select": select})})


@dataclass
class SplitLogits:
    """A labelled split's logits at the model's output stride (float16) and its labels (uint8, 255 ignored)."""

    logits: torch.Tensor  # (N, K, h, w) float16
    labels: torch.Tensor  # (N, H, W) uint8
    names: list[str]
    align_corners: bool

    def __len__(self) -> int:
        return len(self.names)

    def low_res(self, index: int) -> torch.Tensor:
        """(K, h, w) float32 logits of image ``index``."""
        return self.logits[index].float()

    @property
    def num_classes(self) -> int:
        return self.logits.shape[1]


def cached_logits(cfg, model_path: Path, split: str, path: Path) -> SplitLogits:
    """The split's logits, computed once (one forward pass) and stored at ``path``."""
    if path.is_file():
        return SplitLogits(**torch.load(path, weights_only=False))
    from labelshift.build import build_model, eval_loader
    from labelshift.inference import predict
    from labelshift.models import align_corners_of

    model = build_model(cfg, model_path).eval()
    logits, labels, names = [], [], []
    for batch in eval_loader(cfg, split):
        logits.append(predict(model, batch["image"], None, device=torch.device("cpu")).to(torch.float16))
        labels.append(batch["label"].to(torch.uint8))
        names += list(batch["name"])
    state = {"logits": torch.cat(logits), "labels": torch.cat(labels), "names": names,
             "align_corners": align_corners_of(model)}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)
    return SplitLogits(**state)


def prepare_seed(config: str, out: Path, seed: int, seed0_stages: Path | None,
                 log: Callable[[str], None]) -> SeedRun:
    """Train (once), estimate (once) and cache the logits (once) of world ``seed``."""
    cfg, stages = seed_config(config, out, seed, seed0_stages)
    if stages != seed0_stages:  # the job skips complete stages and re-runs those whose settings changed
        train_seed(config, out, seed, log)
    cfg = selection_config(cfg)
    model_path = stages / "pretrain" / "model.safetensors"
    caches = {split: cached_logits(cfg, model_path, split, out / f"seed{seed}" / f"cache_{split}.pt")
              for split in CACHED_SPLITS}
    estimate_dir = stages / "estimate"
    calibration = read_calibration(estimate_dir)
    if calibration.presence is None:  # a stage written before presence models: the library's source-val pass
        calibration.presence = presence_model_for(cfg, model_path)
    return SeedRun(seed, stages, read_priors(estimate_dir), calibration, caches)


def presence_model_for(cfg, model_path: Path):
    """The presence model the estimate stage fits (``sample_pixels`` on source val, ``presence_model_of``)."""
    from labelshift.build import build_model, eval_loader
    from labelshift.estimate.from_config import CALIBRATION_PIXELS_PER_IMAGE, presence_model_of
    from labelshift.inference import sample_pixels

    model = build_model(cfg, model_path).eval()
    return presence_model_of(sample_pixels(model, eval_loader(cfg, "source_val"), device=torch.device("cpu"),
                                           pixels_per_image=CALIBRATION_PIXELS_PER_IMAGE, seed=cfg.prior.seed))


# ------------------------------------------------------------------------------------------- evaluation
def stacked_logits(split: SplitLogits) -> torch.Tensor:
    """(N, K, h, w) float32 logits of a split."""
    return split.logits.float()


def miou_with_rows(split: SplitLogits, adjust_row: Callable[[int, torch.Tensor], torch.Tensor] | None) -> float:
    """Target mIoU (percent) of ``argmax(upsample(adjust_row(index, logits (1, K, h, w))))`` summed over the split
    (None: raw logits); IA at the stride commutes with the bilinear upsampling."""
    from labelshift.metrics import ConfusionMatrix
    from labelshift.models import upsample_logits

    matrix = ConfusionMatrix(split.num_classes)
    size = tuple(split.labels.shape[-2:])
    for index in range(len(split)):
        logits = split.low_res(index)[None]
        adjusted = logits if adjust_row is None else adjust_row(index, logits)
        predicted = upsample_logits(adjusted, size, align_corners=split.align_corners).argmax(1)
        matrix.update(split.labels[index: index + 1].long(), predicted)
    return 100.0 * matrix.miou()


def miou_with_priors(split: SplitLogits, transform: LocalIA, image_priors: torch.Tensor) -> float:
    """mIoU (percent) of IA toward the given per-image priors (N, K), the transform's source and settings."""
    from labelshift.estimate.per_image import ImagePriors

    def adjust_row(index: int, logits: torch.Tensor) -> torch.Tensor:
        row = ImagePriors(image_priors[index: index + 1], *(torch.zeros(1, dtype=dtype)
                                                          for dtype in (torch.int64, torch.bool, torch.int64)))
        return transform.apply(logits, row)
    return miou_with_rows(split, adjust_row)


def image_label_priors(split: SplitLogits) -> torch.Tensor:
    """(N, K) float64: each image's own label pixel prior (the per-image oracle), floored."""
    labels = split.labels.reshape(len(split), -1).long()
    counts = torch.stack([torch.bincount(row[row < split.num_classes], minlength=split.num_classes)
                          for row in labels])
    return torch.from_numpy(floor_probabilities(counts.double().numpy(), warn=False))


def local_transform(run: SeedRun, centre: ClassPrior, **local: Any) -> LocalIA:
    """The library's local IA (``ia_transform`` with ``adjust.mode: local``) centred on ``centre``."""
    adjust = AdjustConfig(mode="local", local=LocalAdjustConfig(**local))
    return ia_transform(adjust, run.source, centre, run.calibration)


# ------------------------------------------------------------------------------------------------ measurements
def log_ratio_error(estimate: np.ndarray, oracle: np.ndarray) -> float:
    """mean_c |log π̂_c − log π_c| (both floored): the error of IA's shift, which weighs rare classes fully."""
    return float(np.mean(np.abs(np.log(floor_probabilities(estimate, warn=False))
                                - np.log(floor_probabilities(oracle, warn=False)))))


def estimator_rows(run: SeedRun) -> dict[str, dict[str, float]]:
    """Per estimator of the estimate stage: L1 and log-ratio error against the target-train oracle of its kind,
    IA mIoU on target val (from evaluate_adapted) and the share of the pixel-oracle IA gain."""
    metrics = json.loads((run.stages / "evaluate_adapted" / "metrics.json").read_text())

    def miou(transform: str) -> float:
        return float(metrics[evaluation_key("target_val", transform)]["miou"])

    none, oracle = miou(NO_ADJUST), miou(ia_name(oracle_name("pixel")))
    rows = {}
    for name, prior in run.priors.items():
        if not name.startswith(estimate_name("")):
            continue
        truth = run.priors[oracle_name(prior.kind)].probs
        ia_miou = miou(ia_name(name))
        rows[name[len(estimate_name("")):]] = {
            "kind": prior.kind, "l1": prior_l1(prior.probs, truth), "log_ratio": log_ratio_error(prior.probs, truth),
            "ia_miou": ia_miou, "share": (ia_miou - none) / (oracle - none) if oracle - none > 1e-9 else None}
    rows["_none"] = {"ia_miou": none, "oracle_ia_miou": oracle}
    return rows


def ceilings(run: SeedRun, split: str = "target_val") -> dict[str, float]:
    """mIoU (percent) of: no adjustment, IA with the dataset oracle (target-train labels), IA with each image's
    own label prior, and that prior shrunk toward the dataset oracle, (1 − λ)·q_image + λ·π, for each λ."""
    cache, dataset = run.caches[split], run.priors[oracle_name("pixel")]
    global_ia = ia_transform(AdjustConfig(), run.source, dataset, run.calibration)
    result = {"none": miou_with_rows(cache, None),
              "dataset_oracle": miou_with_rows(cache, lambda index, logits: global_ia(logits))}
    own = image_label_priors(cache)
    transform = local_transform(run, dataset)
    for strength in SHRINK_STRENGTHS:
        mixed = (1.0 - strength) * own + strength * torch.tensor(dataset.probs)[None]
        result[f"image_oracle_shrunk_{strength:g}"] = miou_with_priors(cache, transform, mixed)
    return result


def local_candidates() -> list[dict[str, Any]]:
    """The per-image settings searched on the selection split (``effective_pixels`` 1000 throughout), each
    without and with the presence weighting."""
    candidates = [{"estimator": "map_em", "kappa": kappa} for kappa in (100.0, 300.0, 1000.0, 3000.0)]
    candidates += [{"estimator": "map_count", "kappa": kappa, "count_steps": steps}
                   for kappa in (100.0, 300.0, 1000.0, 3000.0) for steps in (1, 2, 3)]
    return [{**candidate, "presence": presence} for presence in (False, True) for candidate in candidates]


def local_scores(run: SeedRun, centre_method: str, split: str) -> list[dict[str, Any]]:
    """mIoU of every candidate on ``split`` with its safety counts and cost (ms per image, the batched estimate
    of the whole split at the output stride, one process)."""
    cache, centre = run.caches[split], run.estimate(centre_method)
    logits = stacked_logits(cache)
    scores = []
    for candidate in local_candidates():
        transform = local_transform(run, centre, **candidate)
        started = time.perf_counter()
        priors = transform.image_priors(logits)
        cost_ms = 1000.0 * (time.perf_counter() - started) / len(cache)
        scores.append({**candidate, "miou": miou_with_priors(cache, transform, priors.probs), "ms_per_image": cost_ms,
                       **priors.counts()})
    return scores


def local_result(run: SeedRun, image_oracle: float, centre_method: str) -> dict[str, Any]:
    """Global IA with the dataset estimate vs the local setting chosen on the selection split, on target val;
    the share of the per-image oracle headroom (``image_oracle``, the per-image oracle's target-val mIoU, − global
    IA) the choice recovers."""
    centre = run.estimate(centre_method)
    global_ia = ia_transform(AdjustConfig(), run.source, centre, run.calibration)
    select = local_scores(run, centre_method, "target_select")
    chosen = max(select, key=lambda score: score["miou"])
    setting = score_key(chosen)
    val = {json.dumps(score_key(s)): s for s in local_scores(run, centre_method, "target_val")}
    chosen_val = val[json.dumps(setting)]
    global_val = miou_with_rows(run.caches["target_val"], lambda index, logits: global_ia(logits))
    return {"centre": centre_method, "chosen": setting, "chosen_select_miou": chosen["miou"],
            "global_select_miou": miou_with_rows(run.caches["target_select"], lambda i, z: global_ia(z)),
            "global_val_miou": global_val, "local_val_miou": chosen_val["miou"],
            "gain": chosen_val["miou"] - global_val,
            "headroom_share": (chosen_val["miou"] - global_val) / (image_oracle - global_val),
            "chosen_val_counts": {key: chosen_val[key] for key in ("images", "fallback_images", "floored_images",
                                                                    "floored_classes", "ms_per_image")},
            "select_scores": select, "val_scores": list(val.values())}


def score_key(score: dict[str, Any]) -> dict[str, Any]:
    """The setting a local score was measured with."""
    return {key: score[key] for key in ("estimator", "kappa", "count_steps", "presence") if key in score}


# ------------------------------------------------------------------------------------------------------ digits
def digits_small_batches(batch_sizes: Sequence[int] = (10, 30, 100), batches: int = 40, spread: float = 10.0,
                         seed: int = 0) -> dict[str, dict[str, float]]:
    """Digits (the priors benchmark's logistic regression, IA in the calibrated space): a dataset prior
    π_D ~ Dirichlet(1), per batch a prior q_b ~ Dirichlet(``spread``·π_D) and ``batch_size`` points drawn with
    it. Accuracy (percent) per batch size of: no adjustment, IA with the dataset oracle (all batches' labels),
    with each batch's own label prior (and shrunk half way), and per-batch MAP-EM / hard EM centred on the
    dataset's EM + BCTS estimate (a batch is one "image" whose points are independent: effective_pixels = n)."""
    from labelshift.bench.priors import prepare_digits, sample_target
    from labelshift.estimate import estimate_prior

    task = prepare_digits(seed)
    names, num_classes = task.classes, len(task.classes)
    source = ClassPrior(names, task.source_prior, "pixel")
    rng = np.random.default_rng([seed, 15])
    dataset_prior = rng.dirichlet(np.ones(num_classes))
    results = {}
    for size in batch_sizes:
        picks = [sample_target(task.pool_labels, rng.dirichlet(spread * dataset_prior), size, rng)
                 for _ in range(batches)]
        logits = torch.stack([task.pool_logits[p] for p in picks]).permute(0, 2, 1)[:, :, None, :]  # (B, K, 1, n)
        labels = torch.stack([torch.from_numpy(task.pool_labels[p]) for p in picks])  # (B, n)
        own = torch.stack([torch.bincount(row, minlength=num_classes) for row in labels]).double()
        pooled = ClassPrior(names, floor_probabilities(own.sum(0).numpy(), warn=False), "pixel")
        calibrated = task.calibration.apply(logits.squeeze(2).permute(0, 2, 1).reshape(-1, num_classes)).softmax(1)
        estimate = estimate_prior(calibrated, "em", classes=names, source_prior=source, bootstrap=0)
        calibrated_ia = AdjustConfig(space="calibrated")

        def accuracy(adjusted: torch.Tensor) -> float:
            return 100.0 * float((adjusted.argmax(1)[:, 0] == labels).double().mean())

        global_ia = ia_transform(calibrated_ia, source, estimate, task.calibration)
        no_presence = LocalAdjustConfig(presence=False)  # a batch of points has no image to read presence from
        oracle_local = ia_transform(calibrated_ia.model_copy(update={"mode": "local", "local": no_presence}), source,
                                    pooled, task.calibration)
        own_probs = torch.from_numpy(floor_probabilities(own.numpy(), warn=False))
        row = {"none": accuracy(logits), "dataset_oracle": accuracy(ia_transform(calibrated_ia, source, pooled,
                                                                                 task.calibration)(logits)),
               "global_em": accuracy(global_ia(logits)),
               "batch_oracle": accuracy(oracle_local._adjust_toward(logits, own_probs)),
               "batch_oracle_shrunk_0.5": accuracy(oracle_local._adjust_toward(
                   logits, 0.5 * own_probs + 0.5 * torch.from_numpy(pooled.probs)[None]))}
        for estimator, kappa in (("map_em", 0.0), ("map_em", size / 3), ("map_em", float(size)),
                                 ("map_count", float(size))):
            local = ia_transform(calibrated_ia.model_copy(update={"mode": "local", "local": LocalAdjustConfig(
                estimator=estimator, kappa=kappa, effective_pixels=size, floor=0.01, presence=False)}), source, estimate,
                task.calibration)
            row[f"{estimator}_kappa_{kappa / size:.2g}n"] = accuracy(local(logits))
        results[str(size)] = row
    return results


# ----------------------------------------------------------------------------------------------------- report
def across_worlds(rows: dict[int, dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Per estimator over the seeds: mean L1, mean log-ratio error, mean and worst share of the oracle gain."""
    methods = [m for m in next(iter(rows.values())) if not m.startswith("_")]
    summary = {}
    for method in methods:
        shares = [seed_rows[method]["share"] for seed_rows in rows.values() if seed_rows[method]["share"] is not None]
        summary[method] = {"kind": next(iter(rows.values()))[method]["kind"],
                           "l1": float(np.mean([r[method]["l1"] for r in rows.values()])),
                           "log_ratio": float(np.mean([r[method]["log_ratio"] for r in rows.values()])),
                           "share_mean": float(np.mean(shares)) if shares else None,
                           "share_worst": float(np.min(shares)) if shares else None}
    return summary


def markdown(result: dict[str, Any]) -> str:
    """The report's tables."""
    lines = ["# Per-image priors benchmark", "", "## Dataset estimate across world seeds "
             f"{result['world_seeds']}", "", "| estimator | kind | L1 | log-ratio error | share of oracle gain "
             "(mean / worst) |", "|---|---|---:|---:|---:|"]
    for method, row in result["across_worlds"].items():
        share = "–" if row["share_mean"] is None else f"{100 * row['share_mean']:.0f} % / {100 * row['share_worst']:.0f} %"
        lines.append(f"| `{method}` | {row['kind']} | {row['l1']:.3f} | {row['log_ratio']:.3f} | {share} |")
    centres = sorted({local["centre"] for local in result["local"].values()})
    lines += ["", f"## Ceilings and local IA (target val), centred on {', '.join(centres)}", "", "| seed | none | dataset oracle | image oracle | "
              "global IA | local (chosen on select) | gain | headroom share | chosen |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for seed, local in result["local"].items():
        ceiling = result["ceilings"][seed]
        lines.append(f"| {seed} | {ceiling['none']:.2f} | {ceiling['dataset_oracle']:.2f} | "
                     f"{ceiling['image_oracle_shrunk_0']:.2f} | {local['global_val_miou']:.2f} | "
                     f"{local['local_val_miou']:.2f} | {local['gain']:+.2f} | {100 * local['headroom_share']:.0f} % | "
                     f"{local['chosen']} |")
    return "\n".join(lines) + "\n"


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part.strip())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m labelshift.bench.per_image", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--out", default="outputs/bench_per_image")
    parser.add_argument("--seed0-stages", default="outputs/demo/stages", help="the demo's stages (world seed 0)")
    parser.add_argument("--world-seeds", type=_ints, default=(0, 1, 2, 3, 4))
    parser.add_argument("--local-seeds", type=_ints, default=(0, 1, 2))
    parser.add_argument("--skip-digits", action="store_true")
    parser.add_argument("--local-centre", default=None,
                        help="the dataset estimate the local mode is centred on and compared with (default: the "
                             "config's prior.method, what the job's local mode centres on)")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    if args.local_centre is None:
        from labelshift.config import load_config

        args.local_centre = load_config(args.config).prior.method
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    runs = {seed: prepare_seed(args.config, out, seed, Path(args.seed0_stages).resolve(), log)
            for seed in dict.fromkeys((*args.world_seeds, *args.local_seeds))}
    rows = {seed: estimator_rows(runs[seed]) for seed in args.world_seeds}
    limits = {seed: ceilings(runs[seed]) for seed in args.local_seeds}
    result: dict[str, Any] = {"world_seeds": list(args.world_seeds), "estimators": rows,
                              "across_worlds": across_worlds(rows), "ceilings": limits,
                              "local": {seed: local_result(runs[seed], limits[seed]["image_oracle_shrunk_0"],
                                                           args.local_centre)
                                        for seed in args.local_seeds}}
    gains = [local["gain"] for local in result["local"].values()]
    result["local_summary"] = {"gain_mean": float(np.mean(gains)), "gain_min": float(np.min(gains)),
                               "headroom_share_mean": float(np.mean([l["headroom_share"]
                                                                     for l in result["local"].values()]))}
    result["digits"] = None if args.skip_digits else digits_small_batches()
    report = markdown(result)
    write_text_atomic(out / "per_image_benchmark.md", report)
    write_json_atomic(out / "per_image_benchmark.json", result)
    print(report)
    print(json.dumps({"across_worlds": result["across_worlds"], "local": result["local_summary"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
