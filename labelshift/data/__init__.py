"""Datasets in their real on-disk layouts (GTA5, SYNTHIA, Cityscapes), joint transforms and safe image I/O.

Builders read configs; the dataset classes take explicit arguments. The synthetic world generator lives in
``labelshift.data.world`` and is imported only by those who need it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from labelshift.classes import ClassSet
from labelshift.config import DataConfig, DatasetConfig
from labelshift.data.cityscapes import CityscapesDataset
from labelshift.data.gta5 import GTA5Dataset
from labelshift.data.io import (DatasetError, LabelMaps, SegmentationFileDataset, Transform, read_image,
                                read_label_ids, write_palette_png, write_png_atomic)
from labelshift.data.synthia import SynthiaDataset
from labelshift.data.transforms import IMAGENET_MEAN, IMAGENET_STD, SegmentationTransform, build_transforms


def build_dataset(ds_cfg: DatasetConfig, class_set: ClassSet, transform: Transform, with_labels: bool = True,
                  seed: int = 0, pseudo_label_dir: str | Path | None = None) -> SegmentationFileDataset:
    """The dataset ``ds_cfg`` describes (``kind`` gta5 | synthia | cityscapes).

    Cityscapes uses ``ds_cfg.split`` (default ``"train"``) and, when given, ``pseudo_label_dir``.
    GTA5/SYNTHIA select images with ``ds_cfg.list_file``, or with ``ds_cfg.split`` read as a list file when no
    ``list_file`` is given.
    """
    if ds_cfg.kind == "cityscapes":
        return CityscapesDataset(ds_cfg.root, ds_cfg.split or "train", transform, class_set=class_set,
                                 with_labels=with_labels, pseudo_label_dir=pseudo_label_dir,
                                 list_file=ds_cfg.list_file, seed=seed)
    if pseudo_label_dir is not None:
        raise ValueError(f"pseudo_label_dir is for Cityscapes targets, not for a {ds_cfg.kind} dataset")
    list_file = ds_cfg.list_file or ds_cfg.split
    if ds_cfg.kind == "gta5":
        return GTA5Dataset(ds_cfg.root, transform, list_file=list_file, with_labels=with_labels,
                           class_set=class_set, seed=seed)
    if ds_cfg.kind == "synthia":
        return SynthiaDataset(ds_cfg.root, transform, list_file=list_file, with_labels=with_labels,
                              class_set=class_set, seed=seed)
    raise ValueError(f"unknown dataset kind {ds_cfg.kind!r}; known: ['cityscapes', 'gta5', 'synthia']")


def build_transforms_for(data_cfg: DataConfig, domain: Literal["source", "target"], train: bool,
                         keep_label_size: bool | None = None) -> SegmentationTransform:
    """The transform for ``domain`` images: resize to the domain's ``size``; when ``train``, add its
    crop, scale range, flip and colour jitter. ``keep_label_size`` defaults to ``not train``
    (evaluation is at full label resolution)."""
    if domain not in ("source", "target"):
        raise ValueError(f"domain must be 'source' or 'target', got {domain!r}")
    aug = data_cfg.source_transform if domain == "source" else data_cfg.target_transform
    if not train:
        return build_transforms(train=False, size=aug.size, mean=data_cfg.mean, std=data_cfg.std,
                                keep_label_size=True if keep_label_size is None else keep_label_size)
    return build_transforms(train=True, size=aug.size, crop_size=aug.crop_size, scale_range=aug.scale_range,
                            flip=aug.flip, color_jitter=aug.color_jitter, mean=data_cfg.mean, std=data_cfg.std,
                            keep_label_size=bool(keep_label_size))

__all__ = [
    "CityscapesDataset", "DatasetError", "GTA5Dataset", "IMAGENET_MEAN", "IMAGENET_STD", "LabelMaps",
    "SegmentationFileDataset", "SegmentationTransform", "SynthiaDataset", "Transform", "build_dataset",
    "build_transforms", "build_transforms_for", "read_image", "read_label_ids", "write_palette_png",
    "write_png_atomic",
]
