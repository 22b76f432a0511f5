"""Whether a class is present in an image, from the model's own outputs: a small logistic model fitted on
labelled source-validation images (no target labels), used by ``adjust.mode: local`` to remove from an image's
prior the classes it predicts but most likely does not contain (issue 15, ``docs/per_image_priors.md``).

Why: IA with each image's own label prior gains +14 mIoU on the embedded world, and all of it comes from the
classes absent from an image (keeping the dataset prior for present classes and flooring the absent ones gives
the same ceiling). A per-image prior estimated from pixel counts keeps mass on the confusable classes the model
does predict there; this model tells those apart by how they are predicted.

Features of (image, class), on a grid of ``PRESENCE_GRID_PIXELS`` of the image's logits after raw global IA
toward the dataset prior at T = τ = 1 (``adjusted``, (N, K, M); the same whatever the IA's own settings, as the
model was fitted):
log(share of the grid the class wins + 1e-3), the class's mean probability over the pixels it wins (0 when it
wins none), log(the class's highest probability anywhere in the image + 1e-4). One standardised logistic
regression pooled over classes (3 weights and a bias, L2 ``ridge``), fitted by L-BFGS in float64 on the
source-val images' raw logits (the source's own prior: global IA toward it is the identity) against
"the class has at least one labelled pixel in the image".
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from labelshift.classes import IGNORE_INDEX

FEATURES = ("log_share", "mean_winner_probability", "log_max_probability")
PRESENCE_GRID_PIXELS = 4096  # grid pixels per image the features are read on (fit and use alike)
RIDGE = 1e-3  # L2 on the standardised weights: fixed a priori, not tuned
MISSING_MODEL = ("adjust.local.presence needs the presence model that the estimate stage (or estimate-prior) fits "
                 "on labelled source val with the calibration (calibration.json 'presence'); this calibration has "
                 "none (written without a source-val pass, e.g. prior.calibration: none, by a labelshift before "
                 "presence models, or the fit failed): re-run the estimate, or set adjust.local.presence: false")


def grid_pixels(tensor: torch.Tensor, max_pixels: int) -> torch.Tensor:
    """(N, K, H, W) -> (N, K, M): the pixels of a regular grid (stride s = ceil(sqrt(H·W / max_pixels)), offset
    s // 2), M ≤ ``max_pixels`` up to rounding. The same pixels for an image whatever its batch."""
    height, width = tensor.shape[-2:]
    stride = max(1, int(np.ceil(np.sqrt(height * width / max(int(max_pixels), 1)))))
    offset = stride // 2
    return tensor[:, :, offset::stride, offset::stride].flatten(2)


def presence_features(adjusted: torch.Tensor) -> torch.Tensor:
    """(N, K, M) logits (after global IA) of M grid pixels -> (N, K, 3) float64 features (``FEATURES``)."""
    probs = adjusted.to(torch.float64).softmax(1)
    winners = F.one_hot(probs.argmax(1), probs.shape[1]).permute(0, 2, 1).to(torch.float64)  # (N, K, M)
    won = winners.sum(2)
    share = won / probs.shape[2]
    winner_probability = (probs * winners).sum(2) / won.clamp_min(1.0)
    return torch.stack([torch.log(share + 1e-3), winner_probability,
                        torch.log(probs.amax(2) + 1e-4)], dim=-1)


def label_presence(labels: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """(N, H, W) labels -> (N, K) bool on the CPU: the class has at least one labelled pixel in the image."""
    rows = labels.reshape(labels.shape[0], -1).long().cpu()
    valid = rows != ignore_index
    if bool(((rows < 0) | (rows >= num_classes))[valid].any()):
        raise ValueError(f"labels outside 0..{num_classes - 1} (other than the ignore index {ignore_index})")
    counts = torch.zeros(rows.shape[0], num_classes, dtype=torch.int64)
    counts.scatter_add_(1, torch.where(valid, rows, 0), valid.long())
    return counts > 0


@dataclass
class PresenceModel:
    """P(class present in the image | features) = sigmoid(((x − mean) / scale)·weights + bias)."""

    mean: np.ndarray
    scale: np.ndarray
    weights: np.ndarray
    bias: float
    metrics: dict[str, Any] = field(default_factory=dict)  # images, pairs, present share, log loss

    def __post_init__(self) -> None:
        self.mean, self.scale, self.weights = (np.asarray(value, dtype=np.float64).reshape(len(FEATURES))
                                               for value in (self.mean, self.scale, self.weights))
        self.bias = float(self.bias)

    def probability(self, features: torch.Tensor) -> torch.Tensor:
        """(..., 3) features -> (...) float64 presence probabilities (on the features' device)."""
        as_tensor = lambda values: torch.as_tensor(values, dtype=torch.float64, device=features.device)  # noqa: E731
        standardised = (features.to(torch.float64) - as_tensor(self.mean)) / as_tensor(self.scale)
        return torch.sigmoid(standardised @ as_tensor(self.weights) + self.bias)

    def to_dict(self) -> dict[str, Any]:
        return {"features": list(FEATURES), "mean": self.mean.tolist(), "scale": self.scale.tolist(),
                "weights": self.weights.tolist(), "bias": self.bias, "metrics": dict(self.metrics)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PresenceModel:
        if list(data.get("features", [])) != list(FEATURES):
            raise ValueError(f"presence model features {data.get('features')} are not {list(FEATURES)}")
        return cls(data["mean"], data["scale"], data["weights"], data["bias"], dict(data.get("metrics") or {}))


def fit_presence_model(features: torch.Tensor, present: torch.Tensor, ridge: float = RIDGE) -> PresenceModel:
    """Fit on (N, K, 3) features and (N, K) presence of labelled images (all (image, class) pairs pooled)."""
    inputs = features.reshape(-1, len(FEATURES)).to(torch.float64).cpu()
    targets = present.reshape(-1).to(torch.float64).cpu()
    if len(targets) == 0 or targets.min() == targets.max():
        raise ValueError("a presence model needs labelled images with both present and absent classes")
    mean, scale = inputs.mean(0), inputs.std(0).clamp_min(1e-9)
    standardised = (inputs - mean) / scale
    parameters = torch.zeros(len(FEATURES) + 1, dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([parameters], max_iter=200, tolerance_grad=1e-10, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        logits = standardised @ parameters[:-1] + parameters[-1]
        loss = F.binary_cross_entropy_with_logits(logits, targets) + ridge * (parameters[:-1] ** 2).sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    fitted = parameters.detach()
    with torch.no_grad():
        log_loss = float(F.binary_cross_entropy_with_logits(standardised @ fitted[:-1] + fitted[-1], targets))
    metrics = {"images": int(features.shape[0]), "pairs": int(len(targets)), "present_share": float(targets.mean()),
               "log_loss": log_loss}
    return PresenceModel(mean.numpy(), scale.numpy(), fitted[:-1].numpy(), float(fitted[-1]), metrics)
