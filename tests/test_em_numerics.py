"""EM never returns NaN: one-hot posteriors of huge (finite) logits, inits with exact zeros, and the bootstrap
over them give finite priors; NaN input is refused with a clear error (issue 12: a random-weight DeepLabV2-R101
reaches |logits| ~1e5, whose float16 cache held inf and whose EM estimate was NaN)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from labelshift.estimate import EMEstimator, em_label_shift

CLASSES = ("road", "car", "sky")


def _one_hot_posteriors(counts: list[int], logit_scale: float) -> np.ndarray:
    """(Σ counts, K) float32 softmax of logits ``logit_scale`` apart: exactly one-hot in float32."""
    labels = np.repeat(np.arange(len(counts)), counts)
    logits = torch.zeros(len(labels), len(counts))
    logits[torch.arange(len(labels)), torch.from_numpy(labels)] = logit_scale
    return logits.softmax(1).numpy()


def test_em_on_one_hot_posteriors_with_a_zero_init_is_the_histogram():
    """The old iteration gave NaN here: class 1 started at exactly 0, its one-hot pixels had zero likelihood."""
    posteriors = _one_hot_posteriors([50, 30, 20], logit_scale=1.6e5)
    assert (posteriors == 0).sum() == 200  # truly one-hot
    estimate, _, converged = em_label_shift(posteriors, np.full(3, 1 / 3), init=np.array([0.9, 0.0, 0.1]))
    assert converged and np.isfinite(estimate).all()
    np.testing.assert_allclose(estimate, [0.5, 0.3, 0.2], atol=1e-9)


def test_em_keeps_absent_classes_at_the_floor_not_zero():
    posteriors = _one_hot_posteriors([70, 30, 0], logit_scale=1e4)
    estimate, _, _ = em_label_shift(posteriors, np.array([0.2, 0.3, 0.5]), init=np.array([0.0, 0.0, 1.0]))
    np.testing.assert_allclose(estimate, [0.7, 0.3, 0.0], atol=1e-9)
    assert estimate[2] > 0 and estimate.sum() == pytest.approx(1.0, abs=1e-12)


def test_em_estimator_on_huge_logits_with_bootstrap_is_finite_and_equals_the_argmax_share():
    """The estimate pass feeds softmax(logits): with |logits| ~1e5 (a random-weight R101) EM must still give the
    argmax share (posteriors one-hot), with a finite bootstrap interval."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 3, 16, 16, generator=generator) * 1.6e5
    estimator = EMEstimator(CLASSES, source_prior=np.full(3, 1 / 3), sample_size=10_000, bootstrap=20, seed=0)
    estimator.update(logits.softmax(1), names=["a", "b", "c", "d"])
    prior = estimator.result()
    shares = np.bincount(logits.argmax(1).flatten().numpy(), minlength=3) / logits[:, 0].numel()
    np.testing.assert_allclose(prior.probs, shares, atol=1e-9)
    interval = prior.provenance["confidence_interval"]
    assert np.isfinite(interval["lower"]).all() and np.isfinite(interval["upper"]).all()


def test_em_refuses_nan_posteriors_and_zero_weights():
    posteriors = _one_hot_posteriors([5, 5, 5], logit_scale=10.0)
    nan_posteriors = torch.tensor([[float("inf"), 0.0, 1.0]]).softmax(1).numpy()  # what an inf logit gives
    with pytest.raises(ValueError, match="posteriors must be finite"):
        em_label_shift(np.concatenate([posteriors, nan_posteriors]), np.full(3, 1 / 3))
    with pytest.raises(ValueError, match="positive sum"):
        em_label_shift(posteriors, np.full(3, 1 / 3), weights=np.zeros(15))
    estimator = EMEstimator(CLASSES, source_prior=np.full(3, 1 / 3), bootstrap=0)
    estimator.update(torch.full((1, 3, 2, 2), float("nan")))
    with pytest.raises(ValueError, match="posteriors must be finite"):
        estimator.result()


def test_em_random_inputs_never_give_nan():
    """Random sizes, logit scales up to 1e6, peaked source priors, Poisson weights and inits with zeros."""
    rng = np.random.default_rng(0)
    for _ in range(300):
        num_classes, num_pixels = int(rng.integers(2, 20)), int(rng.integers(1, 200))
        logits = torch.from_numpy(rng.normal(size=(num_pixels, num_classes)) * 10 ** rng.uniform(-1, 6))
        source = np.maximum(rng.dirichlet(np.full(num_classes, 0.1)), 1e-6)
        weights = rng.poisson(1.0, num_pixels).astype(float) + (np.arange(num_pixels) == 0)
        init = rng.dirichlet(np.full(num_classes, 0.05))
        init[rng.random(num_classes) < 0.3] = 0.0
        init[0] += 1e-3
        estimate, _, _ = em_label_shift(logits.float().softmax(1).numpy(), source / source.sum(), weights=weights,
                                        init=init)
        assert np.isfinite(estimate).all() and estimate.sum() == pytest.approx(1.0, abs=1e-9)
