"""The logit cache of a labelled split: one forward pass, then any number of adjustments without the network.

:func:`build_logit_cache` stores each image's logits at the model's OUTPUT STRIDE in float16 (what the network
produced, e.g. 19×64×128 for DeepLabV2 at 1024×512: 0.3 MB instead of 80 MB at 2048×1024) with its full-size
labels. :meth:`LogitCache.confusion` then scores a logit transform (IA: ``z/T + b``, a per-class affine map) as
``labelshift.inference.evaluate`` would: transform -> bilinear upsampling to the label size -> argmax ->
confusion. Bilinear upsampling commutes with a per-class affine map (its weights sum to 1), so the transform is
applied at the stride, and the argmax of the upsampled logits is computed exactly but cheaply:

- an output pixel interpolates 4 low-resolution cells (its *block*); when the 4 share one argmax class, every
  convex combination of them has that argmax too, so the whole block's pixels take it: their confusion is the
  block's label histogram (precomputed once) added to that class's column;
- only pixels of blocks whose corners disagree are interpolated (PyTorch's bilinear formula and indices), over
  the classes that can still win in their block, whole blocks at a time. On CPU at 2048×1024 from 128×64 this is
  5–20× faster than upsampling the whole map (a random-weight DeepLabV2-R101: 0.025 s vs 0.47 s an image), and
  still 2× faster when every block is mixed with every class a candidate (i.i.d. noise logits).

Differences from a full evaluation come only from the float16 rounding of the cached logits. Logits beyond
float16's range (e.g. a randomly initialised DeepLabV2-R101 reaches ~1e5; float16 ends at 65504) are stored
divided by a power of two, kept per image (an exact rescaling): the cache never holds an inf.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn

from labelshift.classes import IGNORE_INDEX
from labelshift.estimate.base import as_tensor
from labelshift.inference import autocast_for
from labelshift.metrics import ConfusionMatrix
from labelshift.models import align_corners_of

LogitTransform = Callable[[torch.Tensor], torch.Tensor]
# An image whose largest |logit| exceeds this is stored divided by 2**e so that it does not (float16 max: 65504)
FLOAT16_LOGIT_LIMIT = 2.0 ** 15


# ------------------------------------------------------------------------------------------ interpolation plan
def bilinear_source(in_size: int, out_size: int, align_corners: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PyTorch's bilinear source indices along one axis: (i0, i1, λ) each (out_size,), with output ``o`` =
    ``(1−λ)·x[i0] + λ·x[i1]`` (float32 arithmetic, as ``F.interpolate`` on float tensors)."""
    dst = np.arange(out_size, dtype=np.float32)
    if align_corners:
        scale = np.float32((in_size - 1) / (out_size - 1)) if out_size > 1 else np.float32(0)
        src = scale * dst
    else:
        scale = np.float32(in_size / out_size)
        src = np.maximum(scale * (dst + np.float32(0.5)) - np.float32(0.5), np.float32(0))
    i0 = src.astype(np.int64)
    i1 = i0 + (i0 < in_size - 1)
    return i0, i1, (src - i0).astype(np.float32)


@dataclass(frozen=True)
class UpsamplePlan:
    """Bilinear upsampling (h, w) -> (H, W): the row and column sources and each output pixel's block
    (its top-left source cell, ``i0·w + j0``)."""

    low: tuple[int, int]
    high: tuple[int, int]
    rows: tuple[np.ndarray, np.ndarray, np.ndarray]
    cols: tuple[np.ndarray, np.ndarray, np.ndarray]
    block_of_pixel: np.ndarray  # (H·W,) int64
    block_area: np.ndarray  # (h·w,) float64: output pixels per block (label-free weights of the cells)
    row_span: tuple[torch.Tensor, torch.Tensor]  # (h,) first output row of each block row, and how many rows
    col_span: tuple[torch.Tensor, torch.Tensor]  # (w,) first output column of each block column, and how many


