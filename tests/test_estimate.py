"""Streaming prior estimators: reference parity, recovery under exact label shift, merging, bootstrap."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from labelshift.classes import cityscapes19, reference_statistics
from labelshift.estimate import (
    ESTIMATORS, BBSEEstimator, EMEstimator, bbse_solve, em_label_shift, estimate_prior, make_estimator,
)
from labelshift.priors import ClassPrior, preset, prior_l1

MEANS = np.array([[0.0, 0.0], [3.0, 0.0], [0.0, 3.0], [3.0, 3.0]])
NAMES = ("w", "x", "y", "z")
SOURCE_PRIOR = np.array([0.4, 0.3, 0.2, 0.1])
TARGET_PRIOR = np.array([0.1, 0.2, 0.3, 0.4])


def _sample(rng: np.random.Generator, prior: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Exactly size·prior samples per class from unit Gaussians around MEANS, shuffled: x (N, 2), y (N,)."""
    labels = np.repeat(np.arange(len(prior)), np.round(prior * size).astype(int))
    labels = rng.permutation(labels)
    return MEANS[labels] + rng.standard_normal((len(labels), 2)), labels


def _bayes_posterior(points: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """(N, K) exact p(y|x) under ``prior`` for the Gaussian classes."""
    log_joint = -0.5 * ((points[:, None, :] - MEANS[None]) ** 2).sum(-1) + np.log(prior)
    log_joint -= log_joint.max(axis=1, keepdims=True)
    joint = np.exp(log_joint)
    return joint / joint.sum(axis=1, keepdims=True)


@pytest.fixture(scope="module")
def shifted_data():
    """Source-val posteriors + labels (under π_s) and target posteriors (drawn under π_t), 200k each."""
    rng = np.random.default_rng(7)
    target_points, _ = _sample(rng, TARGET_PRIOR, 200_000)
    source_points, source_labels = _sample(rng, SOURCE_PRIOR, 200_000)
    return (_bayes_posterior(source_points, SOURCE_PRIOR), source_labels,
            _bayes_posterior(target_points, SOURCE_PRIOR))


def _as_images(rows: np.ndarray, num_images: int, height: int, width: int) -> np.ndarray:
    """(N, K) rows -> (num_images, K, height, width), row order preserved within each image."""
    return rows.reshape(num_images, height * width, -1).transpose(0, 2, 1).reshape(num_images, -1, height, width)


def _random_probability_maps(seed: int, batch: int = 3, num_classes: int = 19, size=(12, 20)) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, num_classes, *size, generator=generator) * 3
    logits += torch.randn(batch, num_classes, 1, 1, generator=generator) * 3  # images differ in class mix
    return torch.softmax(logits, dim=1)


def _reference_rule(probability_maps: torch.Tensor, pixel_frequency: list[float]) -> list[int]:
    """A direct re-implementation of the reference rule (test_trainlabelfre.py), one image at a time."""
    counts = [0] * probability_maps.shape[1]
    height, width = probability_maps.shape[2:]
    for output in probability_maps:
        for c in range(len(counts)):
            fre = torch.log(torch.sum(torch.exp(output[c])) / (height * width))
            if fre > pixel_frequency[c]:
                counts[c] += 1
    return counts


def test_reference_estimator_reproduces_the_reference_rule_exactly():
    pixel_frequency = reference_statistics()["gta5_pixel_frequency_19"]
    maps = [_random_probability_maps(seed) for seed in range(4)]
    estimator = make_estimator("reference", cityscapes19(), thresholds=preset("gta5_pixel_frequency"), bootstrap=50)
    for batch in maps:
        estimator.update(batch)
    with pytest.warns(UserWarning, match=r"\['road', 'building'\]"):  # counted in no image: floored
        prior = estimator.result()
    expected = _reference_rule(torch.cat(maps), pixel_frequency)
    assert prior.counts.tolist() == expected
    assert min(expected) == 0 and max(expected) == 12 and len(set(expected)) > 8  # a non-trivial pattern
    assert prior.kind == "image" and prior.provenance["num_images"] == 12
    np.testing.assert_allclose(prior.probs, np.maximum(np.array(expected) / sum(expected), 0), atol=1e-5)


