"""Builders: the only place that turns an :class:`ExperimentConfig` into library objects."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Literal

import torch
from torch import nn
from torch.utils.data import DataLoader

from labelshift.classes import ClassSet, get_class_set
from labelshift.config import ConfigError, DataConfig, DatasetConfig, ExperimentConfig
from labelshift.data import CityscapesDataset, GTA5Dataset, SynthiaDataset, build_transforms
from labelshift.data.io import SegmentationFileDataset, Transform, collate_eval
from labelshift.data.transforms import SegmentationTransform
from labelshift.models import create_model, load_checkpoint


def class_set_of(cfg: ExperimentConfig) -> ClassSet:
    return get_class_set(cfg.data.class_set)


def _create(cfg: ExperimentConfig, *, pretrained: str | None, frozen_bn: bool) -> nn.Module:
    kwargs = {"frozen_bn": frozen_bn, "pretrained": pretrained}
    if cfg.model.name == "small":
        kwargs["width"] = cfg.model.width
    model = create_model(cfg.model.name, class_set_of(cfg).num_classes, **kwargs)
    model.align_corners = cfg.model.align_corners
    return model


def build_model(cfg: ExperimentConfig, checkpoint: str | Path | None = None, *, fresh: bool = False) -> nn.Module:
    """The configured model; loads ``checkpoint`` (or ``cfg.model.checkpoint`` unless ``fresh``) strictly."""
    path = checkpoint if checkpoint is not None else (None if fresh else cfg.model.checkpoint)
    # ImageNet/backbone weights only initialise a model that no checkpoint will overwrite
    model = _create(cfg, pretrained=None if path is not None else cfg.model.pretrained, frozen_bn=cfg.model.frozen_bn)
    if path is not None:
        load_checkpoint(model, path, class_set_of(cfg).names)
    return model


def build_student(cfg: ExperimentConfig, adapted_checkpoint: str | Path | None) -> nn.Module:
    """The self-distillation student: the adapted model (``train.distill.init: adapted``) or a fresh model with
    ``student_pretrained`` weights and ``student_frozen_bn`` (``init: fresh``, the reference recipe)."""
    distill = cfg.train.distill
    if distill.init == "adapted":
        return build_model(cfg, adapted_checkpoint)
    return _create(cfg, pretrained=distill.student_pretrained, frozen_bn=distill.student_frozen_bn)


def eval_subsets(cfg: ExperimentConfig) -> dict[str, list[int]]:
    """Class subsets reported beside the full mIoU: ``eval.subset`` as ``miou_subset``, and for synthia16 the
    13 classes of the published mIoU* as ``miou_13``."""
    from labelshift.classes import miou13_names

    class_set = class_set_of(cfg)
    subsets = {}
    if cfg.data.class_set == "synthia16":
        subsets["13"] = class_set.subset_indices(miou13_names())
    if cfg.eval.subset is not None:
        subsets["subset"] = class_set.subset_indices(list(cfg.eval.subset))
    return subsets


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
                         keep_label_size: bool | None = None,
                         size: tuple[int, int] | None = None) -> SegmentationTransform:
    """The transform for ``domain`` images: resize to the domain's ``size`` (or ``size`` when given, for
    evaluation); when ``train``, resize to its ``base_size`` instead and add its crop, scale range, flip, colour
    jitter and hue. ``keep_label_size`` defaults to ``not train`` (evaluation is at full label resolution)."""
    if domain not in ("source", "target"):
        raise ValueError(f"domain must be 'source' or 'target', got {domain!r}")
    aug = data_cfg.source_transform if domain == "source" else data_cfg.target_transform
    if not train:
        return build_transforms(train=False, size=size or aug.size, mean=data_cfg.mean, std=data_cfg.std,
                                keep_label_size=True if keep_label_size is None else keep_label_size,
                                interpolation=data_cfg.interpolation)
    return build_transforms(train=True, size=aug.size, crop_size=aug.crop_size, scale_range=aug.scale_range,
                            flip=aug.flip, color_jitter=aug.color_jitter, mean=data_cfg.mean, std=data_cfg.std,
                            keep_label_size=bool(keep_label_size), base_size=aug.base_size, hue=aug.hue,
                            interpolation=data_cfg.interpolation)

def build_split(cfg: ExperimentConfig, which: str, *, train: bool, with_labels: bool = True,
                pseudo_label_dir: str | None = None, seed: int = 0, size: tuple[int, int] | None = None):
    """A dataset of the experiment: ``which`` in source | source_val | target | target_val.

    Training transforms (crop, scale, flip, jitter) when ``train``; else resize to the model input (the
    domain's size, or ``size``) with the label kept at full resolution.
    """
    ds_cfg: DatasetConfig | None = getattr(cfg.data, which)
    if ds_cfg is None:
        raise ConfigError(f"the configuration has no data.{which} split")
    domain = "source" if which.startswith("source") else "target"
    transform = build_transforms_for(cfg.data, domain, train, size=size)
    return build_dataset(ds_cfg, class_set_of(cfg), transform, with_labels=with_labels, seed=seed,
                         pseudo_label_dir=pseudo_label_dir)


def image_folder(cfg: ExperimentConfig, directory: str | Path) -> SegmentationFileDataset:
    """Every ``*.png`` under ``directory`` (sorted) as unlabelled target images with the evaluation transform;
    names are the file stems without Cityscapes' ``_leftImg8bit`` (batch prediction of any image folder)."""
    from labelshift.data.io import DatasetError

    paths = sorted(Path(directory).rglob("*.png"))
    if not paths:
        raise DatasetError(f"image directory {directory} contains no *.png images")
    names = [path.name.removesuffix(".png").removesuffix("_leftImg8bit") for path in paths]
    return SegmentationFileDataset([(path, None) for path in paths], names, class_set_of(cfg),
                                   build_transforms_for(cfg.data, "target", train=False), "gray", None)


def eval_loader(cfg: ExperimentConfig, which: str, *, with_labels: bool = True, max_images: int | None = None,
                size: tuple[int, int] | None = None) -> DataLoader:
    """Evaluation batches of split ``which`` at the model input ``size`` (default: the domain's size)."""
    dataset = build_split(cfg, which, train=False, with_labels=with_labels, size=size)
    if max_images is not None and max_images < len(dataset):
        dataset = torch.utils.data.Subset(dataset, range(max_images))
    return DataLoader(dataset, batch_size=cfg.eval.batch_size, shuffle=False, num_workers=cfg.data.num_workers,
                      collate_fn=collate_eval)


def world_root_of(cfg: ExperimentConfig) -> Path:
    """The embedded world lives one level above the source root (``<world>/gta5``, ``<world>/cityscapes``)."""
    return Path(cfg.data.source.root).parent


def amp_dtype_of(cfg: ExperimentConfig, device: torch.device) -> torch.dtype | None:
    """bf16 for evaluation passes on CUDA when ``eval.amp_bf16`` (as training does), else None (fp32)."""
    return torch.bfloat16 if cfg.eval.amp_bf16 and device.type == "cuda" else None


def ensure_world(cfg: ExperimentConfig, log: Callable[[str], None] = print) -> Path | None:
    """Generate the configured embedded world (a no-op when the same world is already there; replaced when it
    differs); returns its root, or None when the config reads datasets from disk."""
    if cfg.data.world is None:
        return None
    from labelshift.data.world import generate_world, read_world_manifest

    root = world_root_of(cfg)
    if read_world_manifest(root) is None:
        log(f"[world] generating the embedded world in {root}")
    generate_world(root, **cfg.data.world.model_dump(exclude_none=True), overwrite=True)
    return root