def _spans(sources: np.ndarray, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The output indices with source cell i (non-decreasing ``sources``) form one run: its start and length."""
    counts = np.bincount(sources, minlength=size)
    return torch.from_numpy(np.concatenate([[0], np.cumsum(counts)[:-1]])), torch.from_numpy(counts)


@functools.lru_cache(maxsize=16)
def upsample_plan(low: tuple[int, int], high: tuple[int, int], align_corners: bool) -> UpsamplePlan:
    rows = bilinear_source(low[0], high[0], align_corners)
    cols = bilinear_source(low[1], high[1], align_corners)
    block = (rows[0][:, None] * low[1] + cols[0][None, :]).reshape(-1)
    area = np.bincount(block, minlength=low[0] * low[1]).astype(np.float64)
    return UpsamplePlan(low, high, rows, cols, block, area, _spans(rows[0], low[0]), _spans(cols[0], low[1]))


def _padded_uniform(argmax: torch.Tensor) -> torch.Tensor:
    """(h, w) argmax -> (h, w) bool: the 4 corners of block (i, j) (clamped at the last row/column) agree."""
    down = torch.cat([argmax[1:], argmax[-1:]], 0)
    right = torch.cat([argmax[:, 1:], argmax[:, -1:]], 1)
    diagonal = torch.cat([down[:, 1:], down[:, -1:]], 1)
    return (argmax == down) & (argmax == right) & (argmax == diagonal)


def _block_candidates(cells: torch.Tensor, blocks: torch.Tensor, plan: UpsamplePlan
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The classes that can win inside each block of ``blocks`` (B,): its 4 corner values (B, 4, K), the classes
    ranked by their largest corner value (B, K) and how many of them can win (B,). A class whose largest corner
    value is below max_c min_corners v[c] (a lower bound of the winning value anywhere in the block) never wins."""
    height, width = plan.low
    rows, cols = blocks // width, blocks % width
    down, right = (rows < height - 1).long() * width, (cols < width - 1).long()
    corners = torch.stack([blocks, blocks + right, blocks + down, blocks + down + right], 1)  # (B, 4)
    values = cells[corners]
    best_lower = values.min(1).values.max(1, keepdim=True).values
    upper = values.max(1).values
    return values, upper.argsort(1, descending=True), (upper >= best_lower).sum(1)


@dataclass(frozen=True)
class MixedBlocks:
    """The blocks of one adjusted map whose 4 corners disagree: their ids (B,), corner values (B, 4, K), classes
    ranked by their largest corner value (B, K) and how many of those can win (B,)."""

    blocks: torch.Tensor
    corner_values: torch.Tensor
    ranked: torch.Tensor
    candidates: torch.Tensor

    @classmethod
    def of(cls, adjusted: torch.Tensor, uniform: torch.Tensor, plan: UpsamplePlan) -> "MixedBlocks":
        cells = adjusted.reshape(adjusted.shape[0], -1).T.contiguous()  # (h·w, K)
        blocks = torch.nonzero(~uniform).squeeze(1)
        return cls(blocks, *_block_candidates(cells, blocks, plan))


def _mixed_block_keys(mixed: MixedBlocks, plan: UpsamplePlan, labels: torch.Tensor, num_classes: int
                      ) -> torch.Tensor:
    """``predicted·K + label`` of every labelled output pixel of the ``mixed`` blocks, ``predicted`` the argmax
    of the bilinearly upsampled map. Blocks are grouped by their pixel shape (rows × columns) and their number
    of candidate classes rounded up to a power of two; a group interpolates the top-ranked classes of its
    blocks, as many as its largest number of candidates (a class beyond a block's own candidates never wins
    there), over whole blocks at once, with PyTorch's formula (per row: the columns' mix of the two top corners
    and of the two bottom ones, then the rows' mix).
    ``labels``: (H·W,) flat labels (uint8 or int64)."""
    width, cells_per_row = plan.high[1], plan.low[1]
    block_rows, block_cols = mixed.blocks // cells_per_row, mixed.blocks % cells_per_row
    row_start, row_count = plan.row_span[0][block_rows], plan.row_span[1][block_rows]
    col_start, col_count = plan.col_span[0][block_cols], plan.col_span[1][block_cols]
    candidate_bucket = torch.ceil(torch.log2(mixed.candidates.double())).long()  # 1, 2, 3-4, 5-8, ...
    group_of_block = (row_count * (width + 1) + col_count) * 32 + candidate_bucket
    row_lambda, col_lambda = torch.from_numpy(plan.rows[2]), torch.from_numpy(plan.cols[2])
    keys = []
    for group in torch.unique(group_of_block).tolist():
        members = torch.nonzero(group_of_block == group).squeeze(1)
        rows, cols = int(row_count[members[0]]), int(col_count[members[0]])
        count = int(mixed.candidates[members].max())
        if rows == 0 or cols == 0:
            continue
        classes = mixed.ranked[members, :count]  # (B, C)
        corners = mixed.corner_values[members].gather(2, classes[:, None, :].expand(-1, 4, -1))  # (B, 4, C)
        out_rows = row_start[members, None] + torch.arange(rows)  # (B, R)
        out_cols = col_start[members, None] + torch.arange(cols)  # (B, S)
        row1, col1 = row_lambda[out_rows][:, :, None, None], col_lambda[out_cols][:, None, :, None]
        row0, col0 = 1 - row1, 1 - col1
        top = col0 * corners[:, None, None, 0] + col1 * corners[:, None, None, 1]  # (B, 1, S, C)
        bottom = col0 * corners[:, None, None, 2] + col1 * corners[:, None, None, 3]
        winner = (row0 * top + row1 * bottom).argmax(-1)  # (B, R, S)
        predicted = classes.gather(1, winner.flatten(1))  # (B, R·S)
        pixel_labels = labels[(out_rows[:, :, None] * width + out_cols[:, None, :]).flatten(1)].long()
        valid = pixel_labels != IGNORE_INDEX
        keys.append(predicted[valid] * num_classes + pixel_labels[valid])
    return torch.cat(keys) if keys else torch.zeros(0, dtype=torch.int64)


def block_label_counts(labels: np.ndarray, plan: UpsamplePlan, num_classes: int) -> np.ndarray:
    """(h·w, K) int64: per block, the count of each label among its output pixels (ignored pixels left out)."""
    flat = labels.reshape(-1).astype(np.int64)
    valid = flat != IGNORE_INDEX
    keys = plan.block_of_pixel[valid] * num_classes + flat[valid]
    counts = np.bincount(keys, minlength=len(plan.block_area) * num_classes)
    return counts.reshape(len(plan.block_area), num_classes)


# ----------------------------------------------------------------------------------------------------- cache
@dataclass
class LogitCache:
    """Per image: logits (K, h, w) float16 at the output stride (the true logits are ``logits · 2**exponent``),
    labels (H, W) uint8 trainIds (255 ignored), its name, and the label histogram of every interpolation block
    (h·w, K). Arrays may be read-only (Ray's object store returns them so): nothing here writes to them."""

    logits: list[np.ndarray]
    labels: list[np.ndarray]
    names: list[str]
    num_classes: int
    align_corners: bool
    block_counts: list[np.ndarray] = field(default_factory=list)
    scale_exponents: list[int] = field(default_factory=list)  # per image; empty: all 0 (no rescaling)

    def __post_init__(self) -> None:
        if not self.scale_exponents:
            self.scale_exponents = [0] * len(self.logits)
        if not self.block_counts:
            self.block_counts = [block_label_counts(label, self.plan(index), self.num_classes)
                                 for index, label in enumerate(self.labels)]

    def __len__(self) -> int:
        return len(self.logits)

    def plan(self, index: int) -> UpsamplePlan:
        return upsample_plan(tuple(self.logits[index].shape[1:]), tuple(self.labels[index].shape),
                             self.align_corners)

    def low_res(self, index: int) -> torch.Tensor:
        """(K, h, w) float32 logits of image ``index``."""
        logits = np.array(self.logits[index], dtype=np.float32)
        exponent = self.scale_exponents[index]
        return torch.from_numpy(np.ldexp(logits, np.int32(exponent)) if exponent else logits)

    def nbytes(self) -> int:
        return sum(a.nbytes for group in (self.logits, self.labels, self.block_counts) for a in group)

    def empty_matrix(self) -> torch.Tensor:
        """A (K, K) int64 count matrix [predicted, true] for :meth:`add_image`."""
        return torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    def as_confusion(self, matrix: torch.Tensor) -> ConfusionMatrix:
        """The :class:`ConfusionMatrix` ([true, predicted]) of a count matrix filled by :meth:`add_image`."""
        result = ConfusionMatrix(self.num_classes)
        result.matrix += matrix.T.numpy()
        return result

    def confusion(self, transform: LogitTransform | None = None) -> ConfusionMatrix:
        """The confusion of ``argmax(upsample(transform(z)))`` against the labels, summed over the split."""
        matrix = self.empty_matrix()
        for index in range(len(self)):
            adjusted = self.low_res(index)
            self.add_image(matrix, adjusted if transform is None else transform(adjusted[None])[0], index)
        return self.as_confusion(matrix)

    def add_image(self, matrix: torch.Tensor, adjusted: torch.Tensor, index: int) -> None:
        """Add image ``index``'s (predicted, true) counts for its adjusted low-resolution logits (K, h, w)."""
        plan = self.plan(index)
        argmax = adjusted.argmax(0)
        uniform = _padded_uniform(argmax).reshape(-1)
        labels = as_tensor(np.asarray(self.labels[index]).reshape(-1))  # (H·W,) uint8, only read
        counts = as_tensor(self.block_counts[index])  # read-only arrays from the object store, only read
        matrix.index_add_(0, argmax.reshape(-1)[uniform], counts[uniform])
        keys = _mixed_block_keys(MixedBlocks.of(adjusted, uniform, plan), plan, labels, self.num_classes)
        matrix += torch.bincount(keys, minlength=self.num_classes ** 2).reshape(self.num_classes, -1)


def to_float16(logits: torch.Tensor) -> tuple[np.ndarray, int]:
    """(K, h, w) float32 logits -> (float16 array, e) with logits ≈ array · 2**e: e = 0 unless the largest
    |logit| exceeds ``FLOAT16_LOGIT_LIMIT`` (scaling by a power of two keeps float16's relative precision).
    Non-finite logits raise ``ValueError``."""
    if not torch.isfinite(logits).all():
        raise ValueError("the model returned non-finite logits (NaN or inf): nothing can be cached or adjusted")
    peak = float(logits.abs().max()) if logits.numel() else 0.0
    exponent = max(0, math.ceil(math.log2(peak / FLOAT16_LOGIT_LIMIT))) if peak > FLOAT16_LOGIT_LIMIT else 0
    return torch.ldexp(logits, torch.tensor(-exponent)).to(torch.float16).numpy(), exponent


@torch.no_grad()
def forward_at_stride(model: nn.Module, images: torch.Tensor, *, device: torch.device, flip: bool = False,
                      amp_dtype: torch.dtype | None = None) -> torch.Tensor:
    """images (N, 3, H, W) -> logits (N, K, h, w) float32 at the model's output stride (with ``flip``: the mean of
    the image's and its mirror's logits, mirrored back; bilinear upsampling commutes with both)."""
    images = images.to(device, non_blocking=True)
    if device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    views = (images, images.flip(-1)) if flip else (images,)
    total = None
    for view, flipped in zip(views, (False, True)):
        with autocast_for(device, amp_dtype):
            logits = model(view).float()
        logits = logits.flip(-1) if flipped else logits
        total = logits if total is None else total + logits
    return total / len(views)


def build_logit_cache(model: nn.Module, loader: Iterable[dict], num_classes: int, *, device: torch.device,
                      flip: bool = False, scales: tuple[float, ...] = (1.0,),
                      amp_dtype: torch.dtype | None = None) -> LogitCache:
    """One pass over a labelled evaluation loader (``labelshift.build.eval_loader``): float16 logits at the
    output stride and uint8 labels at their own size (``label_size`` crops the padding of mixed sizes)."""
    if tuple(scales) != (1.0,):
        raise ValueError(f"the logit cache stores one output-stride map per image: eval.scales must be (1.0,), got "
                         f"{tuple(scales)} (multi-scale logits have no common stride)")
    model.eval()
    logits_out, labels_out, names, exponents = [], [], [], []
    for batch in loader:
        if batch.get("label") is None:
            raise ValueError("the logit cache needs a labelled loader (batches with a 'label' key)")
        logits = forward_at_stride(model, batch["image"], device=device, flip=flip, amp_dtype=amp_dtype).cpu()
        sizes = batch["label_size"].tolist() if "label_size" in batch else [batch["label"].shape[-2:]] * len(logits)
        for row, label, (height, width), name in zip(logits, batch["label"], sizes, batch["name"]):
            stored, exponent = to_float16(row)
            logits_out.append(stored)
            exponents.append(exponent)
            labels_out.append(label[:height, :width].to(torch.uint8).numpy())
            names.append(name)
    return LogitCache(logits_out, labels_out, names, num_classes, align_corners_of(model), scale_exponents=exponents)
