"""Builders: the only place that turns an :class:`ExperimentConfig` into library objects."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from labelshift.classes import ClassSet, get_class_set
from labelshift.config import ConfigError, DatasetConfig, ExperimentConfig
from labelshift.models import create_model, load_checkpoint


def class_set_of(cfg: ExperimentConfig) -> ClassSet:
    return get_class_set(cfg.data.class_set)


def _create(cfg: ExperimentConfig, *, pretrained: str | None, frozen_bn: bool) -> nn.Module:
    kwargs = {"frozen_bn": frozen_bn, "pretrained": pretrained}
    if cfg.model.name == "small":
        kwargs["width"] = cfg.model.width
    return create_model(cfg.model.name, class_set_of(cfg).num_classes, **kwargs)


def build_model(cfg: ExperimentConfig, checkpoint: str | Path | None = None, *, fresh: bool = False) -> nn.Module:
    """The configured model; loads ``checkpoint`` (or ``cfg.model.checkpoint`` unless ``fresh``) strictly."""
    path = checkpoint if checkpoint is not None else (None if fresh else cfg.model.checkpoint)
    # ImageNet/backbone weights only initialise a model that no checkpoint will overwrite
    model = _create(cfg, pretrained=None if path is not None else cfg.model.pretrained, frozen_bn=cfg.model.frozen_bn)
    if path is not None:
        load_checkpoint(model, path)
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


def build_split(cfg: ExperimentConfig, which: str, *, train: bool, with_labels: bool = True,
                pseudo_label_dir: str | None = None, seed: int = 0):
    """A dataset of the experiment: ``which`` in source | source_val | target | target_val.

    Training transforms (crop, scale, flip, jitter) when ``train``; else resize to the model input with the
    label kept at full resolution.
    """
    from labelshift.data import build_dataset, build_transforms_for

    ds_cfg: DatasetConfig | None = getattr(cfg.data, which)
    if ds_cfg is None:
        raise ConfigError(f"the configuration has no data.{which} split")
    domain = "source" if which.startswith("source") else "target"
    transform = build_transforms_for(cfg.data, domain, train)
    return build_dataset(ds_cfg, class_set_of(cfg), transform, with_labels=with_labels, seed=seed,
                         pseudo_label_dir=pseudo_label_dir)


def eval_loader(cfg: ExperimentConfig, which: str, *, with_labels: bool = True, max_images: int | None = None) -> DataLoader:
    dataset = build_split(cfg, which, train=False, with_labels=with_labels)
    if max_images is not None and max_images < len(dataset):
        dataset = torch.utils.data.Subset(dataset, range(max_images))
    from labelshift.data.io import collate_eval

    return DataLoader(dataset, batch_size=cfg.eval.batch_size, shuffle=False, num_workers=cfg.data.num_workers,
                      collate_fn=collate_eval)


def world_root_of(cfg: ExperimentConfig) -> Path:
    """The embedded world lives one level above the source root (``<world>/gta5``, ``<world>/cityscapes``)."""
    return Path(cfg.data.source.root).parent
