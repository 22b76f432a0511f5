"""Segmentation models: ``create_model(name, num_classes, ...)`` over a tiny registry.

Every model returns raw logits at its feature resolution (output stride 8 for DeepLabV2) from
``forward(x)``, and splits into ``forward_features(x) -> features`` and ``forward_head(features) -> logits``
(Classifier Refinement trains only the head). ``backbone_parameters()`` / ``head_parameters()`` give the
two parameter groups (the head trains at 10x the backbone learning rate in the reference recipe).
Callers bring logits to label size with :func:`upsample_logits`.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str):
    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[name] = fn
        return fn

    return wrap


def model_names() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def create_model(name: str, num_classes: int, **kwargs) -> nn.Module:
    """Build a registered model. Unknown names raise ``KeyError`` listing the known ones."""
    _load_builtin()
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; known: {sorted(_REGISTRY)}")
    model = _REGISTRY[name](num_classes=num_classes, **kwargs)
    model.model_name = name
    return model


def upsample_logits(logits: torch.Tensor, size: tuple[int, int], *, align_corners: bool = False) -> torch.Tensor:
    """(N, K, h, w) -> (N, K, H, W) bilinear; ``size`` is (H, W). The one resize used in training and inference.

    ``align_corners``: the model's own setting (:func:`align_corners_of`); FADA and the reference use True.
    """
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=align_corners)


def align_corners_of(model: nn.Module) -> bool:
    """How ``model``'s logits are upsampled to label size (``model.align_corners``, set by the builder from
    ``model.align_corners`` of the config; False for a model that has no such attribute)."""
    return bool(getattr(model, "align_corners", False))


def _load_builtin() -> None:
    from labelshift.models import deeplabv2, modified_aspp, small  # noqa: F401  (registers the built-in models)


from labelshift.models.checkpoint import checkpoint_sha256, load_checkpoint, save_checkpoint  # noqa: E402

__all__ = ["align_corners_of", "create_model", "register_model", "model_names", "upsample_logits", "load_checkpoint",
           "checkpoint_sha256", "save_checkpoint"]
