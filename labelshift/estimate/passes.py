"""The estimate pass: source statistics, calibration on a labelled source split, and every estimator fed from
one forward pass over the target, batch by batch.

Callers own the loop (one process, a Ray Data actor, a Tune trial, a Serve replica)::

    estimators = make_estimators(methods, class_names, inputs, bootstrap=20, seed=0)
    feed_source_sample(estimators, calibration, source_logits, source_labels)   # bbse's confusion
    for logits, names in batches:                                   # (B, K, H, W) raw logits, (B,) image names
        update_estimators(estimators, logits, calibration, names)
    merge_estimators(estimators, other_shard)                                    # shards, in a fixed order
    priors = estimator_results(estimators)
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import torch

from labelshift.calibrate import Calibration
from labelshift.estimate.base import EstimatorInputs, PriorEstimator
from labelshift.estimate.ensemble import ensemble_prior, member_methods
from labelshift.estimate.registry import estimator_class, make_estimator
from labelshift.priors import ClassPrior, LabelStatistics, SourcePriors, prior_kl, prior_l1


def label_statistics(loader: Iterable[dict], class_names: tuple[str, ...]) -> LabelStatistics:
    """Exact per-class pixel and image counts of a labelled loader's label maps."""
    statistics = LabelStatistics(class_names)
    for batch in loader:
        statistics.update(batch["label"])
    return statistics


def label_statistics_of(dataset, class_names: tuple[str, ...], num_workers: int = 0) -> LabelStatistics:
    """Exact class counts of a labelled dataset, from its label files alone (no image is decoded)."""
    from labelshift.data.io import LabelMaps

    loader = torch.utils.data.DataLoader(LabelMaps(dataset), batch_size=1, num_workers=num_workers)
    return label_statistics(loader, class_names)


def calibrated_source_prior(calibration: Calibration, sample_labels: torch.Tensor,
                            source_pixel_prior: ClassPrior) -> ClassPrior:
    """The prior under which the calibrated posteriors softmax(z/T + b) hold.

    BCTS fits its bias on the source-validation sample, so it absorbs that sample's class mix: the posteriors
    then hold under the sample's label histogram. Plain temperature scaling and anchored BCTS (whose fit
    removes that mix, ``labelshift.calibrate``) keep the training prior.
    """
    if calibration.method != "bcts":
        return source_pixel_prior
    counts = torch.bincount(sample_labels.long(), minlength=source_pixel_prior.num_classes).numpy()
    return ClassPrior.from_counts(source_pixel_prior.classes, counts, "pixel", {
        "estimator": "label_pixel_counts", "split": "source_val calibration sample",
        "note": "class mix of the pixels BCTS was fitted on: the prior of the calibrated posteriors"})


def needs_source_validation(methods: Iterable[str], calibration_method: str) -> bool:
    """Whether a labelled source-validation split is needed: a method that needs source labels, or a
    calibration for a method fed calibrated posteriors."""
    classes = [estimator_class(method) for method in member_methods(tuple(methods))]
    return any(cls.needs_source_labels for cls in classes) or (
        calibration_method != "none" and any(cls.posteriors == "calibrated" for cls in classes))


def make_estimators(methods: Iterable[str], class_names: tuple[str, ...], inputs: EstimatorInputs, *,
                    bootstrap: int, seed: int) -> dict[str, PriorEstimator]:
    """A fresh estimator per method (in the given order; an ensemble gives its members), each with the
    arguments it takes from ``inputs``."""
    return {method: make_estimator(method, class_names, bootstrap=bootstrap, seed=seed,
                                   **estimator_class(method).arguments(inputs))
            for method in member_methods(tuple(methods))}


def feed_source_sample(estimators: Mapping[str, PriorEstimator], calibration: Calibration,
                       logits: torch.Tensor, labels: torch.Tensor) -> None:
    """Give the labelled source sample (logits (N, K), labels (N,)) to the estimators that need one, with the
    same posterior transform (the calibration) as the target."""
    needing = [e for e in estimators.values() if e.needs_source_labels]
    if needing:
        probs = calibration.apply(logits).softmax(1)
        for estimator in needing:
            estimator.update_source(probs, labels)


def update_estimators(estimators: Mapping[str, PriorEstimator], logits: torch.Tensor,
                      calibration: Calibration, names: Sequence[str] | None = None) -> None:
    """Feed one batch of raw logits (B, K, H, W) to every estimator: the raw softmax to those fed raw
    posteriors (the reference rule, presence), the calibrated softmax to the others. ``names`` (B,): the
    images' names, which key their random draws (EM's pixels, the bootstrap): pass them whenever the pass may
    be sharded."""
    posteriors: dict[str, torch.Tensor] = {}
    for estimator in estimators.values():
        if estimator.posteriors not in posteriors:
            adjusted = logits if estimator.posteriors == "raw" else calibration.apply(logits)
            posteriors[estimator.posteriors] = adjusted.softmax(1)
        estimator.update(posteriors[estimator.posteriors], names=names)


def expect_pixels(estimators: Mapping[str, PriorEstimator], total_pixels: int) -> None:
    """Tell the estimators of one shard how many pixels the whole pass feeds, so that they keep only what the
    merged estimate can use (EM's sample: a bounded share of its keys)."""
    for estimator in estimators.values():
        estimator.expect_pixels(total_pixels)


def merge_estimators(into: Mapping[str, PriorEstimator], other: Mapping[str, PriorEstimator]) -> None:
    """Add shard ``other``'s state to ``into`` (same methods); merge shards in a fixed order."""
    if list(into) != list(other):
        raise ValueError(f"cannot merge estimators of methods {list(other)} into {list(into)}")
    for method, estimator in into.items():
        estimator.merge(other[method])


def estimator_results(estimators: Mapping[str, PriorEstimator], provenance: Mapping[str, object] | None = None,
                      *, ensembles: Iterable[str] = (), source: SourcePriors | None = None) -> dict[str, ClassPrior]:
    """{method: ClassPrior} with ``provenance`` (checkpoint, dataset, split, calibration, ...) added, then the
    requested ``ensembles`` combined from those results (they need the ``source`` priors)."""
    results = {method: estimator.result().with_provenance(**(provenance or {}))
               for method, estimator in estimators.items()}
    for name in dict.fromkeys(ensembles):
        if source is None:
            raise ValueError(f"the ensemble {name!r} needs the source priors (source=)")
        results[name] = ensemble_prior(name, results, source)
    return results


def prior_errors(estimates: Mapping[str, ClassPrior], oracle_pixel: ClassPrior, oracle_image: ClassPrior,
                 source: SourcePriors) -> dict[str, float]:
    """L1 and KL of each estimate against the oracle of the same kind, and of the no-adjustment baseline."""
    from labelshift.artifacts import prior_error_key

    errors = {prior_error_key("no_adjust_pixel", "l1"): prior_l1(source.pixel, oracle_pixel),
              prior_error_key("no_adjust_image", "l1"): prior_l1(source.image, oracle_image)}
    for method, estimate in estimates.items():
        oracle = oracle_pixel if estimate.kind == "pixel" else oracle_image
        errors[prior_error_key(method, "l1")] = prior_l1(estimate, oracle)
        errors[prior_error_key(method, "kl")] = prior_kl(oracle, estimate)
    return errors
