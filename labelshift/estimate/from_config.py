"""The estimate pass driven by an experiment config: what the job's estimate stage and ``labelshift
estimate-prior`` run in one process (a Ray Data pass feeds the same functions from its actors)."""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from labelshift.build import amp_dtype_of, build_split, class_set_of, eval_loader
from labelshift.calibrate import Calibration, fit_calibration
from labelshift.classes import ClassSet
from labelshift.config import ExperimentConfig, PriorConfig
from labelshift.estimate.base import EstimatorInputs, PriorEstimator
from labelshift.estimate.ensemble import ensembles_of
from labelshift.estimate.passes import (calibrated_source_prior, estimator_results, feed_source_sample,
                                        label_statistics_of, make_estimators, needs_source_validation,
                                        update_estimators)
from labelshift.image_presence import PresenceModel, fit_presence_model
from labelshift.inference import LabelledSample, iterate_predictions, sample_pixels
from labelshift.models import checkpoint_sha256
from labelshift.priors import PRIOR_KINDS, ClassPrior, LabelStatistics, PriorError, SourcePriors, load_prior


def named_source_priors(prior_cfg: PriorConfig, class_set: ClassSet) -> dict[str, ClassPrior]:
    """{kind: prior} of the source priors the config names (presets or JSON files): ``source_pixel_prior`` and
    ``source_image_prior`` for their kinds, ``source_prior`` for whichever kind it is. Naming a kind twice, or
    a prior of the wrong kind, is a :class:`PriorError` naming the settings."""
    named: dict[str, ClassPrior] = {}
    for kind, spec in (("pixel", prior_cfg.source_pixel_prior), ("image", prior_cfg.source_image_prior)):
        if spec:
            prior = load_prior(spec, class_set)
            if prior.kind != kind:
                article = "an" if kind == "image" else "a"
                raise PriorError(f"prior.source_{kind}_prior {spec!r} is a {prior.kind} prior; "
                                 f"prior.source_{kind}_prior takes {article} {kind} prior")
            named[kind] = prior
    if prior_cfg.source_prior:
        prior = load_prior(prior_cfg.source_prior, class_set)
        if prior.kind in named:
            raise PriorError(f"prior.source_prior {prior_cfg.source_prior!r} is a {prior.kind} prior, and "
                             f"prior.source_{prior.kind}_prior names one too; set only one of them")
        named[prior.kind] = prior
    return named


def source_priors(cfg: ExperimentConfig) -> SourcePriors:
    """The source prior of each kind: the one the config names (:func:`named_source_priors`), else the exact
    statistics of the source split's labels (counted only when a kind is left unnamed). A published pixel
    preset thus never stands in for the image prior, nor an image preset for the pixel prior (the ``reference``
    rule's thresholds, EM's source prior)."""
    class_set = class_set_of(cfg)
    named = named_source_priors(cfg.prior, class_set)
    if len(named) < len(PRIOR_KINDS):
        stats = label_statistics_of(build_split(cfg, "source", train=False), class_set.names, cfg.data.num_workers)
        meta = {"dataset": cfg.data.source.kind, "root": cfg.data.source.root,
                "split": cfg.data.source.split or cfg.data.source.list_file}
        counted = {"pixel": stats.pixel_prior(**meta), "image": stats.image_prior(**meta)}
        named = {**counted, **named}
    return SourcePriors(named["pixel"], named["image"])


def refine_priors(cfg: ExperimentConfig, target_prior: str | None = None,
                  source_prior: str | None = None) -> tuple[ClassPrior, ClassPrior]:
    """(source, target) priors for Classifier Refinement outside the job: ``target_prior`` (a preset or JSON
    file; default ``prior.target_prior``) and ``source_prior`` (default: the source prior of the target's kind,
    :func:`source_priors`). Raises :class:`PriorError` when no target prior is given or the kinds differ."""
    class_set = class_set_of(cfg)
    target_spec = target_prior or cfg.prior.target_prior
    if not target_spec:
        raise PriorError("Classifier Refinement needs a target prior: pass one (a preset name, or the JSON file "
                         "`labelshift estimate-prior` writes) or set prior.target_prior")
    target = load_prior(target_spec, class_set)
    source = load_prior(source_prior, class_set) if source_prior else source_priors(cfg).of_kind(target.kind)
    if source.kind != target.kind:
        raise PriorError(f"the source prior {source.describe()} and the target prior {target.describe()} are of "
                         "different kinds; CR pairs two pixel priors or two image priors")
    return source, target


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
    prior_cfg = cfg.prior
    amp = amp_dtype_of(cfg, device)
    setup = prepare_estimators(cfg, methods, lambda: sample_pixels(
        model, loader("source_val"), device=device, pixels_per_image=CALIBRATION_PIXELS_PER_IMAGE,
        seed=prior_cfg.seed, amp_dtype=amp))
    estimators = setup.estimators
    oracle: LabelStatistics | None = LabelStatistics(class_set_of(cfg).names) if with_oracle else None
    target_batches = loader("target", with_labels=with_oracle, max_images=prior_cfg.max_images)
    for logits, labels, names in iterate_predictions(model, target_batches, device=device, at_label_size=False,
                                                     amp_dtype=amp):
        update_estimators(estimators, logits, setup.calibration, names)
        if labels is None:
            oracle = None
        elif oracle is not None:
            oracle.update(labels)
    provenance = estimation_provenance(cfg, checkpoint, checkpoint_hash, setup.calibration)
    return PriorEstimation(setup.source, setup.calibration, setup.results(provenance), oracle)


