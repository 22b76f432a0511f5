"""adjust_logits / logit_adjusted_cross_entropy: parity with the published vectors and the reference loss."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from labelshift.adjust import adjust_logits, adjusted_probabilities, log_prior_ratio, logit_adjusted_cross_entropy
from labelshift.classes import reference_statistics
from labelshift.priors import ClassPrior, preset

PAIRS = [
    ("gta5_source_image_counts", "cityscapes_from_gta5_deeplabv2",
     "gta5_source_image_counts_19", "cityscapes_estimated_counts_from_gta5_deeplabv2_19"),
    ("synthia_source_image_counts", "cityscapes_from_synthia_modified_aspp",
     "synthia_source_image_counts_16", "cityscapes_estimated_counts_from_synthia_modified_aspp_16"),
]


def _log_normalised(key: str) -> torch.Tensor:
    counts = torch.tensor(reference_statistics()[key], dtype=torch.float64)
    return torch.log(counts / counts.sum())


@pytest.mark.parametrize("source, target, source_key, target_key", PAIRS)
def test_ia_matches_the_reference_formula_on_published_vectors(source, target, source_key, target_key):
    num_classes = len(reference_statistics()[source_key])
    logits = torch.randn(2, num_classes, 5, 7, generator=torch.Generator().manual_seed(0)) * 4
    ours = torch.softmax(adjust_logits(logits, preset(source), preset(target)), dim=1)
    shift = (_log_normalised(target_key) - _log_normalised(source_key)).float().view(1, -1, 1, 1)
    reference = torch.softmax(logits + shift, dim=1)
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=0)
    assert torch.equal(ours.argmax(1), reference.argmax(1))


def test_formula_with_temperature_and_strengths():
    logits = torch.randn(4, 3, dtype=torch.float64)
    source, target = np.array([0.5, 0.3, 0.2]), np.array([0.1, 0.3, 0.6])
    adjusted = adjust_logits(logits, source, target, temperature=1.8, tau_source=0.5, tau_target=2.0)
    expected = logits / 1.8 - 0.5 * torch.log(torch.tensor(source)) + 2.0 * torch.log(torch.tensor(target))
    torch.testing.assert_close(adjusted, expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(log_prior_ratio(source, target, tau_source=0.5, tau_target=2.0),
                               2.0 * torch.log(torch.tensor(target)) - 0.5 * torch.log(torch.tensor(source)))


def test_weights_are_normalised_and_tensors_accepted():
    logits = torch.randn(3, 3)
    by_counts = adjust_logits(logits, [10, 20, 70], torch.tensor([1.0, 1.0, 2.0]))
    by_probs = adjust_logits(logits, np.array([0.1, 0.2, 0.7]), np.array([0.25, 0.25, 0.5]))
    torch.testing.assert_close(by_counts, by_probs, atol=1e-6, rtol=0)


def test_equal_priors_leave_logits_unchanged():
    logits = torch.randn(2, 19, 3, 4)
    prior = preset("gta5_source_image_counts")
    assert torch.equal(adjust_logits(logits, prior, prior), logits)


def test_adjusting_there_and_back_is_the_identity():
    logits = torch.randn(2, 19, 6, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 5
    source, target = preset("gta5_source_image_counts"), preset("cityscapes_from_gta5_modified_aspp")
    there = adjust_logits(logits, source, target)
    back = adjust_logits(there, target, source)
    torch.testing.assert_close(back, logits, atol=1e-12, rtol=0)  # float64: exact up to rounding
    assert not torch.allclose(there, logits, atol=1e-3)


@pytest.mark.parametrize("dtype, atol", [(torch.float16, 2e-2), (torch.bfloat16, 0.1), (torch.float64, 1e-6)])
def test_low_and_high_precision_dtypes(dtype, atol):
    logits = torch.randn(2, 19, 4, 4)
    source, target = preset("gta5_source_image_counts"), preset("cityscapes_from_gta5_deeplabv2")
    adjusted = adjust_logits(logits.to(dtype), source, target)
    assert adjusted.dtype == dtype and adjusted.shape == logits.shape
    torch.testing.assert_close(adjusted.float(), adjust_logits(logits, source, target), atol=atol, rtol=atol)


def test_class_dimension_layouts():
    source, target = np.array([0.7, 0.2, 0.1]), np.array([0.2, 0.3, 0.5])
    pixels = torch.randn(8, 3)
    batch = adjust_logits(pixels, source, target, dim=1)
    single = adjust_logits(pixels[0], source, target, dim=-1)
    torch.testing.assert_close(single, batch[0])
    channels_last = adjust_logits(pixels.view(2, 2, 2, 3), source, target, dim=-1)
    torch.testing.assert_close(channels_last.view(8, 3), batch)
    image = pixels.T.reshape(1, 3, 2, 4)
    torch.testing.assert_close(adjust_logits(image, source, target).reshape(3, 8).T, batch)
    probabilities = adjusted_probabilities(pixels, source, target, dim=1)
    torch.testing.assert_close(probabilities.sum(1), torch.ones(8))


def test_errors_wrong_length_incompatible_priors_bad_temperature():
    logits = torch.randn(2, 19, 3, 3)
    with pytest.raises(ValueError, match="source prior has 16 classes but the logits have 19"):
        adjust_logits(logits, preset("synthia_source_image_counts"), np.ones(16))
    with pytest.raises(ValueError, match="different class sets"):
        adjust_logits(logits, preset("gta5_source_image_counts"), preset("cityscapes_from_synthia_deeplabv2"))
    with pytest.raises(ValueError, match="different kinds"):
        adjust_logits(logits, preset("gta5_pixel_frequency"), preset("cityscapes_from_gta5_deeplabv2"))
    with pytest.raises(ValueError, match="temperature"):
        adjust_logits(logits, np.ones(19), np.ones(19), temperature=0.0)
    with pytest.raises(TypeError, match="floating"):
        adjust_logits(torch.ones(2, 19, dtype=torch.long), np.ones(19), np.ones(19))
    with pytest.raises(ValueError, match="dim 4 is out of range"):
        adjust_logits(logits, np.ones(19), np.ones(19), dim=4)


def _loss_inputs(ignore_fraction: float):
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 19, 8, 8, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 19, (2, 8, 8), generator=generator)
    labels[torch.rand(labels.shape, generator=generator) < ignore_fraction] = 255
    return logits, labels


def test_cr_loss_equals_the_reference_loss_without_ignored_pixels():
    logits, labels = _loss_inputs(0.0)
    source, target = preset("gta5_source_image_counts"), preset("cityscapes_from_gta5_deeplabv2")
    ours = logit_adjusted_cross_entropy(logits, labels, source, target)
    shift = (_log_normalised("gta5_source_image_counts_19")
             - _log_normalised("cityscapes_estimated_counts_from_gta5_deeplabv2_19")).view(1, -1, 1, 1)
    reference = F.cross_entropy(logits + shift, labels, ignore_index=255)
    assert ours.item() == pytest.approx(reference.item(), abs=1e-6)


def test_cr_loss_averages_over_valid_pixels_only():
    logits, labels = _loss_inputs(0.3)
    source, target = preset("gta5_source_image_counts"), preset("cityscapes_from_gta5_deeplabv2")
    ours = logit_adjusted_cross_entropy(logits, labels, source, target)
    shifted = logits + torch.from_numpy(source.log_probs() - target.log_probs()).view(1, -1, 1, 1)
    per_pixel = F.cross_entropy(shifted, labels, ignore_index=255, reduction="none")
    valid = labels != 255
    assert 0 < valid.sum() < valid.numel()
    assert ours.item() == pytest.approx((per_pixel.sum() / valid.sum()).item(), abs=1e-9)
    reference_all_pixel_mean = per_pixel.mean()  # the reference's slip: ignored pixels counted as zeros
    assert ours.item() > reference_all_pixel_mean.item() * 1.2


def test_cr_loss_strength_and_gradient():
    logits, labels = _loss_inputs(0.0)
    source, target = np.linspace(1, 2, 19), np.linspace(2, 1, 19)
    with_tau = logit_adjusted_cross_entropy(logits, labels, source, target, tau=0.5)
    shifted = logits + 0.5 * (torch.log(torch.tensor(source / source.sum()))
                              - torch.log(torch.tensor(target / target.sum()))).view(1, -1, 1, 1)
    assert with_tau.item() == pytest.approx(F.cross_entropy(shifted, labels).item(), abs=1e-9)
    assert logit_adjusted_cross_entropy(logits, labels, source, source).item() == pytest.approx(
        F.cross_entropy(logits, labels).item(), abs=1e-12)


def test_cr_loss_with_no_valid_pixel_is_zero_with_a_gradient():
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    labels = torch.full((1, 2, 2), 255)
    loss = logit_adjusted_cross_entropy(logits, labels, [1, 1, 1], [1, 2, 3])
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_cr_loss_on_pixel_rows():
    logits = torch.randn(6, 3)
    labels = torch.tensor([0, 1, 2, 255, 1, 0])
    prior_a, prior_b = ClassPrior(("a", "b", "c"), [1, 2, 3], "pixel"), ClassPrior(("a", "b", "c"), [3, 2, 1], "pixel")
    loss = logit_adjusted_cross_entropy(logits, labels, prior_a, prior_b)
    shifted = logits + torch.from_numpy(prior_a.log_probs() - prior_b.log_probs()).float()
    assert loss.item() == pytest.approx(F.cross_entropy(shifted, labels, ignore_index=255).item(), abs=1e-6)


def test_the_adjustment_follows_the_logits_device():
    """The (K,) offset is built on the logits' device: a meta tensor (no data, any device semantics) stays meta,
    and on CUDA, when there is one, the result equals the CPU result."""
    source, target = np.full(19, 1 / 19), np.linspace(1, 2, 19) / np.linspace(1, 2, 19).sum()
    meta = adjust_logits(torch.empty(2, 19, 4, 4, device="meta", dtype=torch.bfloat16), source, target)
    assert meta.device.type == "meta" and meta.dtype == torch.bfloat16 and meta.shape == (2, 19, 4, 4)
    if torch.cuda.is_available():
        logits = torch.randn(2, 19, 4, 4)
        torch.testing.assert_close(adjust_logits(logits.cuda(), source, target).cpu(),
                                   adjust_logits(logits, source, target))
