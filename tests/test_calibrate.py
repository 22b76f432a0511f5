"""Temperature scaling and BCTS; IA in the calibrated space through the effective source prior."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from labelshift.adjust import adjust_logits
from labelshift.calibrate import Calibration, fit_calibration
from labelshift.estimate import estimate_prior
from labelshift.priors import ClassPrior, prior_l1

NAMES = ("a", "b", "c", "d", "e")


def _calibrated_data(num_samples: int = 6000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """True logits (N, 5) and labels drawn from softmax(true logits): calibrated by construction."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_samples, len(NAMES), generator=generator, dtype=torch.float64) * 2
    labels = torch.multinomial(torch.softmax(logits, dim=1), 1, generator=generator).squeeze(1)
    return logits, labels


def test_temperature_recovers_an_over_confident_scale():
    logits, labels = _calibrated_data()
    calibration = fit_calibration(logits * 3, labels, method="temperature")
    assert calibration.temperature == pytest.approx(3.0, rel=0.1)
    np.testing.assert_array_equal(calibration.bias, np.zeros(5))
    assert calibration.method == "temperature"
    assert calibration.metrics["nll_after"] < calibration.metrics["nll_before"]
    assert calibration.metrics["num_samples"] == 6000


def test_bcts_recovers_an_added_bias():
    logits, labels = _calibrated_data(num_samples=10_000, seed=1)
    added_bias = torch.tensor([1.0, -0.5, 0.0, 0.8, -1.3], dtype=torch.float64)
    calibration = fit_calibration(logits * 2 + added_bias, labels, method="bcts")
    assert calibration.temperature == pytest.approx(2.0, rel=0.1)
    expected_bias = -(added_bias / 2 - (added_bias / 2).mean()).numpy()  # centred: softmax ignores constants
    np.testing.assert_allclose(calibration.bias, expected_bias, atol=0.1)
    assert calibration.bias.mean() == pytest.approx(0.0, abs=1e-9)


def test_fit_on_segmentation_maps_skips_ignored_pixels():
    logits, labels = _calibrated_data(num_samples=4 * 30 * 20, seed=2)
    maps = (logits * 3).view(4, 30, 20, 5).permute(0, 3, 1, 2).float()  # (B, K, H, W)
    label_maps = labels.view(4, 30, 20).clone()
    label_maps[:, :5] = 255
    calibration = fit_calibration(maps, label_maps, method="temperature")
    assert calibration.temperature == pytest.approx(3.0, rel=0.15)
    assert calibration.metrics["num_samples"] == 4 * 25 * 20
    with pytest.raises(ValueError, match="all labels ignored"):
        fit_calibration(maps, torch.full_like(label_maps, 255))
    with pytest.raises(ValueError, match="unknown calibration method"):
        fit_calibration(maps, label_maps, method="platt")


def test_none_is_the_identity_and_apply_broadcasts_along_dim():
    logits, labels = _calibrated_data(num_samples=100)
    identity = fit_calibration(logits, labels, method="none")
    assert identity.temperature == 1.0 and torch.equal(identity.apply(logits), logits)
    calibration = Calibration(2.0, np.array([0.1, 0.2, 0.3, 0.4, 0.5]), method="bcts")
    rows = calibration.apply(logits.float())
    torch.testing.assert_close(rows, (logits.float() / 2 + torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5])))
    maps = logits[:12].T.reshape(1, 5, 3, 4)
    torch.testing.assert_close(calibration.apply(maps).reshape(5, 12).T, calibration.apply(logits[:12]))
    channels_last = calibration.apply(logits[:12].reshape(3, 4, 5), dim=-1)
    torch.testing.assert_close(channels_last.reshape(12, 5), calibration.apply(logits[:12]))
    assert calibration.apply(logits.half()).dtype == torch.float16
    with pytest.raises(ValueError, match="5 classes"):
        calibration.apply(torch.zeros(2, 4))


def test_effective_source_prior_equals_ia_on_calibrated_logits():
    calibration = Calibration(1.7, np.array([0.4, -0.2, 0.1, -0.6, 0.3]), method="bcts")
    source = ClassPrior(NAMES, [0.4, 0.25, 0.15, 0.15, 0.05], "pixel", provenance={"estimator": "exact"})
    target = ClassPrior(NAMES, [0.1, 0.2, 0.3, 0.2, 0.2], "pixel")
    effective = calibration.effective_source_prior(source)
    expected = source.probs * np.exp(-calibration.bias)
    np.testing.assert_allclose(effective.probs, expected / expected.sum(), atol=1e-15)
    assert effective.kind == "pixel" and effective.classes == NAMES
    assert effective.provenance["base_provenance"] == {"estimator": "exact"}
    logits = torch.randn(3, 5, 4, 4, dtype=torch.float64) * 3
    direct = adjust_logits(calibration.apply(logits), source, target)  # z/T + b − log π_s + log π_t
    through_prior = adjust_logits(logits, effective, target, temperature=calibration.temperature)
    torch.testing.assert_close(torch.softmax(through_prior, 1), torch.softmax(direct, 1), atol=1e-12, rtol=0)
    difference = direct - through_prior  # equal up to one constant (the normaliser of π_s·e^{−b})
    torch.testing.assert_close(difference, torch.full_like(difference, difference.flatten()[0].item()))
    vector = calibration.effective_source_prior(np.array([4, 2.5, 1.5, 1.5, 0.5]))
    np.testing.assert_allclose(vector, effective.probs, atol=1e-15)


