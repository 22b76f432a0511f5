"""Pseudo labels as training data: target images with the hard pseudo labels or the top-k soft labels a labelling
pass wrote (``labelshift.pseudo``), under the training transform (resize, scale, crop, flip, jitter).

Soft targets follow the image through the same random geometry as a label would: each image pixel carries the
index of the soft-label grid cell it lies in (nearest), the transform moves that index map with the image, and
the target of every training pixel is the top-k distribution of its cell, renormalised over the k classes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from labelshift.classes import IGNORE_INDEX
from labelshift.data.io import DatasetError, SegmentationFileDataset, read_image
from labelshift.pseudo import read_soft_labels, soft_target

CELL_OFFSET = IGNORE_INDEX + 1  # cell c is carried as c + 256, so the transform's padding (255) stays "ignore"


def cell_index_map(image_size: tuple[int, int], grid_size: tuple[int, int]) -> np.ndarray:
    """(H, W) int32: ``CELL_OFFSET`` + the row-major index of the grid cell (h, w) each image pixel falls in."""
    (height, width), (rows, cols) = image_size, grid_size
    row = np.minimum((np.arange(height) + 0.5) * rows / height, rows - 1).astype(np.int32)
    col = np.minimum((np.arange(width) + 0.5) * cols / width, cols - 1).astype(np.int32)
    return (CELL_OFFSET + row[:, None] * cols + col[None, :]).astype(np.int32)


class PseudoLabelDataset(Dataset):
    """Target images with pseudo-label targets for self-distillation.

    ``images``: the target split as a :class:`SegmentationFileDataset` with the training transform and, for
    ``targets="hard"``, labels read from ``<pass>/labels/<stem>.png`` (``build_split(...,
    pseudo_label_dir=...)``); for ``"soft"`` images only, with the soft labels read from
    ``soft_dir/<stem>.parquet``. Items: ``{"image": float32 (3, h, w), "name": str, "label": ...}`` where the
    label is int64 (h, w) trainIds (255 ignored) for hard targets, and float32 (K, h, w) for soft targets: the
    top-k distribution renormalised, all zeros where ignored (outside the image, or where the top-1
    probability is below ``confidence_threshold``).
    """

    def __init__(self, images: SegmentationFileDataset, targets: Literal["hard", "soft"] = "hard",
                 soft_dir: str | Path | None = None, confidence_threshold: float = 0.0) -> None:
        if targets not in ("hard", "soft"):
            raise ValueError(f"targets must be 'hard' or 'soft', got {targets!r}")
        if targets == "soft" and (soft_dir is None or not Path(soft_dir).is_dir()):
            raise DatasetError(f"soft-label directory {soft_dir} does not exist; expected <soft_dir>/<stem>.parquet")
        self.images, self.targets = images, targets
        self.soft_dir = Path(soft_dir) if soft_dir is not None else None
        self.confidence_threshold = float(confidence_threshold)
        self.num_classes = images.class_set.num_classes

    def __len__(self) -> int:
        return len(self.images)

    def set_epoch(self, epoch: int) -> None:
        self.images.set_epoch(epoch)

    def __getitem__(self, index: int) -> dict:
        if self.targets == "hard":
            return self.images[index]
        name = self.images.names[index]
        soft, _ = read_soft_labels(self.soft_dir / f"{name}.parquet")
        image = read_image(self.images.files[index][0])
        cells = cell_index_map(image.shape[:2], soft.class_ids.shape[1:])
        rng = np.random.default_rng([self.images.seed, self.images.epoch, index])
        image_tensor, cell_tensor = self.images.transform(image, cells, rng)
        grid = soft_target(soft, self.num_classes).reshape(self.num_classes, -1)  # (K, h·w)
        grid[:, soft.probs[0].reshape(-1) < round(255 * self.confidence_threshold)] = 0.0
        valid = cell_tensor >= CELL_OFFSET
        target = torch.zeros(self.num_classes, *cell_tensor.shape, dtype=torch.float32)
        target[:, valid] = torch.from_numpy(grid)[:, cell_tensor[valid] - CELL_OFFSET]
        return {"image": image_tensor, "name": name, "label": target}


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over pixels with a target of ``−Σ_c t_c·log softmax(z)_c``; logits, targets (N, K, H, W), a target of
    all zeros is ignored. 0 (with a gradient) when no pixel has one."""
    per_pixel = -(targets * torch.log_softmax(logits, dim=1)).sum(1)
    valid = targets.sum(1) > 0
    return per_pixel[valid].sum() / valid.sum().clamp_min(1)