CALIBRATION_PIXELS_PER_IMAGE = 2000  # labelled source-val pixels per image the calibration is fitted on


@dataclass
class EstimatorSetup:
    """What a target pass starts from: the source priors (with the prior of the calibrated posteriors), the
    calibration, the estimators' inputs and the estimators every shard merges into (the source sample fed)."""

    source: SourcePriors
    calibration: Calibration
    inputs: EstimatorInputs
    estimators: dict[str, PriorEstimator]
    ensembles: tuple[str, ...] = ()  # requested ensembles, combined from the estimators' results

    def results(self, provenance: dict) -> dict[str, ClassPrior]:
        """Every estimator's result and the requested ensembles, with ``provenance`` added."""
        return estimator_results(self.estimators, provenance, ensembles=self.ensembles, source=self.source)


def prepare_estimators(cfg: ExperimentConfig, methods: tuple[str, ...],
                       sample_source_val: Callable[[], LabelledSample]) -> EstimatorSetup:
    """Source priors, the calibration (and its presence model) fitted on ``sample_source_val()`` (drawn only
    when a method needs source val) and fresh estimators of ``methods`` fed its pixel sample."""
    class_names = class_set_of(cfg).names
    prior_cfg = cfg.prior
    source = source_priors(cfg)
    if needs_source_validation(methods, prior_cfg.calibration):
        sample = sample_source_val()
        sample_logits, sample_labels = sample.logits, sample.labels
        calibration = fit_calibration(sample_logits, sample_labels, method=prior_cfg.calibration,
                                      training_prior=source.pixel)
        calibration.presence = presence_model_of(sample)
    else:
        calibration = Calibration.identity(len(class_names))
        sample_logits, sample_labels = torch.zeros(0, len(class_names)), torch.zeros(0, dtype=torch.long)
    source = replace(source, calibrated=calibrated_source_prior(calibration, sample_labels, source.pixel))
    inputs = EstimatorInputs(source.pixel, source.calibrated, prior_cfg.em_sample_pixels,
                             prior_cfg.presence_threshold)
    estimators = shard_estimators(cfg, methods, inputs)
    feed_source_sample(estimators, calibration, sample_logits, sample_labels)
    return EstimatorSetup(source, calibration, inputs, estimators, ensembles_of(methods))


def presence_model_of(sample: LabelledSample) -> PresenceModel | None:
    """The presence model fitted on the sample's images (None, with a warning, when they cannot fit one: no
    class both present and absent)."""
    try:
        return fit_presence_model(sample.presence_features, sample.presence)
    except ValueError as error:
        warnings.warn(f"no presence model for adjust.local.presence: {error}", stacklevel=2)
        return None


def shard_estimators(cfg: ExperimentConfig, methods: tuple[str, ...],
                     inputs: EstimatorInputs) -> dict[str, PriorEstimator]:
    """Fresh estimators of ``methods`` with the config's bootstrap and seed (one shard of a pass)."""
    return make_estimators(methods, class_set_of(cfg).names, inputs, bootstrap=cfg.prior.bootstrap,
                           seed=cfg.prior.seed)


def estimation_provenance(cfg: ExperimentConfig, checkpoint: str | Path, checkpoint_hash: str | None,
                          calibration: Calibration) -> dict:
    """What every estimate records: the checkpoint (path, sha256), the target dataset and split, the calibration."""
    target = cfg.data.target
    return {"checkpoint": str(checkpoint), "checkpoint_sha256": checkpoint_hash or checkpoint_sha256(checkpoint),
            "dataset": target.kind, "root": target.root, "split": target.split or target.list_file,
            "calibration": calibration.to_dict()}
