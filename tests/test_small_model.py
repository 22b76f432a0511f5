"""The registered "small" segmentation CNN: shapes, the feature/head split, parameter groups, one SGD step."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from labelshift.models import create_model, model_names, upsample_logits
from labelshift.models.small import SmallSegNet

NUM_CLASSES = 19


def _model(**kwargs) -> SmallSegNet:
    torch.manual_seed(0)
    return create_model("small", NUM_CLASSES, width=8, **kwargs)


def test_registered_and_built_with_its_arguments():
    assert "small" in model_names()
    model = _model()
    assert isinstance(model, SmallSegNet)
    assert model.num_classes == NUM_CLASSES and model.model_name == "small"
    assert model.feature_channels == 16


def test_pretrained_weights_are_refused():
    with pytest.raises(ValueError, match="no pretrained weights"):
        create_model("small", NUM_CLASSES, pretrained="imagenet")


@pytest.mark.parametrize("height, width", [(32, 64), (30, 50)])
def test_output_stride_and_shapes(height, width):
    model = _model().eval()
    x = torch.randn(2, 3, height, width)
    features = model.forward_features(x)
    logits = model(x)
    expected = (-(-height // 4), -(-width // 4))
    assert model.output_stride == 4
    assert features.shape == (2, model.feature_channels, *expected)
    assert logits.shape == (2, NUM_CLASSES, *expected)
    assert upsample_logits(logits, (height, width)).shape == (2, NUM_CLASSES, height, width)


def test_forward_is_head_of_features():
    model = _model().eval()
    x = torch.randn(2, 3, 32, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.forward_head(model.forward_features(x)))


def test_head_is_a_trainable_classifier_with_hidden_capacity():
    model = _model()
    head = list(model.head_parameters())
    assert sum(p.numel() for p in head) > model.feature_channels * NUM_CLASSES  # more than one linear layer
    assert all(p.requires_grad for p in head)


@pytest.mark.parametrize("frozen_bn", [False, True])
def test_parameter_groups_partition_the_parameters(frozen_bn):
    model = _model(frozen_bn=frozen_bn)
    backbone = {id(p) for p in model.backbone_parameters()}
    head = {id(p) for p in model.head_parameters()}
    assert backbone and head and not backbone & head
    assert backbone | head == {id(p) for p in model.parameters()}


def test_frozen_bn_has_no_batchnorm_statistics_to_update():
    model = _model(frozen_bn=True).train()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 64))
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key])


def test_one_sgd_step_lowers_the_loss():
    model = _model().train()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 32, 64, generator=generator)
    y = torch.randint(0, NUM_CLASSES, (4, 32, 64), generator=generator)
    y[:, :2] = 255  # ignored pixels
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def loss() -> torch.Tensor:
        return F.cross_entropy(upsample_logits(model(x), (32, 64)), y, ignore_index=255)

    first = loss()
    optimizer.zero_grad()
    first.backward()
    optimizer.step()
    assert loss().item() < first.item()
