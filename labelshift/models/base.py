"""The split every segmenter here follows (as in timm): ``forward_features`` then ``forward_head``.

Classifier Refinement runs the feature extractor frozen and trains only the head, so the split and the two
parameter groups (the reference recipe gives the head 10x the base learning rate) live in one place.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn


class BackboneHeadSegmenter(nn.Module):
    """A segmenter made of ``self.backbone`` (images -> features) and ``self.head`` (features -> logits).

    Subclasses build both modules and set ``output_stride``; ``forward`` returns raw logits at
    ``ceil(H / output_stride) x ceil(W / output_stride)``, never upsampled (see
    :func:`labelshift.models.upsample_logits`).
    """

    backbone: nn.Module
    head: nn.Module
    output_stride: int
    align_corners: bool = False  # how callers upsample the logits (labelshift.models.align_corners_of)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (N, 3, H, W) -> features (N, C, ceil(H/s), ceil(W/s)), s = ``output_stride``."""
        return self.backbone(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Features (N, C, h, w) -> logits (N, K, h, w)."""
        return self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (N, 3, H, W) -> raw logits (N, K, ceil(H/s), ceil(W/s))."""
        return self.forward_head(self.forward_features(x))

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the feature extractor (the base learning rate in the reference recipe)."""
        return self.backbone.parameters()

    def head_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the classifier head (10x the base learning rate; the only ones CR trains)."""
        return self.head.parameters()
