"""Calibration of logits on a labelled source split: temperature scaling and BCTS.

BCTS (bias-corrected temperature scaling, Alexandari et al. ICML 2020) fits ``z / T + b``; plain
temperature scaling fits ``z / T`` (b = 0). All methods minimise the NLL with torch LBFGS in float64.

BCTS's bias absorbs the class mix of the calibration sample, so its posteriors hold under that sample's label
histogram, which for a class seen in a handful of source-val images is a poor estimate (the across-worlds
failure of issue 15: 17 bicycle pixels on one world). ``bcts_anchored`` splits the bias into the part it knows,
``log π_sample − log π_train`` (the sample's histogram against the source training prior), and the model's own
per-class miscalibration ``d``, fitted with a ridge penalty ``ridge/2·|d|²`` (a N(0, 1) prior on each d_c over
~1/ridge effective pixels): ``apply(z) = z/T + d``, whose posteriors hold under the training prior, with d → 0
for the classes the sample barely holds.

IA must then be applied in the same calibrated space: ``z/T + b − log π_s + log π_t``. Because
``z/T + b − log π_s = z/T − log(π_s·e^{−b})``, :meth:`Calibration.effective_source_prior` gives the
prior to pass to :func:`~labelshift.adjust.adjust_logits` together with ``temperature=cal.temperature``
(exact for ``tau_source=1``; otherwise adjust ``cal.apply(z)`` with the plain source prior). Prior
estimators that take calibrated probabilities ``softmax(cal.apply(z))`` (EM) need the plain π_s.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from labelshift.classes import IGNORE_INDEX
from labelshift.image_presence import PresenceModel
from labelshift.priors import ClassPrior, floor_probabilities

CalibrationMethod = Literal["none", "temperature", "bcts", "bcts_anchored"]
CALIBRATION_METHODS = ("none", "temperature", "bcts", "bcts_anchored")
ANCHORED_RIDGE = 1e-4  # bcts_anchored's ridge on d: fixed a priori (N(0, 1) per class, ~10⁴ effective pixels)


@dataclass
class Calibration:
    """``apply(z) = z / temperature + bias``; ``bias`` (K,) float64 (zeros for plain temperature scaling)."""

    temperature: float
    bias: np.ndarray
    method: str = "temperature"
    metrics: dict[str, Any] = field(default_factory=dict)  # nll_before, nll_after, num_samples
    # per-image class presence (labelshift.image_presence), fitted on the same source-val images; for
    # adjust.local.presence
    presence: PresenceModel | None = None

    def __post_init__(self) -> None:
        self.temperature = float(self.temperature)
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be positive and finite, got {self.temperature}")
        self.bias = np.asarray(self.bias, dtype=np.float64)
        if self.bias.ndim != 1:
            raise ValueError(f"bias must be a (K,) vector, got shape {self.bias.shape}")

    @classmethod
    def identity(cls, num_classes: int) -> Calibration:
        return cls(1.0, np.zeros(num_classes), method="none")

    @property
    def num_classes(self) -> int:
        return len(self.bias)

    def apply(self, logits: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """logits (…, K, …) with classes along ``dim`` -> ``logits / T + b`` (same shape, dtype, device)."""
        axis = dim % logits.ndim
        if logits.shape[axis] != self.num_classes:
            raise ValueError(f"calibration has {self.num_classes} classes, logits have {logits.shape[axis]}")
        view = [1] * logits.ndim
        view[axis] = self.num_classes
        bias = torch.from_numpy(self.bias).to(device=logits.device, dtype=logits.dtype).view(view)
        scaled = logits if self.temperature == 1.0 else logits / self.temperature
        return scaled + bias

    def effective_source_prior(self, source_prior: ClassPrior | Any) -> ClassPrior | np.ndarray:
        """π_s·exp(−b), normalised: ``adjust_logits(z, this, π_t, temperature=T)`` equals IA on ``apply(z)``.

        Only for adjusting RAW logits ``z``. Estimators fed calibrated probabilities ``softmax(apply(z))``
        (EM) take the plain source prior π_s: those posteriors are calibrated under π_s itself.

        A ClassPrior gives a ClassPrior (same classes and kind, provenance noting the calibration);
        a (K,) vector gives a (K,) float64 array.
        """
        probs = source_prior.probs if isinstance(source_prior, ClassPrior) else floor_probabilities(source_prior)
        if probs.shape != self.bias.shape:
            raise ValueError(f"source prior has {probs.shape[0]} classes, calibration {self.num_classes}")
        log_weights = np.log(probs) - self.bias
        effective = np.exp(log_weights - log_weights.max())
        effective /= effective.sum()
        if not isinstance(source_prior, ClassPrior):
            return effective
        provenance = {
            "estimator": "calibrated_source_prior", "base_prior": source_prior.describe(),
            "base_provenance": source_prior.provenance, "calibration": self.to_dict(),
            "notes": "pi_s * exp(-bias), normalised: the source prior in the calibrated logit space",
        }
        return ClassPrior(source_prior.classes, effective, source_prior.kind, None, provenance)

    def to_dict(self) -> dict[str, Any]:
        document = {"method": self.method, "temperature": self.temperature, "bias": self.bias.tolist(),
                    "metrics": dict(self.metrics)}
        if self.presence is not None:
            document["presence"] = self.presence.to_dict()
        return document

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibration:
        unknown = set(data) - {"method", "temperature", "bias", "metrics", "presence"}
        if unknown or "temperature" not in data or "bias" not in data:
            raise ValueError(f"not a calibration document (keys {sorted(data)})")
        presence = PresenceModel.from_dict(data["presence"]) if data.get("presence") else None
        return cls(data["temperature"], np.asarray(data["bias"], dtype=np.float64),
                   data.get("method", "temperature"), dict(data.get("metrics") or {}), presence)


def _flatten_labelled(logits: Any, labels: Any, dim: int, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) / (B, K, H, W) logits + (N,) / (B, H, W) labels -> valid (M, K) float64 logits, (M,) labels."""
    scores = logits.detach() if torch.is_tensor(logits) else torch.from_numpy(np.asarray(logits))
    targets = labels.detach() if torch.is_tensor(labels) else torch.from_numpy(np.asarray(labels))
    num_classes = scores.shape[dim]
    scores = scores.movedim(dim, -1).reshape(-1, num_classes).to(torch.float64)
    targets = targets.to(scores.device).reshape(-1).long()
    if len(targets) != len(scores):
        raise ValueError(f"{len(targets)} labels for {len(scores)} logit vectors")
    valid = targets != ignore_index
    scores, targets = scores[valid], targets[valid]
    if len(targets) == 0:
        raise ValueError("no labelled sample to fit a calibration on (all labels ignored)")
    if targets.min() < 0 or targets.max() >= num_classes:
        raise ValueError(f"labels must be 0..{num_classes - 1} or {ignore_index}")
    return scores, targets


