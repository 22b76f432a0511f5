"""Counting, presence and the reference code's rule: estimates that are sums of per-image statistics."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from labelshift.classes import ClassSet
from labelshift.estimate.base import EstimatorInputs, UnitStatisticsEstimator, argmax_histograms, prior_vector
from labelshift.priors import ClassPrior


class CountEstimator(UnitStatisticsEstimator):
    """Classify and count: histogram of the argmax class -> pixel prior (``counts``: predicted pixels)."""

    method, kind = "count", "pixel"

    def _unit_statistics(self, units: torch.Tensor) -> np.ndarray:
        return argmax_histograms(units)


class SoftCountEstimator(UnitStatisticsEstimator):
    """Mean predicted probability per class -> pixel prior (``counts``: soft pixel mass)."""

    method, kind = "soft_count", "pixel"

    def _unit_statistics(self, units: torch.Tensor) -> np.ndarray:
        return torch.sum(units, dim=(2, 3), dtype=torch.float64).cpu().numpy()


class PresenceEstimator(UnitStatisticsEstimator):
    """Image prior: an image counts for class c when its predicted (argmax) pixel share of c exceeds ``threshold``."""

    method, kind, posteriors = "presence", "image", "raw"

    @classmethod
    def arguments(cls, inputs: EstimatorInputs) -> dict[str, Any]:
        return {"threshold": inputs.presence_threshold}

    def __init__(self, classes: ClassSet | Sequence[str], *, threshold: float = 0.001, **base: Any) -> None:
        super().__init__(classes, **base)
        self.threshold = float(threshold)

    def settings(self) -> dict[str, Any]:
        return {"threshold": self.threshold}

    def _unit_statistics(self, units: torch.Tensor) -> np.ndarray:
        shares = argmax_histograms(units) / float(units.shape[2] * units.shape[3])
        return (shares > self.threshold).astype(np.float64)


class ReferenceEstimator(UnitStatisticsEstimator):
    """The reference code's rule (``test_trainlabelfre.py``), bit-exact, quirks included.

    Per image and class c: ``log(sum(exp(prob_c)) / (H*W)) > thresholds[c]`` in float32 torch ops, where
    ``thresholds`` is the source PIXEL frequency ((K,) values, or a pixel ClassPrior: for presets the
    published values themselves). ``counts``: per-class image counts; an image prior.
    """

    method, kind, posteriors = "reference", "image", "raw"
    source_prior_argument = "thresholds"

    @classmethod
    def arguments(cls, inputs: EstimatorInputs) -> dict[str, Any]:
        return {"thresholds": inputs.source_pixel_prior}  # a published preset keeps its exact float32 values

    def __init__(self, classes: ClassSet | Sequence[str], *, thresholds: ClassPrior | Any, **base: Any) -> None:
        super().__init__(classes, **base)
        if thresholds is None:
            raise ValueError("the reference rule needs thresholds= (the source pixel frequencies, or a pixel prior)")
        if isinstance(thresholds, ClassPrior):
            if thresholds.kind != "pixel":
                raise ValueError("the reference rule compares with the source PIXEL frequency; "
                                 f"got a {thresholds.kind} prior ({thresholds.describe()})")
            values = thresholds.provenance.get("published_values", thresholds.probs)
            prior_vector(thresholds, self.class_names, "thresholds")
        else:
            values = thresholds.detach().cpu() if torch.is_tensor(thresholds) else thresholds
        self.thresholds = tuple(float(v) for v in np.asarray(values, dtype=np.float64))
        if len(self.thresholds) != self.num_classes:
            raise ValueError(f"thresholds must have {self.num_classes} values, got {len(self.thresholds)}")

    def settings(self) -> dict[str, Any]:
        return {"thresholds": list(self.thresholds)}

    def _unit_statistics(self, units: torch.Tensor) -> np.ndarray:
        probs = units.float()
        height, width = probs.shape[2:]
        log_mean_exp = torch.stack([
            torch.stack([torch.log(torch.sum(torch.exp(probs[image, c])) / (height * width))
                         for c in range(self.num_classes)])
            for image in range(probs.shape[0])]).cpu()
        # A float32 tensor compared with a Python float compares in float32: same as the reference's scalars.
        thresholds = torch.tensor(self.thresholds, dtype=torch.float64).to(torch.float32)
        return (log_mean_exp > thresholds).numpy().astype(np.float64)


