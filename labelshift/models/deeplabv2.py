"""DeepLabV2: a dilated ResNet (output stride 8) and the ASPP-v2 classifier, as in FADA / the reference code.

The module layout makes ``state_dict`` keys read ``backbone.<torchvision ResNet key>`` (``conv1``, ``bn1``,
``layer1`` .. ``layer4``) and ``head.conv2d_list.{0..3}.{weight,bias}``, which is exactly the reference
checkpoint layout after its ``feature_extractor`` / ``classifier`` split (see :mod:`.checkpoint`).

Frozen batch norm uses ``torchvision.ops.FrozenBatchNorm2d`` with ``eps=0`` by default: the reference's own
frozen BN computes ``weight * running_var.rsqrt()`` with no epsilon, so this default reproduces its logits
bit for bit.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from functools import partial
from typing import Callable, Sequence

import torch
import torchvision
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from labelshift.models import register_model
from labelshift.models.base import BackboneHeadSegmenter
from labelshift.models.checkpoint import CheckpointError, load_state_dict_checked, read_state_dict

ASPP_DILATIONS: tuple[int, ...] = (6, 12, 18, 24)
RESNET_STAGES: tuple[str, ...] = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
_RESNETS: dict[int, tuple[Callable[..., torchvision.models.ResNet], str]] = {
    50: (torchvision.models.resnet50, "ResNet50_Weights"),
    101: (torchvision.models.resnet101, "ResNet101_Weights"),
}

Pretrained = None | str | os.PathLike


class ASPPV2(nn.Module):
    """DeepLab-v2 ASPP classifier: the SUM of parallel dilated 3x3 convolutions straight to class logits.

    ``features: (N, C, h, w) -> logits: (N, K, h, w)``. Weights start at N(0, 0.01), biases at 0.
    """

    def __init__(self, in_channels: int, num_classes: int, dilations: Sequence[int] = ASPP_DILATIONS) -> None:
        super().__init__()
        self.conv2d_list = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, kernel_size=3, stride=1, padding=d, dilation=d, bias=True)
            for d in dilations
        )
        for conv in self.conv2d_list:
            nn.init.normal_(conv.weight, mean=0.0, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) -> (N, K, h, w); branches are added in order 0, 1, 2, 3 like the reference."""
        out = self.conv2d_list[0](features)
        for conv in self.conv2d_list[1:]:
            out = out + conv(features)
        return out


class DeepLabV2(BackboneHeadSegmenter):
    """DeepLabV2-ResNet: ``forward(x: (N, 3, H, W)) -> logits (N, K, ceil(H/8), ceil(W/8))``, not upsampled.

    Args:
        num_classes: K, the number of output classes.
        depth: ResNet depth, 50 or 101.
        frozen_bn: replace every ``BatchNorm2d`` by ``FrozenBatchNorm2d`` (statistics and affine terms are
            buffers: nothing to train, identical in train and eval mode).
        frozen_bn_eps: epsilon of the frozen BN; 0 matches the reference implementation exactly.
        classifier: ``classifier(in_channels, num_classes) -> head`` (default: :class:`ASPPV2`; the reference's
            modified ASPP is :class:`labelshift.models.modified_aspp.ModifiedASPP`).
        pretrained: ``None`` (random init), ``"imagenet"`` (torchvision's IMAGENET1K_V1 weights: needs the
            download or torch hub's cache) or a path to a local torchvision-format ResNet state dict
            (``fc.*`` is ignored; every other backbone key must match).
    """

    feature_channels: int = 2048
    output_stride: int = 8

    def __init__(
        self,
        num_classes: int,
        depth: int = 101,
        frozen_bn: bool = False,
        frozen_bn_eps: float = 0.0,
        pretrained: Pretrained = None,
        classifier: Callable[[int, int], nn.Module] = ASPPV2,
    ) -> None:
        super().__init__()
        if depth not in _RESNETS:
            raise ValueError(f"unsupported ResNet depth {depth}; choose one of {sorted(_RESNETS)}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.depth = depth
        self.frozen_bn = frozen_bn
        norm_layer = partial(FrozenBatchNorm2d, eps=frozen_bn_eps) if frozen_bn else nn.BatchNorm2d
        build_resnet = _RESNETS[depth][0]
        resnet = build_resnet(weights=None, replace_stride_with_dilation=[False, True, True], norm_layer=norm_layer)
        self.backbone = nn.Sequential(OrderedDict((name, getattr(resnet, name)) for name in RESNET_STAGES))
        self.head = classifier(self.feature_channels, num_classes)
        if pretrained is not None:
            self.load_pretrained_backbone(pretrained)

    def load_pretrained_backbone(self, pretrained: Pretrained) -> None:
        """Load ImageNet (``"imagenet"``) or local torchvision-format ResNet weights into the backbone."""
        if isinstance(pretrained, str) and pretrained == "imagenet":
            state, source = self._imagenet_state_dict(), f"torchvision {_RESNETS[self.depth][1]}.IMAGENET1K_V1"
        else:
            state, _, _ = read_state_dict(pretrained)
            source = os.fspath(pretrained)
        if not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{source}: expected a flat state dict of tensors (torchvision ResNet format)")
        backbone_state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        load_state_dict_checked(self.backbone, backbone_state, source=source)

    def _imagenet_state_dict(self) -> dict[str, torch.Tensor]:
        weights = getattr(torchvision.models, _RESNETS[self.depth][1]).IMAGENET1K_V1
        try:
            return weights.get_state_dict(progress=False, weights_only=True)
        except Exception as exc:  # network errors come in many types (URLError, OSError, HTTPError ...)
            raise RuntimeError(
                f"could not fetch ImageNet weights {weights.url} ({type(exc).__name__}: {exc}); "
                "without internet, put the file in torch hub's cache "
                f"({torch.hub.get_dir()}/checkpoints) or pass pretrained=<path to a local ResNet state dict>"
            ) from exc


@register_model("deeplabv2_resnet101")
def deeplabv2_resnet101(num_classes: int, **kwargs) -> DeepLabV2:
    """DeepLabV2 with a dilated ResNet-101 (the reference model). kwargs: see :class:`DeepLabV2`."""
    return DeepLabV2(num_classes, depth=101, **kwargs)


@register_model("deeplabv2_resnet50")
def deeplabv2_resnet50(num_classes: int, **kwargs) -> DeepLabV2:
    """DeepLabV2 with a dilated ResNet-50. kwargs: see :class:`DeepLabV2`."""
    return DeepLabV2(num_classes, depth=50, **kwargs)
