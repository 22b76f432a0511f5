"""Batched prediction and evaluation over a loader.

``predict`` resizes images to the model input (``input_size``; loaders built from a config already do),
runs the model (optionally over flips and scales) and upsamples the logits to the label size (full resolution
for evaluation), averaging the views. In batches whose labels differ in size (``collate_eval`` pads them with
the ignore index) each image's logits are upsampled to its own label size. The device is always passed in.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from labelshift.classes import IGNORE_INDEX
from labelshift.metrics import ConfusionMatrix
from labelshift.models import align_corners_of, upsample_logits

LogitTransform = Callable[[torch.Tensor], torch.Tensor]


def autocast_for(device: torch.device, amp_dtype: torch.dtype | None):
    """bf16/fp16 autocast context on CUDA when asked, a no-op otherwise."""
    if amp_dtype is None or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=amp_dtype)


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, output_size: tuple[int, int] | None, *, device: torch.device,
            flip: bool = False, scales: tuple[float, ...] = (1.0,), amp_dtype: torch.dtype | None = None,
            input_size: tuple[int, int] | None = None,
            row_sizes: list[tuple[int, int]] | None = None) -> torch.Tensor:
    """images: (N, 3, h, w) normalised -> logits (N, K, H, W) float32 at ``output_size`` = (H, W), or at the
    model's own output grid when ``output_size`` is None (one scale only).

    ``input_size`` (height, width): resize the images to the model input first (bilinear). ``row_sizes``: the
    (height, width) of each image's own label when they differ: each row is upsampled to its size and
    zero-padded to ``output_size``. With several scales or ``flip``, the upsampled logits of every view are
    averaged; the model runs once per view for the whole batch.
    """
    if output_size is None and len(scales) > 1:
        raise ValueError("logits at the model's output grid (output_size=None) need a single scale")
    images = images.to(device, non_blocking=True)
    if input_size is not None and tuple(images.shape[-2:]) != tuple(input_size):
        images = F.interpolate(images, size=tuple(input_size), mode="bilinear", align_corners=False)
    if device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    total = None
    views = 0
    for scale in scales:
        scaled = images if scale == 1.0 else F.interpolate(images, scale_factor=scale, mode="bilinear",
                                                           align_corners=False)
        for flipped in ((False, True) if flip else (False,)):
            batch = scaled.flip(-1) if flipped else scaled
            with autocast_for(device, amp_dtype):
                logits = model(batch)
            logits = _upsample_rows(logits.float(), output_size, row_sizes, flipped, align_corners_of(model))
            total = logits if total is None else total + logits
            views += 1
    return total / views


def _upsample_rows(logits: torch.Tensor, output_size: tuple[int, int] | None, row_sizes: list[tuple[int, int]] | None,
                   flipped: bool, align_corners: bool = False) -> torch.Tensor:
    """Logits upsampled to ``output_size`` (or each row to its own size, zero-padded), un-flipped if needed."""
    if output_size is None:
        return logits.flip(-1) if flipped else logits
    if row_sizes is None:
        logits = upsample_logits(logits, output_size, align_corners=align_corners)
        return logits.flip(-1) if flipped else logits
    rows = []
    for row, (height, width) in zip(logits, row_sizes):
        upsampled = upsample_logits(row[None], (height, width), align_corners=align_corners)
        upsampled = upsampled.flip(-1) if flipped else upsampled
        rows.append(F.pad(upsampled, (0, output_size[1] - width, 0, output_size[0] - height)))
    return torch.cat(rows)


def iterate_predictions(model: nn.Module, loader: Iterable[dict], *, device: torch.device, flip: bool = False,
                        scales: tuple[float, ...] = (1.0,), amp_dtype: torch.dtype | None = None,
                        at_label_size: bool = True) -> Iterator[tuple[torch.Tensor, torch.Tensor | None, list[str]]]:
    """Yield (logits (B, K, H, W), labels (B, H, W) or None, names) for every batch of ``loader``.

    Logits are at the label size when labels exist and ``at_label_size``; else at the input size.
    """
    model.eval()
    options = {"device": device, "flip": flip, "scales": scales, "amp_dtype": amp_dtype}
    for batch in loader:
        labels = batch.get("label")
        if labels is None or not at_label_size:
            logits = predict(model, batch["image"], tuple(batch["image"].shape[-2:]), **options)
        else:
            sizes = [tuple(size) for size in batch["label_size"].tolist()] if "label_size" in batch else []
            logits = predict(model, batch["image"], tuple(labels.shape[-2:]), **options,
                             row_sizes=sizes if len(set(sizes)) > 1 else None)
        yield logits, labels, list(batch["name"])


def evaluate(model: nn.Module, loader: Iterable[dict], num_classes: int, *, device: torch.device,
             logit_transforms: dict[str, LogitTransform | None] | None = None, flip: bool = False,
             scales: tuple[float, ...] = (1.0,), amp_dtype: torch.dtype | None = None) -> dict[str, ConfusionMatrix]:
    """Confusion matrices over a labelled loader, one per named logit transform (None = raw logits).

    Several adjustments (none, IA with an estimate, IA with the oracle) share one forward pass.
    """
    transforms = logit_transforms or {"none": None}
    matrices = {name: ConfusionMatrix(num_classes) for name in transforms}
    for logits, labels, _ in iterate_predictions(model, loader, device=device, flip=flip, scales=scales,
                                                 amp_dtype=amp_dtype):
        if labels is None:
            raise ValueError("evaluate() needs a labelled loader (batches with a 'label' key)")
        for name, transform in transforms.items():
            adjusted = logits if transform is None else transform(logits)
            matrices[name].update(labels, adjusted.argmax(1).cpu())
    return matrices


@dataclass
class LabelledSample:
    """What a labelled pass draws (:func:`sample_pixels`): a pixel sample, logits (M, K) float32 and labels (M,)
    int64, and per image the presence features (N, K, 3) float64 of its raw logits and its label presence (N, K)
    bool (:mod:`labelshift.image_presence`)."""

    logits: torch.Tensor
    labels: torch.Tensor
    presence_features: torch.Tensor
    presence: torch.Tensor

    @classmethod
    def concat(cls, samples: Iterable[LabelledSample]) -> LabelledSample:
        """The samples of consecutive shards, in order."""
        parts = list(samples)
        return cls(*(torch.cat([getattr(part, name) for part in parts]) for name in
                     ("logits", "labels", "presence_features", "presence")))


def _recording_label_sizes(loader: Iterable[dict], sink: list) -> Iterator[dict]:
    """The loader's batches, appending each batch's per-image label sizes (or None) to ``sink`` as it is read."""
    for batch in loader:
        sizes = batch.get("label_size")
        sink.append(None if sizes is None else [tuple(size) for size in sizes.tolist()])
        yield batch


def sample_pixels(model: nn.Module, loader: Iterable[dict], *, device: torch.device, pixels_per_image: int,
                  seed: int = 0, amp_dtype: torch.dtype | None = None) -> LabelledSample:
    """A seeded random sample of labelled pixels (logits (M, K) float32, labels (M,) int64, ignore dropped) and
    each image's presence features and label presence.

    Up to ``pixels_per_image`` valid pixels of each image, drawn from a key of the image's name
    (:mod:`labelshift.sampling`), in the loader's order: the same sample however the split is batched or
    sharded. Used to fit calibration and the presence model and to measure the source confusion on a labelled
    split.
    """
    from labelshift.image_presence import PRESENCE_GRID_PIXELS, grid_pixels, label_presence, presence_features
    from labelshift.sampling import CALIBRATION_PIXELS, keyed_generator, name_key

    logit_rows, label_rows, feature_rows, presence_rows = [], [], [], []
    label_sizes: list[list[tuple[int, int]] | None] = []  # the current batch's per-image label sizes
    for logits, labels, names in iterate_predictions(model, _recording_label_sizes(loader, label_sizes),
                                                     device=device, amp_dtype=amp_dtype):
        sizes = label_sizes[-1] or [tuple(labels.shape[-2:])] * len(names)
        for row, (height, width) in enumerate(sizes):  # each image at its own size (a padded batch's rows)
            if bool((labels[row, :height, :width] != IGNORE_INDEX).any()):  # an all-ignore image tells nothing
                feature_rows.append(presence_features(grid_pixels(logits[row: row + 1, :, :height, :width],
                                                                  PRESENCE_GRID_PIXELS)).cpu())
                presence_rows.append(label_presence(labels[row: row + 1, :height, :width], logits.shape[1]))
        flat_logits = logits.permute(0, 2, 3, 1).reshape(logits.shape[0], -1, logits.shape[1]).cpu()
        flat_labels = labels.reshape(labels.shape[0], -1)
        for row, name in enumerate(names):
            valid = torch.nonzero(flat_labels[row] != IGNORE_INDEX).squeeze(1)
            order = keyed_generator(seed, CALIBRATION_PIXELS, name_key(name)).permutation(len(valid))
            chosen = valid[torch.from_numpy(order[:pixels_per_image])]
            logit_rows.append(flat_logits[row, chosen])
            label_rows.append(flat_labels[row, chosen])
    return LabelledSample(torch.cat(logit_rows), torch.cat(label_rows), torch.cat(feature_rows),
                          torch.cat(presence_rows))
