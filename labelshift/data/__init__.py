"""Datasets in their real on-disk layouts (GTA5, SYNTHIA, Cityscapes), joint transforms and safe image I/O.

The dataset classes take explicit arguments; ``labelshift.build`` turns configs into them. The synthetic world generator lives in
``labelshift.data.world`` and is imported only by those who need it.
"""
from __future__ import annotations

from labelshift.data.cityscapes import CityscapesDataset
from labelshift.data.gta5 import GTA5Dataset
from labelshift.data.io import (DatasetError, LabelMaps, SegmentationFileDataset, Transform, read_image,
                                read_label_ids, write_palette_png, write_png_atomic)
from labelshift.data.synthia import SynthiaDataset
from labelshift.data.transforms import IMAGENET_MEAN, IMAGENET_STD, SegmentationTransform, build_transforms


__all__ = [
    "CityscapesDataset", "DatasetError", "GTA5Dataset", "IMAGENET_MEAN", "IMAGENET_STD", "LabelMaps",
    "SegmentationFileDataset", "SegmentationTransform", "SynthiaDataset", "Transform", "build_transforms", "read_image", "read_label_ids", "write_palette_png",
    "write_png_atomic",
]