def test_calibration_dict_round_trip_and_validation():
    calibration = Calibration(2.5, np.array([0.5, -0.5]), method="bcts", metrics={"nll_after": 0.3})
    restored = Calibration.from_dict(calibration.to_dict())
    assert restored.temperature == 2.5 and restored.method == "bcts" and restored.metrics == {"nll_after": 0.3}
    np.testing.assert_array_equal(restored.bias, [0.5, -0.5])
    with pytest.raises(ValueError, match="not a calibration document"):
        Calibration.from_dict({"temperature": 1.0, "bias": [0.0], "shift": 1})
    with pytest.raises(ValueError, match="temperature must be positive"):
        Calibration(0.0, np.zeros(2))
    assert Calibration.identity(3).apply(torch.ones(1, 3)).tolist() == [[1.0, 1.0, 1.0]]


def test_fit_on_a_seeded_subset():
    logits, labels = _calibrated_data(num_samples=8000, seed=3)
    calibration = fit_calibration(logits * 3, labels, method="temperature", max_samples=3000, seed=5)
    again = fit_calibration(logits * 3, labels, method="temperature", max_samples=3000, seed=5)
    assert calibration.metrics["num_samples"] == 3000 and calibration.temperature == again.temperature
    assert calibration.temperature == pytest.approx(3.0, rel=0.15)


GAUSSIAN_MEANS = np.array([[0.0, 0.0], [3.0, 0.0], [0.0, 3.0], [3.0, 3.0]])
SOURCE_PRIOR, TARGET_PRIOR = np.array([0.4, 0.3, 0.2, 0.1]), np.array([0.1, 0.2, 0.3, 0.4])


