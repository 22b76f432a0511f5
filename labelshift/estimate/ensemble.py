"""Ensembles: a target prior combined from other estimators' results (no estimator of its own).

An ensemble averages its members' IA shifts in log space, each against the source prior of its member's kind
(as IA applies them), and returns the pixel prior with that shift:

    log π_ens = log π_s^pixel + mean_e (log π̂_e − log π_s^(kind of e)) + const.

Why (issue 15, ``docs/per_image_priors.md``): the members err on different classes (EM on classes the
calibration sample barely holds, the reference rule and soft counts by their own biases), so the averaged shift
is the one that held across world seeds where no single estimator did.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from labelshift.priors import ClassPrior, SourcePriors, floor_probabilities

ENSEMBLES: dict[str, tuple[str, ...]] = {"ensemble": ("em", "reference", "soft_count")}
MEMBER_OWN = ("estimator", "confidence_interval", "notes")  # provenance of one member, not of the ensemble


def member_methods(methods: Sequence[str]) -> tuple[str, ...]:
    """``methods`` with each ensemble replaced by its members (first occurrence kept, order kept)."""
    expanded: list[str] = []
    for method in methods:
        expanded += ENSEMBLES.get(method, (method,))
    return tuple(dict.fromkeys(expanded))


def ensembles_of(methods: Sequence[str]) -> tuple[str, ...]:
    """The ensembles among ``methods`` (order kept)."""
    return tuple(dict.fromkeys(method for method in methods if method in ENSEMBLES))


def shifted_prior(estimates: Sequence[ClassPrior], weights: Sequence[float], source: SourcePriors) -> ClassPrior:
    """The pixel prior whose IA shift is Σ_e w_e·(log π̂_e − log π_s^(kind of e)) (``weights`` summing to 1)."""
    shift = sum(weight * (np.log(floor_probabilities(estimate.probs, warn=False))
                          - np.log(source.of_kind(estimate.kind).probs))
                for estimate, weight in zip(estimates, weights, strict=True))
    log_probs = np.log(source.pixel.probs) + shift
    probs = np.exp(log_probs - log_probs.max())
    return ClassPrior(source.pixel.classes, probs / probs.sum(), "pixel")


def ensemble_prior(name: str, results: Mapping[str, ClassPrior], source: SourcePriors) -> ClassPrior:
    """The pixel prior of ensemble ``name`` from its members' ``results`` and the ``source`` priors."""
    members = ENSEMBLES[name]
    shared = {key: value for key, value in results[members[0]].provenance.items()  # checkpoint, data, images, ...
              if key not in MEMBER_OWN and all(results[m].provenance.get(key) == value for m in members[1:])}
    provenance = {**shared, "estimator": name, "members": list(members),
                  "member_provenance": {member: results[member].provenance for member in members},
                  "notes": "members' IA shifts (log estimate - log source prior of its kind) averaged, applied "
                           "to the source pixel prior"}
    combined = shifted_prior([results[member] for member in members], [1 / len(members)] * len(members), source)
    return ClassPrior(combined.classes, combined.probs, "pixel", None, provenance)
