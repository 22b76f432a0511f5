"""``pseudo.decide_at``: where a pseudo label's argmax and confidence are taken (the model input, then nearest
up to the label; or the label resolution, as the reference does), on a teacher with fixed logits."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import PROJECT
from labelshift.classes import ClassSet
from labelshift.config import load_config
from labelshift.pseudo import TeacherSettings, pseudo_settings, teacher_outputs

TWO_CLASSES = ClassSet("two", ("left", "right"), ((0, 0, 0), (255, 255, 255)), (0, 1))


class FixedTeacher(torch.nn.Module):
    """Logits (1, 2, 1, 2) whatever the input: class 0 at (4, 0), class 1 at (0, 1) over the two columns."""

    align_corners = False

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.tensor([[[[4.0, 0.0]], [[0.0, 1.0]]]]).expand(images.shape[0], -1, -1, -1)


def _decided(decide_at: str) -> tuple[list[int], list[int]]:
    """(label, confidence) of one image whose model input is 1x2 (the logit grid) and whose label is 1x4."""
    chunk = {"name": ["only"], "image": np.zeros((1, 3, 1, 2), np.float32), "image_size": np.array([[1, 4]]),
             "failed": []}
    settings = TeacherSettings(TWO_CLASSES, decide_at=decide_at, soft_dir=None)
    out = teacher_outputs(FixedTeacher(), chunk, settings, torch.device("cpu"))
    return out["label"][0][0].tolist(), out["confidence"][0][0].tolist()


def test_decided_at_the_input_each_logit_column_is_repeated_to_the_label():
    """argmax (0, 1) and max softmax (0.982, 0.731) at the 1x2 input, each column copied twice."""
    assert _decided("input") == ([0, 0, 1, 1], [250, 250, 186, 186])


def test_decided_at_the_label_the_argmax_is_taken_on_bilinearly_upsampled_logits():
    """Bilinear (align_corners=False) to 1x4 samples the columns at 0, 0.25, 0.75, 1: the logits there are
    (4, 0), (3, 0.25), (1, 0.75), (0, 1), so the third pixel is class 0 (1 > 0.75) with max softmax 0.562."""
    expected_confidence = [round(255 / (1 + np.exp(-gap))) for gap in (4.0, 2.75, 0.25, 1.0)]
    assert expected_confidence == [250, 240, 143, 186]
    assert _decided("label") == ([0, 0, 0, 1], expected_confidence)


@pytest.mark.parametrize("recipe, decide_at", [("gta5_reference", "label"), ("synthia_reference", "label"),
                                               ("gta5_ours", "input"), ("synthia_ours", "input")])
def test_the_recipes_pass_their_decide_at_to_the_pseudo_label_pass(recipe, decide_at):
    cfg = load_config(PROJECT / "configs" / "recipes" / f"{recipe}.yaml", [])
    assert pseudo_settings(cfg).decide_at == decide_at