def _gaussian_sample(rng: np.random.Generator, prior: np.ndarray, size: int,
                     spread: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.permutation(np.repeat(np.arange(4), np.round(prior * size).astype(int)))
    return GAUSSIAN_MEANS[labels] * spread + rng.standard_normal((len(labels), 2)), labels


def _log_source_posterior(points: np.ndarray, spread: float = 1.0) -> np.ndarray:
    log_joint = -0.5 * ((points[:, None, :] - GAUSSIAN_MEANS[None] * spread) ** 2).sum(-1) + np.log(SOURCE_PRIOR)
    return log_joint - np.logaddexp.reduce(log_joint, axis=1, keepdims=True)


def test_em_on_bcts_calibrated_probabilities_takes_the_plain_source_prior():
    """Calibrated posteriors embody π_s itself; π_s·e^{−b} is only for adjusting raw logits."""
    rng = np.random.default_rng(3)
    distortion = np.array([1.0, -0.5, 0.3, -0.8])

    def raw_logits(points):  # an over-confident, biased model of the exact source posterior
        return torch.from_numpy(2.0 * _log_source_posterior(points) + distortion)

    source_points, source_labels = _gaussian_sample(rng, SOURCE_PRIOR, 50_000)
    target_points, _ = _gaussian_sample(rng, TARGET_PRIOR, 50_000)
    calibration = fit_calibration(raw_logits(source_points), torch.from_numpy(source_labels), method="bcts")
    calibrated = torch.softmax(calibration.apply(raw_logits(target_points)), dim=1)
    source = ClassPrior(("w", "x", "y", "z"), SOURCE_PRIOR, "pixel")
    plain = estimate_prior(calibrated, "em", source_prior=source, bootstrap=0)
    effective = estimate_prior(calibrated, "em", source_prior=calibration.effective_source_prior(source), bootstrap=0)
    uncalibrated = estimate_prior(torch.softmax(raw_logits(target_points), 1), "em", source_prior=source, bootstrap=0)
    assert prior_l1(plain, TARGET_PRIOR) < 0.02
    assert prior_l1(effective, TARGET_PRIOR) > 3 * prior_l1(plain, TARGET_PRIOR)
    assert prior_l1(uncalibrated, TARGET_PRIOR) > 3 * prior_l1(plain, TARGET_PRIOR)


@pytest.mark.parametrize("space", ["raw", "calibrated"])
def test_pipeline_ia_space(space):
    """``adjust.space``: raw logits against the exact source prior, or the calibrated space of pixel priors."""
    from labelshift.adjust import ia_transform
    from labelshift.config import AdjustConfig
    from labelshift.priors import SourcePriors

    logits = torch.randn(3, len(NAMES), 4, 4, dtype=torch.float64)
    calibration = Calibration(0.8, np.array([0.3, -0.2, 0.0, 0.1, -0.4]), method="bcts")
    priors = {"source_pixel": ClassPrior(NAMES, [0.4, 0.3, 0.1, 0.1, 0.1], "pixel"),
              "source_calibrated": ClassPrior(NAMES, [0.2, 0.2, 0.2, 0.2, 0.2], "pixel"),
              "source_image": ClassPrior(NAMES, [0.9, 0.8, 0.5, 0.3, 0.1], "image")}
    target = ClassPrior(NAMES, [0.1, 0.1, 0.2, 0.3, 0.3], "pixel")
    source = SourcePriors(priors["source_pixel"], priors["source_image"], priors["source_calibrated"])
    adjusted = ia_transform(AdjustConfig(space=space), source, target, calibration)(logits)
    log_target = torch.log(torch.tensor(target.probs)).view(1, -1, 1, 1)
    if space == "raw":
        expected = logits - torch.log(torch.tensor(priors["source_pixel"].probs)).view(1, -1, 1, 1) + log_target
    else:
        expected = (calibration.apply(logits) - torch.log(torch.tensor(priors["source_calibrated"].probs)).view(1, -1, 1, 1)
                    + log_target)
    torch.testing.assert_close(adjusted.softmax(1), expected.softmax(1), rtol=0, atol=1e-9)
    image_target = ClassPrior(NAMES, [0.5, 0.5, 0.5, 0.5, 0.5], "image")
    image_adjusted = ia_transform(AdjustConfig(space=space), source, image_target, calibration)(logits)  # raw always
    torch.testing.assert_close(image_adjusted.softmax(1), adjust_logits(logits, priors["source_image"], image_target).softmax(1))


def test_anchored_bcts_without_ridge_is_bcts_with_the_sample_mix_moved_to_the_training_prior():
    """ridge 0: softmax(z/T + d) under π_train is BCTS's softmax(z/T + b) under the sample's mix, re-weighted."""
    logits, labels = _calibrated_data(num_samples=8000, seed=4)
    training = np.array([0.3, 0.25, 0.2, 0.15, 0.1])
    distorted = logits * 2 + torch.tensor([0.5, 0.0, -0.4, 0.2, -0.3], dtype=torch.float64)
    plain = fit_calibration(distorted, labels, method="bcts")
    anchored = fit_calibration(distorted, labels, method="bcts_anchored", training_prior=training, ridge=0.0)
    mix = np.bincount(labels.numpy(), minlength=5) / len(labels)
    assert anchored.method == "bcts_anchored" and anchored.metrics["ridge"] == 0.0
    assert anchored.temperature == pytest.approx(plain.temperature, rel=1e-5)
    moved = torch.softmax(anchored.apply(distorted) + torch.from_numpy(np.log(mix / training)), 1)
    np.testing.assert_allclose(moved.numpy(), torch.softmax(plain.apply(distorted), 1).numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="training_prior"):
        fit_calibration(distorted, labels, method="bcts_anchored")


def test_anchored_bcts_keeps_a_class_the_calibration_sample_barely_holds():
    """A calibrated model (trained under π_s) checked on a sample holding 6 pixels of class z: BCTS's bias and
    EM's ratio q/π_cal then rest on those 6 pixels; the anchored fit leaves z's bias near 0, so EM under π_s
    recovers the target prior."""
    rng = np.random.default_rng(5)
    calibration_mix = np.array([0.45, 0.35, 0.1997, 0.0003])
    sample_points, sample_labels = _gaussian_sample(rng, calibration_mix, 20_000, spread=2.0)
    target_points, _ = _gaussian_sample(rng, TARGET_PRIOR, 50_000, spread=2.0)
    sample_logits = torch.from_numpy(_log_source_posterior(sample_points, spread=2.0))
    target_logits = torch.from_numpy(_log_source_posterior(target_points, spread=2.0))
    source = ClassPrior(("w", "x", "y", "z"), SOURCE_PRIOR, "pixel")
    anchored = fit_calibration(sample_logits, torch.from_numpy(sample_labels), "bcts_anchored", training_prior=source)
    plain = fit_calibration(sample_logits, torch.from_numpy(sample_labels), "bcts")
    assert np.bincount(sample_labels, minlength=4)[3] == 6
    assert np.abs(anchored.bias).max() < 0.5 and plain.bias[3] < -6  # BCTS: z's bias absorbs the sample's mix
    sample_mix = ClassPrior.from_counts(source.classes, np.bincount(sample_labels, minlength=4), "pixel")
    estimate = estimate_prior(torch.softmax(anchored.apply(target_logits), 1), "em", source_prior=source, bootstrap=0)
    plain_estimate = estimate_prior(torch.softmax(plain.apply(target_logits), 1), "em", source_prior=sample_mix,
                                    bootstrap=0)
    assert prior_l1(estimate, TARGET_PRIOR) < 0.002
    assert prior_l1(plain_estimate, TARGET_PRIOR) > 4 * prior_l1(estimate, TARGET_PRIOR)
