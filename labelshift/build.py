"""Builders: the only place that turns an :class:`ExperimentConfig` into library objects."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from labelshift.classes import ClassSet, get_class_set
from labelshift.config import DatasetConfig, ExperimentConfig
from labelshift.models import create_model, load_checkpoint


def class_set_of(cfg: ExperimentConfig) -> ClassSet:
    return get_class_set(cfg.data.class_set)


def build_model(cfg: ExperimentConfig, checkpoint: str | Path | None = None, *, fresh: bool = False) -> nn.Module:
    """The configured model; loads ``checkpoint`` (or ``cfg.model.checkpoint`` unless ``fresh``) strictly."""
    kwargs = {"frozen_bn": cfg.model.frozen_bn, "pretrained": cfg.model.pretrained}
    if cfg.model.name == "small":
        kwargs["width"] = cfg.model.width
    model = create_model(cfg.model.name, class_set_of(cfg).num_classes, **kwargs)
    path = checkpoint if checkpoint is not None else (None if fresh else cfg.model.checkpoint)
    if path is not None:
        load_checkpoint(model, path)
    return model


def build_split(cfg: ExperimentConfig, which: str, *, train: bool, with_labels: bool = True,
                pseudo_label_dir: str | None = None, seed: int = 0):
    """A dataset of the experiment: ``which`` in source | source_val | target | target_val.

    Training transforms (crop, scale, flip, jitter) when ``train``; else resize to the model input with the
    label kept at full resolution.
    """
    from labelshift.data import build_dataset, build_transforms_for

    ds_cfg: DatasetConfig | None = getattr(cfg.data, which)
    if ds_cfg is None:
        raise ValueError(f"the configuration has no data.{which} split")
    domain = "source" if which.startswith("source") else "target"
    transform = build_transforms_for(cfg.data, domain, train)
    return build_dataset(ds_cfg, class_set_of(cfg), transform, with_labels=with_labels, seed=seed,
                         pseudo_label_dir=pseudo_label_dir)


def eval_loader(cfg: ExperimentConfig, which: str, *, with_labels: bool = True, max_images: int | None = None) -> DataLoader:
    dataset = build_split(cfg, which, train=False, with_labels=with_labels)
    if max_images is not None and max_images < len(dataset):
        dataset = torch.utils.data.Subset(dataset, range(max_images))
    return DataLoader(dataset, batch_size=cfg.eval.batch_size, shuffle=False, num_workers=cfg.data.num_workers)


def world_root_of(cfg: ExperimentConfig) -> Path:
    """The embedded world lives one level above the source root (``<world>/gta5``, ``<world>/cityscapes``)."""
    return Path(cfg.data.source.root).parent
