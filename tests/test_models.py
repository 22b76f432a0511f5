"""DeepLabV2 models and checkpoint I/O, including parity with reference (FADA-structured) checkpoints."""
from __future__ import annotations

import hashlib
import os
import re
from functools import partial

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops import FrozenBatchNorm2d

from labelshift.models import create_model, deeplabv2, load_checkpoint, save_checkpoint
from labelshift.models.checkpoint import (
    CheckpointError,
    checkpoint_sha256,
    read_checkpoint_metadata,
    read_state_dict,
)
from labelshift.models.deeplabv2 import ASPPV2, DeepLabV2

IMAGE_SIZE = 65  # -> 9x9 logits at output stride 8


class PickledObject:
    """A non-tensor object: ``torch.load(weights_only=True)`` must refuse to rebuild it."""

    def __init__(self) -> None:
        self.payload = [1, 2, 3]


class TinySeg(nn.Module):
    """A small model with the same ``backbone`` / ``head`` split as DeepLabV2 (for fast generic tests)."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Conv2d(8, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


class RefFeatureExtractor(nn.Module):
    """FADA's ``resnet_feature_extractor``: dilated ResNet-101 in an IntermediateLayerGetter, frozen BN."""

    def __init__(self, bn_eps: float = 0.0) -> None:
        super().__init__()
        resnet = torchvision.models.resnet101(
            weights=None, replace_stride_with_dilation=[False, True, True],
            norm_layer=partial(FrozenBatchNorm2d, eps=bn_eps),
        )
        self.backbone = IntermediateLayerGetter(resnet, return_layers={"layer4": "out"})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)["out"]


class RefClassifier(nn.Module):
    """FADA's ``ASPP_Classifier_V2``: four dilated 3x3 convs summed in place."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.conv2d_list = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, 3, stride=1, padding=d, dilation=d, bias=True) for d in (6, 12, 18, 24)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2d_list[0](x)
        for i in range(len(self.conv2d_list) - 1):
            out += self.conv2d_list[i + 1](x)
        return out


def _randomise_(module: nn.Module, gen: torch.Generator) -> None:
    """Draw every weight and BN buffer afresh, at scales that keep activations O(1) through 33 blocks."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.normal_(0.0, (1.0 / fan_in) ** 0.5, generator=gen)
                if m.bias is not None:
                    m.bias.normal_(0.0, 0.1, generator=gen)
            elif isinstance(m, (FrozenBatchNorm2d, nn.BatchNorm2d)):
                m.weight.uniform_(0.3, 0.8, generator=gen)
                m.bias.normal_(0.0, 0.1, generator=gen)
                m.running_mean.normal_(0.0, 0.1, generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)