def test_reference_comparison_happens_in_float32_like_the_reference():
    maps = _random_probability_maps(11, batch=2, num_classes=4, size=(5, 6))
    values = [float(torch.log(torch.sum(torch.exp(maps[0, c])) / 30)) for c in range(4)]
    for nudge in (-1e-12, 1e-12):  # below float32 resolution: the reference sees these as equal -> not counted
        thresholds = [v + nudge for v in values]
        estimator = make_estimator("reference", NAMES, thresholds=thresholds, bootstrap=0)
        estimator.update(maps[:1])
        assert estimator.unit_statistics()[0].tolist() == [float(c) for c in _reference_rule(maps[:1], thresholds)]
        assert estimator.unit_statistics()[0].tolist() == [0.0, 0.0, 0.0, 0.0]


def test_count_soft_count_and_presence_on_a_known_map():
    probs = np.zeros((2, 3, 2, 2), dtype=np.float32)
    probs[0, 0] = [[0.6, 0.6], [0.6, 0.1]]
    probs[0, 1] = [[0.4, 0.4], [0.4, 0.1]]
    probs[0, 2, 1, 1] = 0.8
    probs[1, 1] = 1.0
    with pytest.warns(UserWarning, match="zero prior mass"):  # class c is in the counts, but not in presence
        presence = estimate_prior(probs, "presence", classes=("a", "b", "c"), threshold=0.3, bootstrap=0)
    np.testing.assert_array_equal(presence.counts, [1, 1, 0])  # c has 1/4 of image 0: below the threshold
    count = estimate_prior(probs, "count", classes=("a", "b", "c"), bootstrap=0)
    np.testing.assert_array_equal(count.counts, [3, 4, 1])
    np.testing.assert_allclose(count.probs, [3 / 8, 4 / 8, 1 / 8])
    soft = estimate_prior(torch.from_numpy(probs), "soft_count", classes=("a", "b", "c"), bootstrap=0)
    np.testing.assert_allclose(soft.counts, [1.9, 5.3, 0.8], rtol=1e-6)
    assert presence.kind == "image" and count.kind == soft.kind == "pixel"


def test_em_recovers_a_known_prior(shifted_data):
    _, _, target_posteriors = shifted_data
    source = ClassPrior(NAMES, SOURCE_PRIOR, "pixel", provenance={"estimator": "oracle"})
    prior = estimate_prior(target_posteriors, "em", source_prior=source, bootstrap=10)
    assert prior_l1(prior, TARGET_PRIOR) < 0.01
    assert prior_l1(SOURCE_PRIOR, TARGET_PRIOR) == pytest.approx(0.8)
    assert prior.kind == "pixel" and prior.provenance["converged"] and prior.classes == NAMES


def test_em_through_image_batches_and_the_pixel_sample(shifted_data):
    _, _, target_posteriors = shifted_data
    images = _as_images(target_posteriors[:40_000].astype(np.float32), 10, 40, 100)
    whole = make_estimator("em", NAMES, source_prior=SOURCE_PRIOR, sample_size=1_000_000, bootstrap=0)
    for start in range(0, 10, 4):
        whole.update(torch.from_numpy(images[start:start + 4]))
    direct, _, _ = em_label_shift(target_posteriors[:40_000].astype(np.float32), SOURCE_PRIOR)
    np.testing.assert_allclose(whole.result().probs, direct, atol=1e-9)
    sampled = make_estimator("em", NAMES, source_prior=SOURCE_PRIOR, sample_size=5_000, bootstrap=0)
    sampled.update(images[:5])
    sampled.update(images[5:])
    assert len(sampled.sample_keys) == 5_000 and set(np.unique(sampled.sample_units)) == set(range(10))
    assert prior_l1(sampled.result(), direct) < 0.05


@pytest.mark.parametrize("settings", [{}, {"soft": False, "ridge": 0.0}], ids=["soft-ridge", "hard-plain"])
def test_bbse_recovers_a_known_prior(shifted_data, settings):
    """The default (soft confusion, small ridge) and Lipton et al.'s plain hard-confusion BBSE."""
    source_posteriors, source_labels, target_posteriors = shifted_data
    prior = estimate_prior(target_posteriors, "bbse", classes=NAMES, source_probs=source_posteriors,
                           source_labels=source_labels, bootstrap=10, **settings)
    assert prior_l1(prior, TARGET_PRIOR) < 0.01
    assert prior.provenance["source_pixels"] == 200_000 and prior.provenance["confusion_condition_number"] > 1
    assert prior.provenance["soft"] is settings.get("soft", True)