def fit_calibration(logits: Any, labels: Any, method: CalibrationMethod = "bcts", *, dim: int = 1,
                    ignore_index: int = IGNORE_INDEX, max_iter: int = 200, max_samples: int | None = None,
                    seed: int = 0, training_prior: Any = None, ridge: float = ANCHORED_RIDGE) -> Calibration:
    """Fit temperature scaling, BCTS or anchored BCTS by minimising the NLL on labelled (source-validation) data.

    logits: (N, K) or (B, K, H, W) (classes along ``dim``), torch or numpy; labels: (N,) or (B, H, W).
    ``max_samples``: fit on a seeded uniform subset of the valid samples (pixels) of at most that size.
    ``method="none"`` returns the identity. The bias is centred (mean 0): softmax ignores a constant.
    ``training_prior`` (K,) (the source training pixel prior) and ``ridge``: ``bcts_anchored`` only.
    """
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"unknown calibration method {method!r}; known: {CALIBRATION_METHODS}")
    scores, targets = _flatten_labelled(logits, labels, dim, ignore_index)
    if max_samples is not None and len(targets) > max_samples:
        subset = torch.randperm(len(targets), generator=torch.Generator().manual_seed(seed))[:max_samples]
        subset = subset.to(scores.device)
        scores, targets = scores[subset], targets[subset]
    num_classes = scores.shape[1]
    nll_before = float(F.cross_entropy(scores, targets))
    if method == "none":
        return Calibration(1.0, np.zeros(num_classes), "none",
                           {"nll_before": nll_before, "nll_after": nll_before, "num_samples": len(targets)})
    fits_bias = method in ("bcts", "bcts_anchored")
    offset, penalty = torch.zeros(num_classes, dtype=torch.float64, device=scores.device), 0.0
    if method == "bcts_anchored":
        offset = _class_mix_offset(targets, training_prior, num_classes).to(scores.device)
        penalty = float(ridge)
    log_temperature = torch.zeros((), dtype=torch.float64, device=scores.device, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, device=scores.device, requires_grad=fits_bias)
    parameters = [log_temperature, bias] if fits_bias else [log_temperature]
    optimizer = torch.optim.LBFGS(parameters, lr=1.0, max_iter=max_iter, tolerance_grad=1e-10,
                                  tolerance_change=1e-14, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(scores * torch.exp(-log_temperature) + offset + bias, targets)
        loss = loss + penalty / 2 * (bias ** 2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        centred_bias = bias - bias.mean()
        temperature = float(torch.exp(log_temperature))
        nll_after = float(F.cross_entropy(scores / temperature + offset + centred_bias, targets))
    metrics = {"nll_before": nll_before, "nll_after": nll_after, "num_samples": len(targets)}
    if method == "bcts_anchored":
        metrics["ridge"] = penalty
    return Calibration(temperature, centred_bias.cpu().numpy(), method, metrics)


def _class_mix_offset(targets: torch.Tensor, training_prior: Any, num_classes: int) -> torch.Tensor:
    """(K,) log π_sample − log π_train: what BCTS's bias would absorb of the sample's class mix."""
    if training_prior is None:
        raise ValueError("bcts_anchored needs training_prior= (the source training pixel prior)")
    training = training_prior.probs if isinstance(training_prior, ClassPrior) else training_prior
    training = floor_probabilities(training, warn=False)
    if training.shape != (num_classes,):
        raise ValueError(f"training prior has {training.shape[0]} classes, logits {num_classes}")
    counts = torch.bincount(targets.cpu(), minlength=num_classes).double().numpy()
    sample = floor_probabilities(counts / counts.sum(), warn=False)
    return torch.from_numpy(np.log(sample) - np.log(training))
