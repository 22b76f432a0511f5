"""The estimate stage: exact source prior, calibration on source val, every estimator on target train.

All estimators share one forward pass over target train; the oracle (target-train labels, when they exist)
is only ever used to *measure* the estimates, never to train or select.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from labelshift.build import build_split, class_set_of, eval_loader
from labelshift.calibrate import Calibration, fit_calibration
from labelshift.config import ExperimentConfig
from labelshift.estimate import make_estimator
from labelshift.inference import iterate_predictions, sample_pixels
from labelshift.models import checkpoint_sha256
from labelshift.priors import ClassPrior, LabelStatistics, load_prior, prior_kl, prior_l1

PIXEL_METHODS = ("count", "soft_count", "em", "bbse")
IMAGE_METHODS = ("reference", "presence")


def label_statistics(loader: Iterable[dict], class_names: tuple[str, ...]) -> LabelStatistics:
    """Exact per-class pixel and image counts of a labelled loader's label maps."""
    statistics = LabelStatistics(class_names)
    for batch in loader:
        statistics.update(batch["label"])
    return statistics


def label_statistics_of(dataset, class_names: tuple[str, ...], num_workers: int = 0) -> LabelStatistics:
    """Exact class counts of a labelled dataset, from its label files alone (no image is decoded)."""
    from labelshift.data import LabelMaps

    loader = torch.utils.data.DataLoader(LabelMaps(dataset), batch_size=1, num_workers=num_workers)
    return label_statistics(loader, class_names)


def source_priors(cfg: ExperimentConfig) -> tuple[ClassPrior, ClassPrior]:
    """(pixel, image) priors of the source: ``prior.source_prior`` when set (used for both), else the exact
    statistics of the source split's labels."""
    class_set = class_set_of(cfg)
    if cfg.prior.source_prior:
        given = load_prior(cfg.prior.source_prior, class_set)
        return given, given
    stats = label_statistics_of(build_split(cfg, "source", train=False), class_set.names, cfg.data.num_workers)
    meta = {"dataset": cfg.data.source.kind, "root": cfg.data.source.root,
            "split": cfg.data.source.split or cfg.data.source.list_file}
    return stats.pixel_prior(**meta), stats.image_prior(**meta)


def fit_source_calibration(model: nn.Module, loader: Iterable[dict], method: str, *, device: torch.device,
                           pixels_per_image: int = 2000, seed: int = 0) -> tuple[Calibration, tuple[torch.Tensor, torch.Tensor]]:
    """Calibration fitted on a seeded pixel sample of the labelled source-validation split."""
    logits, labels = sample_pixels(model, loader, device=device, pixels_per_image=pixels_per_image, seed=seed)
    return fit_calibration(logits, labels, method=method), (logits, labels)


def calibrated_source_prior(calibration: Calibration, sample_labels: torch.Tensor, source_pixel_prior: ClassPrior) -> ClassPrior:
    """The prior under which the calibrated posteriors softmax(z/T + b) hold.

    BCTS fits its bias on the source-validation sample, so it absorbs that sample's class mix: the posteriors
    then hold under the sample's label histogram. Plain temperature scaling keeps the training prior.
    """
    if calibration.method != "bcts":
        return source_pixel_prior
    counts = torch.bincount(sample_labels.long(), minlength=source_pixel_prior.num_classes).numpy()
    return ClassPrior.from_counts(source_pixel_prior.classes, counts, "pixel", {
        "estimator": "label_pixel_counts", "split": "source_val calibration sample",
        "note": "class mix of the pixels BCTS was fitted on: the prior of the calibrated posteriors"})


def run_estimators(model: nn.Module, target_loader: Iterable[dict], *, device: torch.device,
                   calibration: Calibration, source_pixel_prior: ClassPrior, calibrated_prior: ClassPrior,
                   source_sample: tuple[torch.Tensor, torch.Tensor], methods: tuple[str, ...],
                   em_sample_pixels: int, presence_threshold: float, bootstrap: int, seed: int,
                   class_names: tuple[str, ...]) -> tuple[dict[str, ClassPrior], LabelStatistics | None]:
    """One pass over target train; returns {method: prior} and the target label statistics (oracle) if labelled.

    Pixel methods see calibrated posteriors softmax(z/T + b), which hold under ``calibrated_prior`` (EM takes
    that one); the ``reference`` rule sees the raw softmax and thresholds on the source-train pixel
    frequencies, as the reference code did.
    """
    estimators = {}
    for method in methods:
        kwargs = {"bootstrap": bootstrap, "seed": seed}
        if method == "reference":
            kwargs["thresholds"] = source_pixel_prior  # a published preset keeps its exact float32 values
        elif method == "presence":
            kwargs["threshold"] = presence_threshold
        elif method == "em":
            kwargs.update(source_prior=calibrated_prior, sample_size=em_sample_pixels)
        estimators[method] = make_estimator(method, class_names, **kwargs)
    if "bbse" in estimators:
        logits, labels = source_sample
        estimators["bbse"].update_source(calibration.apply(logits).softmax(1), labels)
    oracle: LabelStatistics | None = LabelStatistics(class_names)
    for logits, labels, _ in iterate_predictions(model, target_loader, device=device, at_label_size=False):
        raw_probs = logits.softmax(1)
        calibrated_probs = calibration.apply(logits).softmax(1)
        for method, estimator in estimators.items():
            estimator.update(raw_probs if method in IMAGE_METHODS else calibrated_probs)
        if labels is None:
            oracle = None
        elif oracle is not None:
            oracle.update(labels)
    return {method: estimator.result() for method, estimator in estimators.items()}, oracle