@pytest.fixture(scope="module")
def fada_reference(tmp_path_factory):
    """A randomised FADA-structured model, its DDP-style checkpoint file and its logits on a fixed input."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    feature_extractor, classifier = RefFeatureExtractor(bn_eps=0.0), RefClassifier(2048, 19)
    _randomise_(feature_extractor, gen)
    _randomise_(classifier, gen)
    with torch.no_grad():
        for conv in classifier.conv2d_list:
            conv.weight.mul_(10.0)  # logits O(10): BN epsilon (0 vs 1e-5) then shows above atol=1e-5
    feature_extractor.eval(), classifier.eval()
    checkpoint = {
        "iteration": 40000,
        "feature_extractor": {"module." + k: v for k, v in feature_extractor.state_dict().items()},
        "classifier": {"module." + k: v for k, v in classifier.state_dict().items()},
    }
    assert not any("num_batches_tracked" in k for k in checkpoint["feature_extractor"])
    path = tmp_path_factory.mktemp("fada") / "g2c_adv.pth"
    torch.save(checkpoint, path)
    x = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen)
    with torch.no_grad():
        logits_eps0 = classifier(feature_extractor(x))
        for m in feature_extractor.modules():
            if isinstance(m, FrozenBatchNorm2d):
                m.eps = 1e-5  # what nn.BatchNorm2d computes in eval mode
        logits_eps5 = classifier(feature_extractor(x))
    return {"path": path, "x": x, "logits_eps0": logits_eps0, "logits_eps5": logits_eps5}


@pytest.mark.parametrize("depth", [50, 101])
def test_output_stride_shapes_and_parameter_groups(depth):
    torch.manual_seed(0)
    model = create_model(f"deeplabv2_resnet{depth}", 7).eval()
    assert isinstance(model, DeepLabV2) and model.num_classes == 7 and model.model_name == f"deeplabv2_resnet{depth}"
    x = torch.randn(1, 3, 41, 33)
    with torch.no_grad():
        features = model.forward_features(x)
        logits = model(x)
        assert features.shape == (1, 2048, 6, 5)  # ceil(41 / 8), ceil(33 / 8)
        assert logits.shape == (1, 7, 6, 5)
        torch.testing.assert_close(logits, model.forward_head(features), rtol=0, atol=0)
    backbone_ids = {id(p) for p in model.backbone_parameters()}
    head_ids = {id(p) for p in model.head_parameters()}
    assert backbone_ids.isdisjoint(head_ids)
    assert backbone_ids | head_ids == {id(p) for p in model.parameters()}
    assert len(head_ids) == 8


def test_state_dict_keys_follow_torchvision_and_reference_names():
    model = deeplabv2.deeplabv2_resnet50(num_classes=5)
    resnet = torchvision.models.resnet50(weights=None, replace_stride_with_dilation=[False, True, True])
    expected = {"backbone." + k for k in resnet.state_dict() if not k.startswith("fc.")}
    expected |= {f"head.conv2d_list.{i}.{p}" for i in range(4) for p in ("weight", "bias")}
    assert set(model.state_dict()) == expected


def test_aspp_head_init_and_dilations():
    torch.manual_seed(0)
    head = ASPPV2(2048, 19)
    assert [conv.dilation for conv in head.conv2d_list] == [(6, 6), (12, 12), (18, 18), (24, 24)]
    assert [conv.padding for conv in head.conv2d_list] == [(6, 6), (12, 12), (18, 18), (24, 24)]
    weights = torch.cat([conv.weight.flatten() for conv in head.conv2d_list])
    assert abs(weights.std().item() - 0.01) < 1e-3 and abs(weights.mean().item()) < 1e-3
    assert all(torch.count_nonzero(conv.bias) == 0 for conv in head.conv2d_list)


def test_frozen_bn_has_no_trainable_bn_parameters():
    torch.manual_seed(0)
    model = create_model("deeplabv2_resnet50", 4, frozen_bn=True)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    frozen = [m for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert len(frozen) == 53 and all(m.eps == 0.0 for m in frozen)
    trainable = {name for name, _ in model.named_parameters()}
    assert all(name.endswith("conv1.weight") or name.endswith("conv2.weight") or name.endswith("conv3.weight")
               or name.endswith("downsample.0.weight") or name.startswith("head.") for name in trainable)
    assert not any("num_batches_tracked" in k for k in model.state_dict())
    x = torch.randn(1, 3, 33, 33)
    with torch.no_grad():
        torch.testing.assert_close(model.train()(x), model.eval()(x), rtol=0, atol=0)


def test_reference_checkpoint_gives_identical_logits_with_frozen_bn(fada_reference):
    torch.manual_seed(123)
    model = create_model("deeplabv2_resnet101", 19, frozen_bn=True).eval()
    state, _, fmt = read_state_dict(fada_reference["path"])
    assert fmt == "fada"
    assert set(state) == set(model.state_dict())  # zero missing, zero unexpected
    metadata = load_checkpoint(model, fada_reference["path"])
    assert metadata == {"format": "fada", "extra_keys": ["iteration"], "iteration": 40000}
    with torch.no_grad():
        logits = model(fada_reference["x"])
    assert logits.shape == (1, 19, 9, 9)
    assert logits.abs().max() > 0.1
    torch.testing.assert_close(logits, fada_reference["logits_eps0"], rtol=0, atol=1e-5)


def test_reference_checkpoint_into_batchnorm_model_fills_num_batches_tracked(fada_reference):
    torch.manual_seed(123)
    model = create_model("deeplabv2_resnet101", 19)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.num_batches_tracked.fill_(0)
    load_checkpoint(model, fada_reference["path"])
    counters = [v for k, v in model.state_dict().items() if k.endswith("num_batches_tracked")]
    assert len(counters) == 104 and all(int(c) == 0 for c in counters)
    with torch.no_grad():
        logits = model.eval()(fada_reference["x"])
    torch.testing.assert_close(logits, fada_reference["logits_eps5"], rtol=0, atol=1e-5)
    gap = (fada_reference["logits_eps5"] - fada_reference["logits_eps0"]).abs().max()
    assert gap > 1e-5  # the comparison is sharp enough to tell BN epsilon 1e-5 from the reference's 0


def _save_tiny_state(tmp_path, state, name="ckpt.pt"):
    path = tmp_path / name
    torch.save(state, path)
    return path


def test_unexpected_key_is_named(tmp_path):
    state = TinySeg().state_dict() | {"head.extra": torch.zeros(1)}
    path = _save_tiny_state(tmp_path, state)
    message = (f"{path}: checkpoint does not match the model (TinySeg): "
               "0 missing key(s); 1 unexpected key(s) [head.extra]")
    with pytest.raises(CheckpointError, match=re.escape(message)):
        load_checkpoint(TinySeg(), path)


def test_missing_key_is_named(tmp_path):
    state = {k: v for k, v in TinySeg().state_dict().items() if k != "head.bias"}
    path = _save_tiny_state(tmp_path, state)
    message = "checkpoint does not match the model (TinySeg): 1 missing key(s) [head.bias]; 0 unexpected key(s)"
    with pytest.raises(CheckpointError, match=re.escape(message)):
        load_checkpoint(TinySeg(), path)


def test_long_key_lists_are_truncated_with_counts(tmp_path):
    state = TinySeg().state_dict() | {f"extra.{i}": torch.zeros(1) for i in range(12)}
    path = _save_tiny_state(tmp_path, state)
    with pytest.raises(CheckpointError, match=r"12 unexpected key\(s\) \[extra\.0, .*extra\.9, \.\.\.\]") as info:
        load_checkpoint(TinySeg(), path)
    assert "extra.10" not in str(info.value)


def test_shape_mismatch_names_key_and_both_shapes(tmp_path):
    path = _save_tiny_state(tmp_path, TinySeg(num_classes=5).state_dict())
    message = (f"{path}: shape mismatch in 2 tensor(s): 'head.weight': checkpoint (5, 8, 1, 1) vs model (3, 8, 1, 1);"
               " 'head.bias': checkpoint (5,) vs model (3,)")
    with pytest.raises(CheckpointError, match=re.escape(message)):
        load_checkpoint(TinySeg(num_classes=3), path)


def test_corrupt_file_is_rejected(tmp_path):
    path = tmp_path / "corrupt.pth"
    path.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                   dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(CheckpointError, match=re.escape(f"{path}: not a valid checkpoint (")):
        load_checkpoint(TinySeg(), path)


def test_truncated_checkpoints_are_rejected(tmp_path):
    ours = save_checkpoint(TinySeg(), tmp_path / "ours.safetensors")
    plain = _save_tiny_state(tmp_path, TinySeg().state_dict(), "plain.pt")
    for path in (ours, plain):
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        with pytest.raises(CheckpointError, match=re.escape(f"{path}: not a valid checkpoint (")):
            load_checkpoint(TinySeg(), path)


def test_pickled_object_is_refused_by_weights_only(tmp_path):
    path = _save_tiny_state(tmp_path, {"head.weight": torch.zeros(3, 8, 1, 1), "note": PickledObject()})
    message = (f"{path}: not a valid checkpoint (rejected by the safe loader torch.load(weights_only=True): "
               f"Unsupported global: GLOBAL {__name__}.PickledObject")
    with pytest.raises(CheckpointError, match=re.escape(message)):
        load_checkpoint(TinySeg(), path)


def test_non_state_dict_contents_are_rejected(tmp_path):
    listed = _save_tiny_state(tmp_path, [torch.zeros(1)], "list.pt")
    message = f"{listed}: not a valid checkpoint (holds a list, not a dict)"
    with pytest.raises(CheckpointError, match=re.escape(message)):
        load_checkpoint(TinySeg(), listed)
    mixed = _save_tiny_state(tmp_path, {"step": 3, "weights": torch.zeros(1)}, "mixed.pt")
    pattern = r"neither a state dict of tensors .* top-level keys: \['step', 'weights'\]"
    with pytest.raises(CheckpointError, match=pattern):
        load_checkpoint(TinySeg(), mixed)
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_checkpoint(TinySeg(), tmp_path / "absent.pt")


def test_reference_format_errors_name_mapped_keys(tmp_path):
    model = TinySeg()
    fe = {"module." + k: v for k, v in model.state_dict().items() if k.startswith("backbone.")}
    cls = {"module.weight": model.head.weight.detach(), "module.extra": torch.zeros(1)}
    path = _save_tiny_state(tmp_path, {"feature_extractor": fe, "classifier": cls})
    message = "1 missing key(s) [head.bias]; 1 unexpected key(s) [head.extra]"
    with pytest.raises(CheckpointError, match=re.escape(message)):
        load_checkpoint(TinySeg(), path)


def test_plain_ddp_state_dict_loads(tmp_path):
    torch.manual_seed(0)
    source = TinySeg()
    path = _save_tiny_state(tmp_path, {"module." + k: v for k, v in source.state_dict().items()})
    target = TinySeg()
    assert load_checkpoint(target, path) == {"format": "state_dict"}
    for key, value in source.state_dict().items():
        torch.testing.assert_close(target.state_dict()[key], value, rtol=0, atol=0)


def test_our_format_round_trip_with_metadata(tmp_path):
    torch.manual_seed(0)
    model = create_model("deeplabv2_resnet50", 4)
    with torch.no_grad():
        model.train()(torch.randn(2, 3, 33, 33))  # move BN running statistics and counters off their defaults
    metadata = {
        "class_names": ["road", "sidewalk", "building", "wall"],
        "config": {"model": {"name": "deeplabv2_resnet50"}, "train": {"lr": 2.5e-4, "iters": 10}},
        "priors": {"source": [0.4, 0.3, 0.2, 0.1], "kind": "image"},
    }
    path = save_checkpoint(model, tmp_path / "model.safetensors", metadata)
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]  # no temporary file left behind
    expected = {"model_name": "deeplabv2_resnet50", "num_classes": 4, **metadata}
    assert read_checkpoint_metadata(path) == expected
    fresh = create_model("deeplabv2_resnet50", 4)
    assert load_checkpoint(fresh, path) == expected
    x = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), model.eval()(x), rtol=0, atol=0)
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_save_overwrites_atomically_and_hash_matches(tmp_path):
    path = tmp_path / "tiny.safetensors"
    save_checkpoint(TinySeg(), path, {"step": 1})
    save_checkpoint(TinySeg(), path, {"step": 2})
    assert read_checkpoint_metadata(path) == {"num_classes": 3, "step": 2}
    assert sorted(os.listdir(tmp_path)) == ["tiny.safetensors"]
    assert checkpoint_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(ValueError, match="not JSON-serialisable"):
        save_checkpoint(TinySeg(), path, {"bad": object()})
    assert read_checkpoint_metadata(path)["step"] == 2


def test_metadata_of_a_foreign_file_is_an_error(tmp_path):
    path = _save_tiny_state(tmp_path, TinySeg().state_dict())
    with pytest.raises(CheckpointError, match="not a labelshift"):
        read_checkpoint_metadata(path)


def test_pretrained_from_local_torchvision_state_dict(tmp_path):
    torch.manual_seed(0)
    resnet = torchvision.models.resnet50(weights=None)
    _randomise_(resnet, torch.Generator().manual_seed(2))
    path = _save_tiny_state(tmp_path, resnet.state_dict(), "resnet50.pth")
    model = DeepLabV2(3, depth=50, frozen_bn=True, pretrained=path)
    reference = resnet.state_dict()
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, reference[key]), key
    broken = {k: v for k, v in reference.items() if k != "layer4.2.bn3.running_var"}
    broken_path = _save_tiny_state(tmp_path, broken, "broken.pth")
    with pytest.raises(CheckpointError, match=re.escape("1 missing key(s) [layer4.2.bn3.running_var]")):
        DeepLabV2(3, depth=50, pretrained=broken_path)


def test_imagenet_weights_unavailable_gives_clear_error(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torchvision.models.ResNet50_Weights, "get_state_dict", offline)
    with pytest.raises(RuntimeError, match=r"could not fetch ImageNet weights .*pretrained=<path"):
        DeepLabV2(3, depth=50, pretrained="imagenet")


def test_invalid_constructor_arguments():
    with pytest.raises(ValueError, match="unsupported ResNet depth 34"):
        DeepLabV2(3, depth=34)
    with pytest.raises(ValueError, match="num_classes must be >= 1"):
        DeepLabV2(0)


def test_small_model_checkpoints_in_every_format(tmp_path):
    torch.manual_seed(0)
    model = create_model("small", 5).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    ours = save_checkpoint(model, tmp_path / "small.safetensors", {"class_names": list("abcde")})
    state = model.state_dict()
    fada = _save_tiny_state(tmp_path, {
        "feature_extractor": {"module." + k: v for k, v in state.items() if k.startswith("backbone.")},
        "classifier": {"module." + k[len("head."):]: v for k, v in state.items() if k.startswith("head.")},
    }, "small_fada.pth")
    for path in (ours, fada):
        fresh = create_model("small", 5).eval()
        load_checkpoint(fresh, path)
        with torch.no_grad():
            torch.testing.assert_close(fresh(x), expected, rtol=0, atol=0)
    assert read_checkpoint_metadata(ours) == {"model_name": "small", "num_classes": 5, "class_names": list("abcde")}
