"""The library side of an Inference Adjustment sweep: what a trial gets and how it scores one setting.

A trial receives :class:`IASweepInputs` (the dumped experiment config, every prior of the estimate stage, the
calibration, the selection split's :class:`~labelshift.logit_cache.LogitCache` and the label-free reference
posterior) and a setting ``{config path: value}``; :func:`score_setting` applies the setting to the config,
builds the IA transform with the library's one factory (:func:`labelshift.adjust.ia_transform`) and scores it
on the cache: the labelled selection mIoU and every label-free objective (:mod:`labelshift.selection`).
The network never runs in a trial. After the trials, :func:`choose_setting` turns them into the choice (the
``sweep.selection`` rule: top trial, guarded by a paired bootstrap against a fallback setting). Ray Tune glue:
:mod:`labelshift.runners.tune`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from labelshift.adjust import ia_transform
from labelshift.artifacts import estimate_name, read_calibration, read_priors, source_prior_name, source_priors_from
from labelshift.calibrate import Calibration
from labelshift.config import ExperimentConfig, config_from_dict
from labelshift.logit_cache import LogitCache, LogitTransform
from labelshift.priors import ClassPrior, SourcePriors, load_prior
from labelshift.selection import (LabelFreeScores, ReferencePosterior, best_index, paired_bootstrap_wins,
                                  reference_posterior)
from labelshift.config.sweep import LABEL_FREE_OBJECTIVES, PAPER_IA_SETTING, SELECT_METRIC, SelectionRule, with_setting

LABEL_FREE_PREFIX = "label_free_"  # trial metric keys of the label-free objectives: label_free_<objective>
SKIPPED_METRIC = "skipped"  # 1.0 for a setting the library cannot apply (every score NaN: never chosen), else 0.0
REFERENCE_SETTING: dict[str, Any] = PAPER_IA_SETTING  # T = τ = 1 with the reference estimator


@dataclass
class EstimateOutputs:
    """What the estimate stage wrote: every prior by name (its ``priors.json`` index) and the calibration."""

    priors: dict[str, ClassPrior]
    calibration: Calibration

    @classmethod
    def read(cls, directory: str | Path) -> "EstimateOutputs":
        directory = Path(directory)
        return cls(read_priors(directory), read_calibration(directory))

    def source(self) -> SourcePriors:
        return source_priors_from(self.priors)

    def target(self, cfg: ExperimentConfig) -> ClassPrior:
        """The target prior a config asks for: ``prior.target_prior`` (a preset or file) when set, else the
        estimate of ``prior.method`` (the estimate stage's rule for the ``target`` prior)."""
        if cfg.prior.target_prior:
            return load_prior(cfg.prior.target_prior, self.priors[source_prior_name("pixel")].classes)
        name = estimate_name(cfg.prior.method)
        if name not in self.priors:
            raise ValueError(f"the estimate stage wrote no {name!r} prior (it has {sorted(self.priors)}): re-run "
                             "the estimate stage with this version")
        return self.priors[name]


@dataclass
class IASweepInputs:
    """Everything a trial reads (shared with every trial once, through Ray's object store)."""

    config: dict  # the experiment config, dumped (a setting's paths are set on a copy)
    estimates: EstimateOutputs
    cache: LogitCache  # the selection split (labelled)
    reference: ReferencePosterior | None  # for the label-free objectives (None: not computed)


def build_inputs(cfg: ExperimentConfig, estimates: EstimateOutputs, cache: LogitCache,
                 label_free: bool = True) -> IASweepInputs:
    """The trial inputs; the reference posterior uses the ``em`` estimate and the calibrated source prior."""
    reference = None
    if label_free:
        source = estimates.source()
        calibrated = source.calibrated if source.calibrated is not None else source.pixel
        reference = reference_posterior(cache, estimates.calibration, calibrated.probs,
                                        estimates.priors[estimate_name("em")].probs)
    return IASweepInputs(cfg.model_dump(mode="json"), estimates, cache, reference)


def setting_config(inputs: IASweepInputs, setting: dict[str, Any]) -> ExperimentConfig:
    """The experiment config of a setting (validated)."""
    return config_from_dict(with_setting(inputs.config, setting), "<sweep setting>")


def transform_of(inputs: IASweepInputs, setting: dict[str, Any]) -> tuple[LogitTransform, ClassPrior]:
    """The IA transform of a setting (the library's factory: a per-image :class:`~labelshift.adjust.LocalIA`
    when ``adjust.mode`` is ``local``) and its target prior."""
    cfg = setting_config(inputs, setting)
    target = inputs.estimates.target(cfg)
    source = inputs.estimates.source()
    return ia_transform(cfg.adjust, source, target, inputs.estimates.calibration), target


def skip_reason(inputs: IASweepInputs, setting: dict[str, Any]) -> str | None:
    """Why a grid combination cannot be applied, or None: per-image priors (``adjust.mode: local``) shrink toward
    a PIXEL prior, so a grid crossing ``adjust.mode`` with image-prior estimators (``reference``, ``presence``)
    holds combinations that are skipped, not errors."""
    cfg = setting_config(inputs, setting)
    target = inputs.estimates.target(cfg)
    if cfg.adjust.mode == "local" and target.kind != "pixel":
        return f"adjust.mode local needs a pixel target prior; {cfg.prior.method} gives a {target.kind} prior"
    return None


def score_setting(inputs: IASweepInputs, setting: dict[str, Any], cache: LogitCache | None = None,
                  label_free: bool = True) -> dict[str, float]:
    """``select_miou`` (percent; or the mIoU on ``cache`` when given, e.g. target val), pixel accuracy and, with
    ``label_free`` and a reference posterior, ``label_free_<objective>`` for every objective; ``skipped`` 1.0
    with every score NaN for a combination :func:`skip_reason` refuses."""
    if skip_reason(inputs, setting) is not None:
        objectives = LABEL_FREE_OBJECTIVES if label_free and inputs.reference else ()
        names = (SELECT_METRIC, "pixel_accuracy", *(LABEL_FREE_PREFIX + name for name in objectives))
        return {**dict.fromkeys(names, float("nan")), SKIPPED_METRIC: 1.0}
    transform, target = transform_of(inputs, setting)
    cache = cache or inputs.cache
    scores = LabelFreeScores(inputs.reference, target.probs) if label_free and inputs.reference else None
    matrix = cache.empty_matrix()
    for index in range(len(cache)):
        adjusted = transform(cache.low_res(index)[None])[0]
        cache.add_image(matrix, adjusted, index)
        if scores is not None:
            scores.add(index, adjusted)
    confusion = cache.as_confusion(matrix)
    metrics = {SELECT_METRIC: 100.0 * confusion.miou(), "pixel_accuracy": 100.0 * confusion.pixel_accuracy(),
               SKIPPED_METRIC: 0.0}
    if scores is not None:
        metrics.update({LABEL_FREE_PREFIX + name: value for name, value in scores.result().items()})
    return metrics


def per_image_confusions(inputs: IASweepInputs, setting: dict[str, Any]) -> np.ndarray:
    """(N, K, K) int64 confusion [true, predicted] of each selection image under ``setting`` (for the bootstrap
    of the guarded choice)."""
    transform, _ = transform_of(inputs, setting)
    cache = inputs.cache
    matrices = []
    for index in range(len(cache)):
        matrix = cache.empty_matrix()
        cache.add_image(matrix, transform(cache.low_res(index)[None])[0], index)
        matrices.append(matrix.T.numpy())
    return np.stack(matrices)


def ranking_score(metrics: dict[str, float], rule: SelectionRule, label_free_objective: str) -> float:
    """What ``rule`` ranks trials by: the selection mIoU, or (``combined``) its mean with the label-free
    objective (both mIoU in percent)."""
    if rule.objective == "labelled":
        return metrics[SELECT_METRIC]
    return 0.5 * (metrics[SELECT_METRIC] + metrics[LABEL_FREE_PREFIX + label_free_objective])


def choose_setting(inputs: IASweepInputs, records: list[dict], rule: SelectionRule, label_free_objective: str,
                   seed: int = 0) -> dict[str, Any]:
    """The setting an IA sweep chooses from its trials (``{"trial", "setting", "metrics"}`` records): the top
    trial by :func:`ranking_score`, kept only when it beats ``rule.fallback`` on at least ``rule.guard_level`` of
    the paired bootstrap resamples of the selection images; else the fallback. Returns ``{"setting",
    "select_miou", "top": {...}, "guard": {...}}``."""
    top = records[best_index([ranking_score(r["metrics"], rule, label_free_objective) for r in records])]
    fallback = dict(rule.fallback)
    guard: dict[str, Any] = {"level": rule.guard_level, "fallback": fallback, "bootstrap": rule.bootstrap}
    kept = True
    if rule.guard_level > 0:
        wins = paired_bootstrap_wins(per_image_confusions(inputs, top["setting"]),
                                     per_image_confusions(inputs, fallback), rule.bootstrap, seed)
        kept = wins >= rule.guard_level
        guard["top_beats_fallback"] = wins
    guard["kept_top"] = kept
    setting = top["setting"] if kept else fallback
    select = (top["metrics"] if kept else score_setting(inputs, fallback, label_free=False))[SELECT_METRIC]
    return {"setting": setting, "select_miou": select, "guard": guard,
            "top": {"trial": top["trial"], "setting": top["setting"], "select_miou": top["metrics"][SELECT_METRIC],
                    "objective": rule.objective}}


def record_index_of(inputs: IASweepInputs, records: list[dict], setting: dict[str, Any]) -> int | None:
    """The index of the trial whose setting configures the experiment as ``setting`` does (None: no trial ran
    it, e.g. a fallback outside the grid)."""
    wanted = with_setting(inputs.config, setting)
    return next((index for index, record in enumerate(records)
                 if with_setting(inputs.config, record["setting"]) == wanted), None)
