"""The estimate pass driven by an experiment config: what the job's estimate stage and ``labelshift
estimate-prior`` run in one process (a Ray Data pass feeds the same functions from its actors)."""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from labelshift.build import amp_dtype_of, build_split, class_set_of, eval_loader
from labelshift.calibrate import Calibration
from labelshift.config import ExperimentConfig
from labelshift.estimate.base import EstimatorInputs
from labelshift.estimate.passes import (calibrated_source_prior, estimator_results, feed_source_sample,
                                        fit_source_calibration, label_statistics_of, make_estimators,
                                        needs_source_validation, update_estimators)
from labelshift.inference import iterate_predictions
from labelshift.models import checkpoint_sha256
from labelshift.priors import ClassPrior, LabelStatistics, SourcePriors, load_prior


def source_priors(cfg: ExperimentConfig) -> SourcePriors:
    """``prior.source_prior`` when set (used for both kinds), else the exact pixel and image statistics of the
    source split's labels."""
    class_set = class_set_of(cfg)
    if cfg.prior.source_prior:
        return SourcePriors.single(load_prior(cfg.prior.source_prior, class_set))
    stats = label_statistics_of(build_split(cfg, "source", train=False), class_set.names, cfg.data.num_workers)
    meta = {"dataset": cfg.data.source.kind, "root": cfg.data.source.root,
            "split": cfg.data.source.split or cfg.data.source.list_file}
    return SourcePriors(stats.pixel_prior(**meta), stats.image_prior(**meta))


@dataclass
class PriorEstimation:
    """What one estimate pass produces: the source priors IA needs (``source.calibrated`` is the prior of the
    calibrated posteriors, EM's source prior), the calibration, every estimate (with provenance), and the
    target label statistics when labels exist (measurement only)."""

    source: SourcePriors
    calibration: Calibration
    estimates: dict[str, ClassPrior]
    oracle: LabelStatistics | None


def estimate_target_priors(cfg: ExperimentConfig, model: nn.Module, checkpoint: str | Path, *,
                           device: torch.device, methods: tuple[str, ...], with_oracle: bool,
                           checkpoint_hash: str | None = None,
                           loader: Callable[..., Iterable[dict]] | None = None) -> PriorEstimation:
    """Source priors, calibration on source val (only when a method needs it), and every estimator in
    ``methods`` in one pass over target train (seeded by ``prior.seed``). Estimates record the checkpoint (path
    and sha256, computed unless ``checkpoint_hash`` is given), the target dataset and split, and the
    calibration in their provenance. ``loader(which, with_labels=, max_images=)`` builds a split's batches
    (default: :func:`labelshift.build.eval_loader` of ``cfg``; the job passes one that draws a progress bar)."""
    loader = loader or functools.partial(eval_loader, cfg)
    class_names = class_set_of(cfg).names
    prior_cfg = cfg.prior
    amp = amp_dtype_of(cfg, device)
    source = source_priors(cfg)
    if needs_source_validation(methods, prior_cfg.calibration):
        calibration, (sample_logits, sample_labels) = fit_source_calibration(
            model, loader("source_val"), prior_cfg.calibration, device=device, seed=prior_cfg.seed,
            amp_dtype=amp)
    else:
        calibration = Calibration.identity(len(class_names))
        sample_logits, sample_labels = torch.zeros(0, len(class_names)), torch.zeros(0, dtype=torch.long)
    source = replace(source, calibrated=calibrated_source_prior(calibration, sample_labels, source.pixel))
    inputs = EstimatorInputs(source.pixel, source.calibrated, prior_cfg.em_sample_pixels,
                             prior_cfg.presence_threshold)
    estimators = make_estimators(methods, class_names, inputs, bootstrap=prior_cfg.bootstrap, seed=prior_cfg.seed)
    feed_source_sample(estimators, calibration, sample_logits, sample_labels)
    oracle: LabelStatistics | None = LabelStatistics(class_names) if with_oracle else None
    target_batches = loader("target", with_labels=with_oracle, max_images=prior_cfg.max_images)
    for logits, labels, _ in iterate_predictions(model, target_batches, device=device, at_label_size=False, amp_dtype=amp):
        update_estimators(estimators, logits, calibration)
        if labels is None:
            oracle = None
        elif oracle is not None:
            oracle.update(labels)
    target = cfg.data.target
    provenance = {"checkpoint": str(checkpoint), "checkpoint_sha256": checkpoint_hash or checkpoint_sha256(checkpoint),
                  "dataset": target.kind, "root": target.root, "split": target.split or target.list_file,
                  "calibration": calibration.to_dict()}
    return PriorEstimation(source, calibration, estimator_results(estimators, provenance), oracle)
