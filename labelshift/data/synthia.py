"""SYNTHIA RAND_CITYSCAPES on disk: ``<root>/RGB/NNNNNNN.png`` and ``<root>/GT/LABELS/NNNNNNN.png``.

Labels are 16-bit 3-channel PNGs with the SYNTHIA class id in the red channel; they map to the 16 classes
shared with Cityscapes through :func:`labelshift.classes.synthia_label_lut` (then to ``class_set`` by name).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from labelshift.classes import IGNORE_INDEX, ClassSet, synthia16, synthia_label_lut
from labelshift.data.io import (DatasetError, SegmentationFileDataset, Transform, flat_layout_pairs,
                                require_directory)

SYNTHIA_LAYOUT = ("SYNTHIA layout: <root>/RGB/*.png and <root>/GT/LABELS/*.png "
                  "(or <root>/RAND_CITYSCAPES/RGB/*.png and <root>/RAND_CITYSCAPES/GT/LABELS/*.png)")


def synthia_lut_for(class_set: ClassSet) -> np.ndarray:
    """(65536,) uint8: SYNTHIA class id -> trainId of ``class_set`` (which must hold the 16 SYNTHIA classes)."""
    synthia_names = synthia16().names
    missing = [name for name in synthia_names if name not in class_set.names]
    if missing:
        raise DatasetError(f"class set {class_set.name!r} lacks the SYNTHIA classes {missing}")
    synthia_to_class_set = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    synthia_to_class_set[: len(synthia_names)] = class_set.subset_indices(synthia_names)
    return synthia_to_class_set[synthia_label_lut()]


def resolve_synthia_root(root: Path) -> Path:
    """``root`` itself when it holds ``RGB/``, else ``root/RAND_CITYSCAPES`` when that holds ``RGB/``."""
    require_directory(root, "SYNTHIA root", SYNTHIA_LAYOUT)
    nested = root / "RAND_CITYSCAPES"
    if not (root / "RGB").is_dir() and (nested / "RGB").is_dir():
        return nested
    return root


class SynthiaDataset(SegmentationFileDataset):
    """SYNTHIA RAND_CITYSCAPES images with labels as (H, W) int64 trainIds of ``class_set`` (default synthia16).

    ``root``: the RAND_CITYSCAPES directory or its parent. ``list_file``: optional text file of stems or file
    names (a relative path resolves against the RAND_CITYSCAPES directory); default: every image, sorted.
    """

    dataset_name = "SYNTHIA"

    def __init__(self, root: str | Path, transform: Transform, list_file: str | Path | None = None,
                 with_labels: bool = True, class_set: ClassSet | None = None, seed: int = 0) -> None:
        root = resolve_synthia_root(Path(root))
        image_dir = require_directory(root / "RGB", "SYNTHIA image directory", SYNTHIA_LAYOUT)
        files, names = flat_layout_pairs("SYNTHIA", root, image_dir, root / "GT" / "LABELS", SYNTHIA_LAYOUT,
                                         list_file, with_labels)
        class_set = class_set or synthia16()
        super().__init__(
            files=files, names=names, class_set=class_set, transform=transform, label_kind="synthia16bit",
            label_lut=synthia_lut_for(class_set), seed=seed,
        )
        self.root = root
