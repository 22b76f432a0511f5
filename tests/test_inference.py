"""`labelshift.inference`: resizing to the model input, views, batching and labels of different sizes."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from labelshift.data.io import collate_eval
from labelshift.inference import evaluate, predict
from labelshift.metrics import ConfusionMatrix
from labelshift.models import create_model, upsample_logits

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("small", 5, width=8).eval()


def test_logits_come_at_the_output_size_and_the_input_is_resized(model):
    images = torch.randn(2, 3, 30, 50)
    logits = predict(model, images, (61, 97), device=CPU)
    assert logits.shape == (2, 5, 61, 97) and logits.dtype == torch.float32
    resized = predict(model, images, (61, 97), device=CPU, input_size=(32, 64))
    by_hand = upsample_logits(model(F.interpolate(images, size=(32, 64), mode="bilinear", align_corners=False)),
                              (61, 97))
    torch.testing.assert_close(resized, by_hand)
    assert not torch.allclose(resized, logits)


def test_flip_and_scales_average_the_views(model):
    images = torch.randn(1, 3, 32, 48)
    size = (32, 48)
    plain = upsample_logits(model(images), size)
    mirrored = upsample_logits(model(images.flip(-1)), size).flip(-1)
    torch.testing.assert_close(predict(model, images, size, device=CPU, flip=True), (plain + mirrored) / 2)
    half = upsample_logits(model(F.interpolate(images, scale_factor=0.5, mode="bilinear", align_corners=False)), size)
    torch.testing.assert_close(predict(model, images, size, device=CPU, scales=(1.0, 0.5)), (plain + half) / 2)


def test_a_batch_predicts_what_its_images_predict_alone(model):
    images = torch.randn(3, 3, 32, 32)
    batched = predict(model, images, (40, 40), device=CPU)
    for row in range(3):
        torch.testing.assert_close(batched[row:row + 1], predict(model, images[row:row + 1], (40, 40), device=CPU),
                                   rtol=1e-5, atol=1e-5)


def test_labels_of_different_sizes_are_scored_at_their_own_size(model):
    rng = np.random.default_rng(0)
    items = []
    for index, (height, width) in enumerate([(40, 60), (44, 60), (40, 62)]):
        items.append({"image": torch.randn(3, 32, 48), "name": f"im{index}",
                      "label": torch.from_numpy(rng.integers(0, 5, (height, width))).long()})
    batch = collate_eval(items)
    assert batch["label"].shape == (3, 44, 62) and batch["label_size"].tolist() == [[40, 60], [44, 60], [40, 62]]
    assert (batch["label"][0, 40:] == 255).all() and (batch["label"][0, :, 60:] == 255).all()
    together = evaluate(model, [batch], 5, device=CPU)["none"]
    one_by_one = ConfusionMatrix(5)
    for item in items:
        logits = predict(model, item["image"][None], tuple(item["label"].shape), device=CPU)
        one_by_one.update(item["label"][None], logits.argmax(1))
    np.testing.assert_array_equal(together.matrix, one_by_one.matrix)
    assert together.matrix.sum() == 40 * 60 + 44 * 60 + 40 * 62
