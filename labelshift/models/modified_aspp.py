"""The reference's second classifier, its "modified ASPP", on the dilated ResNet-101 of :mod:`.deeplabv2`.

The reference README ships FADA checkpoints and Cityscapes prior presets for two heads: the original ASPP-v2
(:class:`~labelshift.models.deeplabv2.ASPPV2`) and a modified ASPP left commented out in its classifier module:

    branches   a 1x1 conv and one 3x3 conv per dilation (6, 12, 18, 24), each 2048 -> 256 channels with bias,
               GroupNorm(32 groups) and ReLU; their outputs concatenated (5 x 256 = 1280 channels)
    bottleneck a squeeze-and-excitation block (reduction 16) over the 1280 channels, a 3x3 conv 1280 -> 256 with
               bias and GroupNorm(32 groups)
    head       Dropout2d(0.1) and a 1x1 conv 256 -> K without bias

Attribute names follow the reference's module (``conv2d_list.<i>.<j>``, ``bottleneck.0.se.<j>``,
``bottleneck.<j>``, ``head.<j>``), so its checkpoints (``classifier`` entry) load strictly as ``head.*``.
Classifier Refinement trains this whole head (``head_parameters()``), the extractor stays frozen.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from labelshift.models import register_model
from labelshift.models.deeplabv2 import ASPP_DILATIONS, DeepLabV2

BRANCH_CHANNELS = 256
GROUP_NORM_GROUPS = 32
SE_REDUCTION = 16
DROPOUT = 0.1


class SqueezeExcitation(nn.Module):
    """Channel gates from global average pooling: ``x: (N, C, h, w) -> x · sigmoid(MLP(mean_hw x))``."""

    def __init__(self, channels: int, reduction: int = SE_REDUCTION) -> None:
        super().__init__()
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.se = nn.Sequential(nn.Linear(channels, channels // reduction), nn.ReLU(inplace=True),
                                nn.Linear(channels // reduction, channels), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gates = self.se(self.global_pool(x).flatten(1))
        return x * gates[:, :, None, None]


def _branch(in_channels: int, kernel_size: int, dilation: int) -> nn.Sequential:
    padding = 0 if kernel_size == 1 else dilation
    return nn.Sequential(
        nn.Conv2d(in_channels, BRANCH_CHANNELS, kernel_size, stride=1, padding=padding, dilation=dilation, bias=True),
        nn.GroupNorm(GROUP_NORM_GROUPS, BRANCH_CHANNELS, affine=True), nn.ReLU(inplace=True))


class ModifiedASPP(nn.Module):
    """``features: (N, C, h, w) -> logits: (N, K, h, w)``: concatenated 1x1 + dilated branches, SE, bottleneck,
    dropout, 1x1 classifier. Convs start Kaiming-normal (fan-in) with zero bias, GroupNorm at (1, 0), the
    classifier at N(0, 0.01)."""

    def __init__(self, in_channels: int, num_classes: int, dilations: Sequence[int] = ASPP_DILATIONS) -> None:
        super().__init__()
        self.conv2d_list = nn.ModuleList([_branch(in_channels, 1, 1)]
                                         + [_branch(in_channels, 3, d) for d in dilations])
        concatenated = BRANCH_CHANNELS * (len(dilations) + 1)
        self.bottleneck = nn.Sequential(
            SqueezeExcitation(concatenated),
            nn.Conv2d(concatenated, BRANCH_CHANNELS, kernel_size=3, stride=1, padding=1, bias=True),
            nn.GroupNorm(GROUP_NORM_GROUPS, BRANCH_CHANNELS, affine=True))
        self.head = nn.Sequential(nn.Dropout2d(DROPOUT), nn.Conv2d(BRANCH_CHANNELS, num_classes, 1, bias=False))
        for module in (*self.conv2d_list.modules(), *self.bottleneck.modules()):
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, a=0, mode="fan_in")
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.GroupNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.head[1].weight, mean=0.0, std=0.01)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) -> (N, K, h, w)."""
        branches = torch.cat([branch(features) for branch in self.conv2d_list], dim=1)
        return self.head(self.bottleneck(branches))


@register_model("deeplabv2_resnet101_modified_aspp")
def deeplabv2_resnet101_modified_aspp(num_classes: int, **kwargs) -> DeepLabV2:
    """The dilated ResNet-101 of DeepLabV2 with the reference's modified ASPP head (kwargs: see DeepLabV2)."""
    return DeepLabV2(num_classes, depth=101, classifier=ModifiedASPP, **kwargs)