def test_bbse_solve_is_exact_on_an_exact_confusion():
    conditional = np.array([[0.8, 0.15, 0.05], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7]])  # P(ŷ=j | y=i)
    source, target = np.array([0.5, 0.3, 0.2]), np.array([0.2, 0.3, 0.5])
    mean_prediction = target @ conditional
    np.testing.assert_allclose(bbse_solve(conditional * source[:, None], mean_prediction, ridge=0.0), target,
                               atol=1e-12)
    shrunk = bbse_solve(conditional * source[:, None], mean_prediction, ridge=10.0)
    assert prior_l1(shrunk, source) < prior_l1(target, source)  # a large ridge pulls towards w = 1


def _split_and_merge(method: str, batches: list, **kwargs):
    whole = make_estimator(method, NAMES, bootstrap=20, **kwargs)
    left = make_estimator(method, NAMES, bootstrap=20, **kwargs)
    right = make_estimator(method, NAMES, bootstrap=20, **kwargs)
    for index, batch in enumerate(batches):
        whole.update(batch)
        (left if index < len(batches) // 2 else right).update(batch)
    return whole, left.merge(right)


@pytest.mark.parametrize("method, kwargs", [
    ("count", {}), ("soft_count", {}), ("presence", {"threshold": 0.2}),
    ("reference", {"thresholds": [0.05, 0.1, 0.2, 0.3]}),
])
def test_merge_of_halves_equals_the_whole(method, kwargs):
    batches = [_random_probability_maps(seed, batch=2, num_classes=4, size=(6, 8)) for seed in range(4)]
    whole, merged = _split_and_merge(method, batches, **kwargs)
    whole_prior, merged_prior = whole.result(), merged.result()
    np.testing.assert_array_equal(merged_prior.probs, whole_prior.probs)
    np.testing.assert_array_equal(merged_prior.counts, whole_prior.counts)
    assert merged_prior.provenance["confidence_interval"] == whole_prior.provenance["confidence_interval"]
    assert merged_prior.provenance["num_images"] == 8 and merged_prior.provenance["num_pixels"] == 8 * 48


def test_bbse_merge_of_halves_equals_the_whole(shifted_data):
    source_posteriors, source_labels, target_posteriors = shifted_data
    whole, left, right = (BBSEEstimator(NAMES, bootstrap=10) for _ in range(3))
    for part, (start, stop) in enumerate([(0, 3000), (3000, 6000)]):
        for estimator in (whole, left if part == 0 else right):
            estimator.update_source(source_posteriors[start:stop], source_labels[start:stop])
            estimator.update(_as_images(target_posteriors[start:stop], 3, 20, 50))
    merged = left.merge(right).result()
    np.testing.assert_array_equal(merged.probs, whole.result().probs)
    assert merged.provenance["confidence_interval"] == whole.result().provenance["confidence_interval"]


def test_em_merge_of_halves_is_close_to_the_whole(shifted_data):
    _, _, target_posteriors = shifted_data
    images = _as_images(target_posteriors[:60_000], 20, 30, 100)
    whole = EMEstimator(NAMES, source_prior=SOURCE_PRIOR, sample_size=20_000, bootstrap=0)
    left = EMEstimator(NAMES, source_prior=SOURCE_PRIOR, sample_size=20_000, bootstrap=0, seed=1)
    right = EMEstimator(NAMES, source_prior=SOURCE_PRIOR, sample_size=20_000, bootstrap=0, seed=2)
    whole.update(images)
    left.update(images[:10])
    right.update(images[10:])
    merged = left.merge(right)
    assert len(merged.sample_keys) == 20_000
    assert set(np.unique(merged.sample_units[merged.sample_units >= 10])) == set(range(10, 20))
    assert prior_l1(merged.result(), whole.result()) < 0.03


@pytest.mark.parametrize("method", ["count", "soft_count", "em", "bbse", "reference"])
def test_bootstrap_interval_contains_the_point_estimate_and_is_seeded(method, shifted_data):
    source_posteriors, source_labels, target_posteriors = shifted_data
    rows = target_posteriors[:20_000]
    kwargs = {"em": {"source_prior": SOURCE_PRIOR, "sample_size": 5_000},
              "reference": {"thresholds": [0.05, 0.1, 0.2, 0.3]}}.get(method, {})
    estimator = make_estimator(method, NAMES, bootstrap=30, **kwargs)
    if method == "bbse":
        estimator.update_source(source_posteriors[:20_000], source_labels[:20_000])
    if method == "reference":  # the Gaussian posteriors pass every threshold in every image: use varied maps
        estimator.update(_random_probability_maps(3, batch=20, num_classes=4, size=(10, 10)))
    else:
        estimator.update(_as_images(rows, 20, 25, 40))
    prior = estimator.result()
    lower, upper = prior.confidence_interval
    assert np.all(lower <= prior.probs + 1e-12) and np.all(prior.probs <= upper + 1e-12)
    assert np.all(upper - lower > 0)
    assert prior.provenance["confidence_interval"]["level"] == 0.9
    assert estimator.result().provenance["confidence_interval"] == prior.provenance["confidence_interval"]


def test_estimate_prior_accepts_iterables_and_numpy_or_torch():
    batches = [_random_probability_maps(seed, batch=2, num_classes=4, size=(4, 4)) for seed in range(3)]
    from_iterable = estimate_prior(iter(batches), "count", classes=NAMES, bootstrap=0)
    from_array = estimate_prior(torch.cat(batches).numpy().astype(np.float16), "count", classes=NAMES, bootstrap=0)
    np.testing.assert_array_equal(from_iterable.counts, from_array.counts)
    generic = estimate_prior(torch.cat(batches), "soft_count", bootstrap=0)
    assert generic.classes == ("class0", "class1", "class2", "class3")


def test_estimator_errors():
    assert set(ESTIMATORS) == {"reference", "count", "soft_count", "presence", "em", "bbse", "em_raw"}
    with pytest.raises(ValueError, match="unknown prior estimator 'mle'"):
        make_estimator("mle", NAMES)
    counter = make_estimator("count", NAMES)
    with pytest.raises(ValueError, match=r"\(B, 4, H, W\)"):
        counter.update(np.ones((2, 3, 4, 4), dtype=np.float32))
    with pytest.raises(RuntimeError, match="no data"):
        counter.result()
    with pytest.raises(ValueError, match="different settings"):
        make_estimator("presence", NAMES, threshold=0.1).merge(make_estimator("presence", NAMES, threshold=0.2))
    with pytest.raises(ValueError, match="cannot merge a soft_count"):
        counter.merge(make_estimator("soft_count", NAMES))
    with pytest.raises(ValueError, match="source_prior"):
        estimate_prior(np.full((4, 4), 0.25), "em")
    with pytest.raises(ValueError, match="PIXEL"):
        make_estimator("reference", cityscapes19(), thresholds=preset("gta5_source_image_counts"))
    bbse = make_estimator("bbse", NAMES)
    bbse.update(np.full((4, 4), 0.25))
    with pytest.raises(RuntimeError, match="update_source"):
        bbse.result()
    with pytest.raises(ValueError, match="source_prior is over classes"):
        make_estimator("em", cityscapes19(), source_prior=preset("synthia_pixel_frequency"))


def test_em_warns_when_given_an_image_prior_as_source():
    source = ClassPrior(NAMES, SOURCE_PRIOR, "image")
    with pytest.warns(UserWarning, match="PIXEL prior"):
        make_estimator("em", NAMES, source_prior=source)


def test_em_refuses_to_merge_samples_drawn_with_the_same_seed():
    maps = _random_probability_maps(0, batch=2, num_classes=4, size=(6, 8))
    left, right, third = (EMEstimator(NAMES, source_prior=[0.25] * 4, bootstrap=0, seed=seed) for seed in (3, 3, 4))
    for estimator in (left, right, third):
        estimator.update(maps)
    with pytest.raises(ValueError, match=r"same seed\(s\) \[3\].*give each shard its own seed"):
        left.merge(right)
    left.merge(third)
    with pytest.raises(ValueError, match=r"same seed\(s\) \[3, 4\]"):
        right.merge(third).merge(left)  # both hold the keys of seeds 3 and 4 by now


def test_computed_provenance_wins_over_the_callers_notes():
    maps = _random_probability_maps(0, batch=2, num_classes=4, size=(6, 8))
    estimator = make_estimator("count", NAMES, bootstrap=0, provenance={"num_images": 999, "dataset": "x"})
    estimator.update(maps)
    prior = estimator.result()
    assert prior.provenance["num_images"] == 2 and prior.provenance["dataset"] == "x"


def test_estimate_prior_passes_the_source_prior_to_the_reference_rule_as_thresholds():
    maps = _random_probability_maps(0, batch=3, num_classes=4, size=(6, 8))
    thresholds = [0.05, 0.1, 0.2, 0.3]
    via_source = estimate_prior(maps, "reference", classes=NAMES, source_prior=thresholds, bootstrap=0)
    explicit = estimate_prior(maps, "reference", classes=NAMES, thresholds=thresholds, bootstrap=0)
    np.testing.assert_array_equal(via_source.counts, explicit.counts)
    with pytest.raises(ValueError, match=r"got shape \(2, 5, 6\)"):
        make_estimator("count", NAMES).update(np.ones((2, 5, 6), dtype=np.float32).tolist())


def test_the_ensemble_averages_its_members_ia_shifts_against_the_source_prior_of_each_kind():
    from labelshift.estimate.ensemble import ENSEMBLES, ensemble_prior
    from labelshift.priors import SourcePriors

    classes = ("a", "b", "c")
    source = SourcePriors(ClassPrior(classes, [0.5, 0.3, 0.2], "pixel"), ClassPrior(classes, [0.4, 0.4, 0.2], "image"))
    results = {"em": ClassPrior(classes, [0.25, 0.3, 0.45], "pixel"),
               "reference": ClassPrior(classes, [0.4, 0.2, 0.4], "image"),
               "soft_count": ClassPrior(classes, [0.5, 0.3, 0.2], "pixel")}  # = the source: no shift
    assert ENSEMBLES["ensemble"] == ("em", "reference", "soft_count")
    combined = ensemble_prior("ensemble", results, source)
    # shifts: em log(0.5, 1, 2.25), reference log(1, 0.5, 2), soft_count 0; their mean applied to the pixel prior
    expected = np.array([0.5, 0.3, 0.2]) * np.cbrt(np.array([0.5 * 1, 1 * 0.5, 2.25 * 2]))
    np.testing.assert_allclose(combined.probs, expected / expected.sum(), rtol=1e-12)
    assert combined.kind == "pixel" and combined.provenance["members"] == ["em", "reference", "soft_count"]
    unshifted = ensemble_prior("ensemble", {**results, "em": source.pixel, "reference": source.image}, source)
    np.testing.assert_allclose(unshifted.probs, source.pixel.probs, rtol=1e-12)


def test_an_estimate_pass_asked_for_the_ensemble_runs_its_members_and_combines_their_results():
    from labelshift.estimate import EstimatorInputs, estimator_class, estimator_results, make_estimators
    from labelshift.estimate.ensemble import ensemble_prior
    from labelshift.priors import SourcePriors

    source = SourcePriors(ClassPrior(NAMES, SOURCE_PRIOR, "pixel"), ClassPrior(NAMES, [0.7, 0.6, 0.5, 0.3], "image"))
    inputs = EstimatorInputs(source.pixel, source.pixel, em_sample_pixels=4000)
    estimators = make_estimators(["ensemble", "count"], NAMES, inputs, bootstrap=0, seed=0)
    assert list(estimators) == ["em", "reference", "soft_count", "count"]
    probs = _random_probability_maps(3, batch=4, num_classes=4)
    for estimator in estimators.values():
        estimator.update(probs, names=[f"img{i}" for i in range(4)])
    results = estimator_results(estimators, {"split": "train"}, ensembles=["ensemble"], source=source)
    assert list(results) == ["em", "reference", "soft_count", "count", "ensemble"]
    members = {m: results[m] for m in ("em", "reference", "soft_count")}
    np.testing.assert_array_equal(results["ensemble"].probs, ensemble_prior("ensemble", members, source).probs)
    assert results["ensemble"].provenance["member_provenance"]["em"]["split"] == "train"
    assert results["ensemble"].provenance["split"] == "train"  # what every member records, the ensemble too
    assert "confidence_interval" not in results["ensemble"].provenance
    with pytest.raises(ValueError, match="combines the results of"):
        estimator_class("ensemble")
    with pytest.raises(ValueError, match="needs the source priors"):
        estimator_results(estimators, ensembles=["ensemble"])
