"""Named artifacts and metric keys, defined once: the estimate stage's prior index, the names of the priors and
of the IA transforms, and the keys under which evaluations and prior errors are reported (stage metrics,
MLflow, the results table, the benchmarks, ``labelshift compare``).

Prior names: ``source_pixel``, ``source_image``, ``source_calibrated``, ``estimate_<method>``, ``target`` (the
prior IA and CR use), ``oracle_pixel`` / ``oracle_image`` (target labels; measurement only).
Evaluation keys: ``<split>/<transform>`` (e.g. ``target_val/ia_estimate_em``) holding ``miou``,
``per_class_iou.<class>``, ...; flattened for MLflow as ``<split>/<transform>.<metric>``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

from labelshift.atomic import write_json_atomic
from labelshift.calibrate import Calibration
from labelshift.config.loading import flatten
from labelshift.priors import ClassPrior, SourcePriors

PRIOR_INDEX = "priors.json"
PRIOR_INDEX_VERSION = 1
CALIBRATION_FILE = "calibration.json"
CONFUSION_FILE = "confusion.json"  # an evaluation stage's confusion matrices: {evaluation key: (K, K) counts}
NO_ADJUST = "none"
ORACLE_IA = "ia_oracle"  # IA with the oracle of the configured target prior's kind (the ceiling)
LOCAL_IA = "ia_local_target"  # IA with per-image priors shrunk toward the target prior (adjust.mode: local)
TARGET = "target"
SOURCE_CALIBRATED = "source_calibrated"
TRAIN_LOSS = "train_loss"  # a training stage's loss curve on its MLflow run (labelshift.runners.train)


def source_prior_name(kind: str) -> str:
    """``source_pixel`` | ``source_image``."""
    return f"source_{kind}"


def estimate_name(method: str) -> str:
    """The artifact name of an estimator's estimate: ``estimate_<method>``."""
    return f"estimate_{method}"


def oracle_name(kind: str) -> str:
    """``oracle_pixel`` | ``oracle_image``."""
    return f"oracle_{kind}"


def ia_name(prior_name: str) -> str:
    """The name of IA towards the prior ``prior_name`` (``ia_target``, ``ia_estimate_em``, ...)."""
    return f"ia_{prior_name}"


def evaluation_key(split: str, transform: str) -> str:
    """The key of one evaluation in a stage's metrics: ``<split>/<transform>``."""
    return f"{split}/{transform}"


def metric_key(split: str, transform: str, metric: str) -> str:
    """The flat (MLflow) key of one number of an evaluation, e.g. ``target_val/none.miou``."""
    return f"{evaluation_key(split, transform)}.{metric}"


def per_class_iou_key(split: str, transform: str, class_name: str) -> str:
    """``<split>/<transform>.per_class_iou.<class>``."""
    return metric_key(split, transform, f"per_class_iou.{class_name}")


def prior_error_key(method: str, measure: str) -> str:
    """The key of a prior error: ``<method>_<measure>`` (measure ``l1`` | ``kl``; method ``no_adjust_pixel``
    / ``no_adjust_image`` for the source prior itself)."""
    return f"{method}_{measure}"


def results_key(row: str, column: str) -> str:
    """The key of one cell of the job's results table on its parent run: ``results/<row>.<column>`` (row e.g.
    ``ia_estimate``, column e.g. ``target_val_miou``)."""
    return f"results/{row}.{column}"


def flat_numbers(metrics: Mapping) -> dict[str, float]:
    """Nested stage metrics as flat ``a.b.c`` keys of numbers (what MLflow receives); spaces become ``_``."""
    return {name.replace(" ", "_"): value for name, value in flatten(dict(metrics)).items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)}


@dataclass(frozen=True)
class PriorEntry:
    """One prior of the index: its name, kind, file (relative to the index), the estimator that produced it
    and the calibration its posteriors went through (None: raw softmax, or not an estimate)."""

    name: str
    kind: str
    file: str
    estimator: str | None
    calibration: str | None


def entry_of(name: str, prior: ClassPrior) -> PriorEntry:
    """The index entry of ``prior`` saved as ``<name>.json``."""
    calibration = prior.provenance.get("calibration")
    method = calibration.get("method") if isinstance(calibration, Mapping) else None
    return PriorEntry(name, prior.kind, f"{name}.json", prior.provenance.get("estimator"), method)


def write_priors(directory: str | Path, priors: Mapping[str, ClassPrior]) -> list[str]:
    """Save each prior as ``<name>.json`` and the index ``priors.json``; returns the files written (relative)."""
    directory = Path(directory)
    entries = []
    for name, prior in priors.items():
        entry = entry_of(name, prior)
        prior.to_json(directory / entry.file)
        entries.append(entry)
    write_json_atomic(directory / PRIOR_INDEX, {"version": PRIOR_INDEX_VERSION,
                                                "priors": [entry.__dict__ for entry in entries]})
    return [entry.file for entry in entries] + [PRIOR_INDEX]


def read_prior_index(directory: str | Path) -> list[PriorEntry]:
    """The entries of ``<directory>/priors.json``."""
    path = Path(directory) / PRIOR_INDEX
    index = json.loads(path.read_text())
    if index.get("version") != PRIOR_INDEX_VERSION:
        raise ValueError(f"{path}: prior index version {index.get('version')!r}, expected {PRIOR_INDEX_VERSION}")
    return [PriorEntry(**entry) for entry in index["priors"]]


def read_priors(directory: str | Path, names: Iterable[str] | None = None) -> dict[str, ClassPrior]:
    """{name: ClassPrior} of the index (all, or ``names`` in the index's order)."""
    wanted = None if names is None else set(names)
    return {entry.name: ClassPrior.from_json(Path(directory) / entry.file)
            for entry in read_prior_index(directory) if wanted is None or entry.name in wanted}


def source_priors_from(priors: Mapping[str, ClassPrior]) -> SourcePriors:
    """The source priors among the priors an estimate stage wrote (``read_priors``)."""
    return SourcePriors(priors[source_prior_name("pixel")], priors[source_prior_name("image")],
                        priors.get(SOURCE_CALIBRATED))


def read_calibration(directory: str | Path) -> Calibration:
    """The calibration an estimate stage wrote (``calibration.json``)."""
    return Calibration.from_dict(json.loads((Path(directory) / CALIBRATION_FILE).read_text()))
