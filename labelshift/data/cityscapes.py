"""Cityscapes on disk: ``<root>/leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png`` and
``<root>/gtFine/<split>/<city>/<stem>_gtFine_labelIds.png`` (stem e.g. ``aachen_000000_000019``).

Label ids map to trainIds through the class set's Cityscapes lookup table (19 or 16 classes). Pseudo labels
(``<pseudo_label_dir>/<stem>.png``, single-channel uint8 trainIds) are read as they are.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from labelshift.classes import ClassSet, cityscapes19
from labelshift.data.io import (DatasetError, SegmentationFileDataset, Transform, index_images, pair_labels,
                                require_directory, resolve_list_path, select_images)

CITYSCAPES_LAYOUT = ("Cityscapes layout: <root>/leftImg8bit/<split>/<city>/*_leftImg8bit.png and "
                     "<root>/gtFine/<split>/<city>/*_gtFine_labelIds.png")
IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"


def _split_image_dir(root: Path, split: str) -> Path:
    image_root = require_directory(root / "leftImg8bit", "Cityscapes image directory", CITYSCAPES_LAYOUT)
    split_dir = image_root / split
    if not split_dir.is_dir():
        present = sorted(path.name for path in image_root.iterdir() if path.is_dir())
        raise DatasetError(f"Cityscapes split {split!r} not found: {split_dir} does not exist "
                           f"(splits present: {present})")
    return split_dir


def _label_source(label_dir: Path, class_set: ClassSet, with_labels: bool, pseudo_label_dir: str | Path | None
                  ) -> tuple[Callable[[str, Path], Path] | None, np.ndarray | None]:
    """(stem, image path) -> label path, and the id -> trainId table (``None``: labels are trainIds already)."""
    if not with_labels:
        return None, None
    if pseudo_label_dir is None:
        return (lambda stem, image_path: label_dir / image_path.parent.name / f"{stem}{LABEL_SUFFIX}",
                class_set.cityscapes_id_lut())
    pseudo_dir = Path(pseudo_label_dir)
    if not pseudo_dir.is_dir():
        raise DatasetError(f"pseudo-label directory {pseudo_dir} does not exist; expected "
                           "<pseudo_label_dir>/<stem>.png (single-channel uint8 trainIds)")
    return (lambda stem, image_path: pseudo_dir / f"{stem}.png"), None


class CityscapesDataset(SegmentationFileDataset):
    """Cityscapes images of one split with labels as (H, W) int64 trainIds of ``class_set`` (255 = ignore).

    ``pseudo_label_dir``: read labels from ``<pseudo_label_dir>/<stem>.png`` (trainIds) instead of gtFine.
    ``list_file``: optional text file of stems or file names (relative: against ``root``); default: the whole
    split, sorted by city and name.
    """

    dataset_name = "Cityscapes"

    def __init__(self, root: str | Path, split: str, transform: Transform, class_set: ClassSet | None = None,
                 with_labels: bool = True, pseudo_label_dir: str | Path | None = None,
                 list_file: str | Path | None = None, seed: int = 0) -> None:
        root = Path(root)
        require_directory(root, "Cityscapes root", CITYSCAPES_LAYOUT)
        image_dir = _split_image_dir(root, split)
        images = index_images(image_dir, f"*/*{IMAGE_SUFFIX}", IMAGE_SUFFIX, "Cityscapes")
        list_path = resolve_list_path(list_file, root) if list_file is not None else None
        selected = select_images(images, list_path, lambda stem: image_dir / stem.rsplit("_", 2)[0]
                                 / f"{stem}{IMAGE_SUFFIX}", IMAGE_SUFFIX)
        class_set = class_set or cityscapes19()
        label_path_of, label_lut = _label_source(root / "gtFine" / split, class_set, with_labels, pseudo_label_dir)
        super().__init__(
            files=pair_labels("Cityscapes", selected, label_path_of), names=[stem for stem, _ in selected],
            class_set=class_set, transform=transform, label_kind="gray", label_lut=label_lut, seed=seed,
        )
        self.root = root
        self.split = split
