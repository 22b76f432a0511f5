"""GTA5 on disk: ``<root>/images/NNNNN.png`` and ``<root>/labels/NNNNN.png``.

Labels are 8-bit palette PNGs whose indices are Cityscapes label ids; they map to trainIds through the class
set's Cityscapes lookup table (19 classes by default).
"""
from __future__ import annotations

from pathlib import Path

from labelshift.classes import ClassSet, cityscapes19
from labelshift.data.io import SegmentationFileDataset, Transform, flat_layout_pairs, require_directory

GTA5_LAYOUT = "GTA5 layout: <root>/images/*.png and <root>/labels/*.png"


class GTA5Dataset(SegmentationFileDataset):
    """GTA5 images with labels as (H, W) int64 trainIds of ``class_set`` (255 = ignore).

    ``list_file``: optional text file of stems or file names, one per line (a relative path resolves against
    ``root``); default: every image, sorted. File pairs are checked at construction, decoded on access.
    """

    dataset_name = "GTA5"

    def __init__(self, root: str | Path, transform: Transform, list_file: str | Path | None = None,
                 with_labels: bool = True, class_set: ClassSet | None = None, seed: int = 0) -> None:
        root = Path(root)
        require_directory(root, "GTA5 root", GTA5_LAYOUT)
        image_dir = require_directory(root / "images", "GTA5 image directory", GTA5_LAYOUT)
        files, names = flat_layout_pairs("GTA5", root, image_dir, root / "labels", GTA5_LAYOUT, list_file,
                                         with_labels)
        class_set = class_set or cityscapes19()
        super().__init__(
            files=files, names=names, class_set=class_set, transform=transform, label_kind="palette",
            label_lut=class_set.cityscapes_id_lut(), seed=seed,
        )
        self.root = root
