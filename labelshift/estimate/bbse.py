"""Black-box shift estimation (Lipton et al. 2018) with a soft source confusion matrix and a ridge."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from labelshift.classes import IGNORE_INDEX, ClassSet
from labelshift.estimate.base import PriorEstimator, UnitStatisticsEstimator, argmax_histograms, as_tensor, as_units


def bbse_solve(joint_confusion: np.ndarray, mean_prediction: np.ndarray, *, ridge: float = 1e-3) -> np.ndarray:
    """Target prior from a source confusion and the target mean prediction (Lipton et al. 2018).

    joint_confusion: (K, K) C[i, j] = P_s(y=i, ŷ=j) (soft: E[p_j | y=i]·P_s(y=i)); mean_prediction: (K,) μ_t.
    Solves C^T w = μ_t for w = π_t/π_s by ridge least squares shrunk towards w = 1 (RLLS-style;
    λ = ridge·trace(C Cᵀ)/K), clips negatives, returns π_t = w·π_s normalised (K,).
    """
    source_prior = joint_confusion.sum(axis=1)
    gram = joint_confusion @ joint_confusion.T
    penalty = ridge * np.trace(gram) / len(gram)
    rhs = joint_confusion @ mean_prediction + penalty
    weights = np.clip(np.linalg.solve(gram + penalty * np.eye(len(gram)), rhs), 0.0, None)
    target = weights * source_prior
    return target / target.sum() if target.sum() > 0 else source_prior / source_prior.sum()


class BBSEEstimator(UnitStatisticsEstimator):
    """Black-box shift estimation with a (soft by default) source confusion matrix; a pixel prior.

    ``update_source(probs, labels)`` accumulates the joint confusion on a labelled source split (the same
    posterior transform, e.g. calibration, as the target); ``update(probs)`` the target predictions.
    The bootstrap resamples target images; the source confusion is held fixed.
    """

    method, kind = "bbse", "pixel"
    needs_source_labels = True
    counts_are_sums = False

    def __init__(self, classes: ClassSet | Sequence[str], *, soft: bool = True, ridge: float = 1e-3,
                 **base: Any) -> None:
        super().__init__(classes, **base)
        self.soft, self.ridge = bool(soft), float(ridge)
        self.joint_counts = np.zeros((self.num_classes, self.num_classes))  # Σ onehot(y) ⊗ p over source pixels
        self.source_pixels = 0

    def settings(self) -> dict[str, Any]:
        return {"soft": self.soft, "ridge": self.ridge}

    def update_source(self, probs: Any, labels: Any, *, ignore_index: int = IGNORE_INDEX,
                      chunk_pixels: int = 1 << 18) -> None:
        """Add labelled source data: probs (B, K, H, W) or (N, K); labels (B, H, W) or (N,) trainIds."""
        units = as_units(probs, self.num_classes)
        targets = as_tensor(labels)
        if targets.numel() != units.shape[0] * units.shape[2] * units.shape[3]:
            raise ValueError(f"labels of shape {tuple(targets.shape)} do not match probabilities {tuple(probs.shape)}")
        targets = targets.to(units.device).reshape(-1).long()
        pixels = units.movedim(1, -1).reshape(-1, self.num_classes)
        valid = targets != ignore_index
        if torch.any(valid & ((targets < 0) | (targets >= self.num_classes))):
            raise ValueError(f"source labels must be trainIds 0..{self.num_classes - 1} or {ignore_index}")
        pixels, targets = pixels[valid], targets[valid]
        joint = torch.zeros(self.num_classes, self.num_classes, dtype=torch.float64, device=units.device)
        if not self.soft:
            predicted = pixels.argmax(dim=1)
            flat = torch.bincount(targets * self.num_classes + predicted, minlength=self.num_classes ** 2)
            joint += flat.view(self.num_classes, self.num_classes)
        else:
            for start in range(0, len(targets), chunk_pixels):
                chunk = slice(start, start + chunk_pixels)
                joint.index_add_(0, targets[chunk], pixels[chunk].to(torch.float64))
        self.joint_counts += joint.cpu().numpy()
        self.source_pixels += int(len(targets))

    def _unit_statistics(self, units: torch.Tensor) -> np.ndarray:
        if self.soft:
            return torch.sum(units, dim=(2, 3), dtype=torch.float64).cpu().numpy()
        return argmax_histograms(units)

    def _merge_state(self, other: PriorEstimator) -> None:
        assert isinstance(other, BBSEEstimator)
        super()._merge_state(other)
        self.joint_counts = self.joint_counts + other.joint_counts
        self.source_pixels += other.source_pixels

    def _estimate(self, unit_weights: np.ndarray | None) -> np.ndarray:
        if self.source_pixels == 0:
            raise RuntimeError("bbse needs labelled source data: call update_source(probs, labels) first")
        target_mass = super()._estimate(unit_weights)
        return bbse_solve(self.joint_counts / self.source_pixels, target_mass / target_mass.sum(), ridge=self.ridge)

    def _diagnostics(self) -> dict[str, Any]:
        joint = self.joint_counts / max(self.source_pixels, 1)
        return {"source_pixels": self.source_pixels, "confusion_condition_number": float(np.linalg.cond(joint))}


