"""A split in chunks: the unit of work of every data pass, in one process or as a row of a Ray Data pipeline.

A chunk is a run of consecutive dataset indices of ``eval.batch_size`` images, decoded into the batch an
evaluation DataLoader (``collate_eval``) would give for them, so that the model sees the same batches, and
computes the same logits, whichever engine runs the pass. Images are decoded with the project's own decoders
(:mod:`labelshift.data.io`: 16-bit SYNTHIA ids and palette labels intact). An image that cannot be read is
reported by name and left out of its chunk; the pass goes on.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from labelshift.classes import IGNORE_INDEX
from labelshift.data.io import DatasetError, SegmentationFileDataset, read_image


def plan_chunks(num_items: int, batch_size: int) -> list[list[int]]:
    """Consecutive index runs of ``batch_size`` (the last may be shorter), in dataset order."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [list(range(start, min(start + batch_size, num_items))) for start in range(0, num_items, batch_size)]


def _decode_item(dataset: SegmentationFileDataset, index: int) -> dict:
    """One evaluation item (as ``dataset[index]``) plus ``image_size``: the (H, W) of the image file."""
    image_path, label_path = dataset.files[index]
    image = read_image(image_path)
    train_ids = dataset.read_train_ids(label_path) if label_path is not None else None
    try:
        rng = np.random.default_rng([dataset.seed, dataset.epoch, index])
        image_tensor, label_tensor = dataset.transform(image, train_ids, rng)
    except DatasetError as err:
        raise DatasetError(f"{image_path}: {err}") from None
    item = {"image": image_tensor, "name": dataset.names[index], "image_size": image.shape[:2]}
    if label_tensor is not None:
        item["label"] = label_tensor.to(torch.uint8)
    return item


def decode_chunk(dataset: SegmentationFileDataset, indices: Sequence[int]) -> dict:
    """Decode ``indices`` of an evaluation dataset into one batch of numpy arrays.

    Returns ``{"image": float32 (B, 3, h, w), "name": [B stems], "image_size": int64 (B, 2) (H, W) of each
    image file, "failed": [{"name", "error"}]}`` and, for a labelled dataset, ``"label": uint8 (B, H, W)``
    trainIds padded with 255 to the largest and ``"label_size": int64 (B, 2)``. Unreadable images are left out
    (B counts the rest) and listed in ``failed``.
    """
    items, failed = [], []
    for index in indices:
        try:
            items.append(_decode_item(dataset, int(index)))
        except (DatasetError, OSError, ValueError) as err:
            failed.append({"name": dataset.names[int(index)], "error": str(err)})
    chunk: dict = {"name": [item["name"] for item in items], "failed": failed,
                   "image_size": np.array([item["image_size"] for item in items], dtype=np.int64).reshape(-1, 2)}
    if items:
        chunk["image"] = torch.stack([item["image"] for item in items]).numpy()
    if items and "label" in items[0]:
        sizes = [tuple(item["label"].shape) for item in items]
        labels = np.full((len(items), max(h for h, _ in sizes), max(w for _, w in sizes)), IGNORE_INDEX, np.uint8)
        for row, item in enumerate(items):
            labels[row, : sizes[row][0], : sizes[row][1]] = item["label"].numpy()
        chunk["label"], chunk["label_size"] = labels, np.array(sizes, dtype=np.int64)
    return chunk


def as_eval_batch(chunk: dict) -> dict:
    """The torch batch ``collate_eval`` gives for a decoded chunk (labels int64), for ``iterate_predictions``."""
    batch = {"image": torch.from_numpy(chunk["image"]), "name": list(chunk["name"])}
    if "label" in chunk:
        batch["label"] = torch.from_numpy(chunk["label"]).long()
        batch["label_size"] = torch.from_numpy(chunk["label_size"])
    return batch
