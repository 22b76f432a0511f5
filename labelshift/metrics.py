"""Mergeable confusion matrix and the IoU family computed from it.

mIoU is computed once from the confusion summed over a whole split (never a mean of per-image IoUs).
A class absent from both ground truth and predictions has IoU NaN and is left out of the mean.
"""
from __future__ import annotations

import numpy as np
import torch

from labelshift.classes import IGNORE_INDEX


class ConfusionMatrix:
    """``matrix[i, j]`` counts pixels of true class i predicted as class j (int64, (K, K))."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)

    def update(self, labels: torch.Tensor | np.ndarray, predictions: torch.Tensor | np.ndarray) -> None:
        """labels, predictions: integer arrays of the same shape (e.g. (N, H, W)); ignore pixels skipped.

        A label that is neither a class nor the ignore index, or a prediction that is not a class, raises: it
        means a label mapping is wrong, which silent clipping would hide.
        """
        labels = torch.as_tensor(labels).reshape(-1).to("cpu", torch.int64)
        predictions = torch.as_tensor(predictions).reshape(-1).to("cpu", torch.int64)
        if labels.shape != predictions.shape:
            raise ValueError(f"labels {tuple(labels.shape)} and predictions {tuple(predictions.shape)} differ")
        k = self.num_classes
        valid = labels != self.ignore_index
        bad_labels = valid & ((labels < 0) | (labels >= k))
        if bad_labels.any():
            raise ValueError(f"labels {torch.unique(labels[bad_labels])[:10].tolist()} are neither classes "
                             f"0..{k - 1} nor the ignore index {self.ignore_index}")
        bad_predictions = (predictions < 0) | (predictions >= k)
        if bad_predictions.any():
            raise ValueError(f"predictions {torch.unique(predictions[bad_predictions])[:10].tolist()} are not "
                             f"classes 0..{k - 1}")
        flat = labels[valid] * k + predictions[valid]
        self.matrix += torch.bincount(flat, minlength=k * k).reshape(k, k).numpy()

    def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge confusion matrices of {self.num_classes} and {other.num_classes} classes")
        self.matrix += other.matrix
        return self

    def iou(self) -> np.ndarray:
        """(K,) float64 per-class IoU; NaN for classes absent from both labels and predictions."""
        tp = np.diag(self.matrix).astype(np.float64)
        union = self.matrix.sum(0) + self.matrix.sum(1) - np.diag(self.matrix)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(union > 0, tp / np.maximum(union, 1), np.nan)

    def miou(self, subset: list[int] | None = None) -> float:
        """Mean IoU over present classes (optionally over a subset of class indices)."""
        ious = self.iou()
        if subset is not None:
            ious = ious[list(subset)]
        return float(np.nanmean(ious)) if np.isfinite(ious).any() else float("nan")

    def pixel_accuracy(self) -> float:
        total = self.matrix.sum()
        return float(np.diag(self.matrix).sum() / total) if total else float("nan")

    def to_dict(self, class_names: tuple[str, ...] | list[str], subsets: dict[str, list[int]] | None = None) -> dict:
        """JSON-able summary: mIoU (percent), per-class IoU (percent, null when absent), pixel accuracy."""
        ious = self.iou()
        summary = {
            "miou": round(100 * self.miou(), 4),
            "pixel_accuracy": round(100 * self.pixel_accuracy(), 4),
            "per_class_iou": {n: (None if np.isnan(v) else round(100 * float(v), 4)) for n, v in zip(class_names, ious)},
        }
        for name, indices in (subsets or {}).items():
            summary[f"miou_{name}"] = round(100 * self.miou(indices), 4)
        return summary
