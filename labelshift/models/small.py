"""A small segmentation CNN for the embedded world: trains on two CPU cores in minutes.

Layout (``w`` = ``width``; every conv is 3x3 + BatchNorm + ReLU unless noted)::

    stem     3 -> w, stride 2;  w -> w                       (H/2, W/2)
    down     w -> 2w, stride 2; 2w -> 2w                      (H/4, W/4)
    context  residual blocks of 2w channels, dilation 2, 4, 8  (H/4, W/4), receptive field ~ 130 px
    head     3x3 conv 2w -> 2w + ReLU, 1x1 conv 2w -> K (no BatchNorm: a plain classifier)

``forward(x)`` returns raw logits at output stride 4; callers upsample them with
:func:`labelshift.models.upsample_logits`. The head has its own capacity (a hidden 3x3 layer) so that
Classifier Refinement, which retrains only the head on frozen features, can move decisions.
"""
from __future__ import annotations

import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from labelshift.models import register_model
from labelshift.models.base import BackboneHeadSegmenter

CONTEXT_DILATIONS: tuple[int, ...] = (2, 4, 8)


def _conv_bn_relu(in_channels: int, out_channels: int, norm: type[nn.Module], stride: int = 1,
                  dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
        norm(out_channels),
        nn.ReLU(inplace=True),
    )


class _DilatedResidual(nn.Module):
    """``x + relu(bn(conv_d(x)))``: widens the receptive field without changing the resolution."""

    def __init__(self, channels: int, dilation: int, norm: type[nn.Module]) -> None:
        super().__init__()
        self.body = _conv_bn_relu(channels, channels, norm, dilation=dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class SmallHead(nn.Module):
    """Classifier: features (N, C, h, w) -> logits (N, K, h, w) through one hidden 3x3 layer."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.hidden = nn.Conv2d(in_channels, in_channels, 3, padding=1)
        self.classifier = nn.Conv2d(in_channels, num_classes, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.relu(self.hidden(features)))


class SmallSegNet(BackboneHeadSegmenter):
    """Stride-4 CNN of ~0.2 M parameters at ``width=32``; see the module docstring for the layout.

    Args:
        num_classes: K, the number of output logits per pixel.
        width: channels of the first stage (the later stages use ``2 * width``).
        frozen_bn: use ``FrozenBatchNorm2d`` (fixed statistics and affine terms) instead of ``BatchNorm2d``.
    """

    output_stride: int = 4

    def __init__(self, num_classes: int, width: int = 32, frozen_bn: bool = False) -> None:
        super().__init__()
        if num_classes < 1 or width < 1:
            raise ValueError(f"num_classes and width must be positive, got {num_classes} and {width}")
        norm = FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d
        self.num_classes = num_classes
        self.frozen_bn = frozen_bn
        self.feature_channels = 2 * width
        self.backbone = nn.Sequential(
            _conv_bn_relu(3, width, norm, stride=2),
            _conv_bn_relu(width, width, norm),
            _conv_bn_relu(width, 2 * width, norm, stride=2),
            _conv_bn_relu(2 * width, 2 * width, norm),
            *(_DilatedResidual(2 * width, d, norm) for d in CONTEXT_DILATIONS),
        )
        self.head = SmallHead(self.feature_channels, num_classes)


@register_model("small")
def small(num_classes: int, width: int = 32, frozen_bn: bool = False, pretrained: None = None) -> SmallSegNet:
    """The registered ``"small"`` model. It has no pretrained weights: ``pretrained`` must be ``None``."""
    if pretrained is not None:
        raise ValueError(f"the 'small' model has no pretrained weights; got pretrained={pretrained!r} "
                         "(use None, or a deeplabv2 model for ImageNet weights)")
    return SmallSegNet(num_classes, width=width, frozen_bn=frozen_bn)