def prior_errors(estimates: dict[str, ClassPrior], oracle_pixel: ClassPrior, oracle_image: ClassPrior,
                 source_pixel: ClassPrior, source_image: ClassPrior) -> dict[str, float]:
    """L1 and KL of each estimate against the oracle of the same kind, and of the no-adjustment baseline."""
    errors = {"no_adjust_pixel_l1": prior_l1(source_pixel, oracle_pixel),
              "no_adjust_image_l1": prior_l1(source_image, oracle_image)}
    for method, estimate in estimates.items():
        oracle = oracle_pixel if estimate.kind == "pixel" else oracle_image
        errors[f"{method}_l1"] = prior_l1(estimate, oracle)
        errors[f"{method}_kl"] = prior_kl(oracle, estimate)
    return errors


@dataclass
class PriorEstimation:
    """What one estimate pass produces: the source priors IA needs, the calibration, every estimate (with
    provenance), and the target-train label statistics when labels exist (measurement only)."""

    source_pixel: ClassPrior
    source_image: ClassPrior
    calibration: Calibration
    calibrated_source: ClassPrior  # the prior of the calibrated posteriors (EM's source prior)
    estimates: dict[str, ClassPrior]
    oracle: LabelStatistics | None


def needs_source_validation(methods: Iterable[str], calibration_method: str) -> bool:
    """Whether the labelled source-validation split is needed: BBSE's confusion, or a calibration for the
    pixel methods."""
    methods = tuple(methods)
    return "bbse" in methods or (calibration_method != "none" and any(m in PIXEL_METHODS for m in methods))


def estimate_target_priors(cfg: ExperimentConfig, model: nn.Module, checkpoint: str | Path, *,
                           device: torch.device, methods: tuple[str, ...], with_oracle: bool, seed: int,
                           checkpoint_hash: str | None = None) -> PriorEstimation:
    """Source priors, calibration on source val (only when a method needs it), and every estimator in
    ``methods`` in one pass over target train. Estimates record the checkpoint (path and sha256, computed
    unless ``checkpoint_hash`` is given), the target dataset and split, and the calibration in their provenance."""
    class_names = class_set_of(cfg).names
    prior_cfg = cfg.prior
    source_pixel, source_image = source_priors(cfg)
    if needs_source_validation(methods, prior_cfg.calibration):
        calibration, sample = fit_source_calibration(model, eval_loader(cfg, "source_val"), prior_cfg.calibration,
                                                     device=device, seed=seed)
    else:
        calibration = Calibration.identity(len(class_names))
        sample = (torch.zeros(0, len(class_names)), torch.zeros(0, dtype=torch.long))
    calibrated = calibrated_source_prior(calibration, sample[1], source_pixel)
    estimates, oracle = run_estimators(
        model, eval_loader(cfg, "target", with_labels=with_oracle, max_images=prior_cfg.max_images),
        device=device, calibration=calibration, source_pixel_prior=source_pixel, calibrated_prior=calibrated,
        source_sample=sample, methods=methods, em_sample_pixels=prior_cfg.em_sample_pixels,
        presence_threshold=prior_cfg.presence_threshold, bootstrap=prior_cfg.bootstrap, seed=seed,
        class_names=class_names)
    target = cfg.data.target
    provenance = {"checkpoint": str(checkpoint), "checkpoint_sha256": checkpoint_hash or checkpoint_sha256(checkpoint),
                  "dataset": target.kind, "root": target.root, "split": target.split or target.list_file,
                  "calibration": calibration.to_dict()}
    estimates = {method: prior.with_provenance(**provenance) for method, prior in estimates.items()}
    return PriorEstimation(source_pixel, source_image, calibration, calibrated, estimates, oracle)
