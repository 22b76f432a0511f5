"""ClassPrior, presets, JSON I/O, compatibility, floors, distances and label statistics."""
from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch

from labelshift.classes import cityscapes19, reference_statistics, synthia16
from labelshift.priors import (
    PRIOR_FLOOR, ClassPrior, LabelStatistics, PriorError, check_compatible, load_prior, preset, preset_names,
    prior_from_label_counts, prior_kl, prior_l1,
)

ABC = ("a", "b", "c")


def test_preset_names_cover_every_published_vector():
    assert set(preset_names()) == {
        "gta5_source_image_counts", "gta5_images_containing_class", "gta5_pixel_frequency",
        "synthia_source_image_counts", "synthia_images_containing_class", "synthia_pixel_frequency",
        "cityscapes_from_gta5_deeplabv2", "cityscapes_from_gta5_modified_aspp",
        "cityscapes_from_synthia_deeplabv2", "cityscapes_from_synthia_modified_aspp",
    }


def test_gta5_source_counts_preset_matches_the_published_vector():
    stats = reference_statistics()
    prior = preset("gta5_source_image_counts")
    counts = np.asarray(stats["gta5_source_image_counts_19"], dtype=np.float64)
    assert prior.classes == cityscapes19().names
    assert prior.kind == "image"
    np.testing.assert_array_equal(prior.counts, counts)
    np.testing.assert_allclose(prior.probs, counts / counts.sum(), rtol=0, atol=1e-15)
    assert prior.probs[0] == pytest.approx(24353 / counts.sum())  # road
    assert prior.provenance["num_images"] == 24966
    assert prior.provenance["reference_key"] == "gta5_source_image_counts_19"
    assert "Liu et al" in prior.provenance["source"]


@pytest.mark.parametrize("name, classes, kind, key", [
    ("cityscapes_from_gta5_deeplabv2", cityscapes19, "image", "cityscapes_estimated_counts_from_gta5_deeplabv2_19"),
    ("cityscapes_from_gta5_modified_aspp", cityscapes19, "image",
     "cityscapes_estimated_counts_from_gta5_modified_aspp_19"),
    ("cityscapes_from_synthia_deeplabv2", synthia16, "image",
     "cityscapes_estimated_counts_from_synthia_deeplabv2_16"),
    ("cityscapes_from_synthia_modified_aspp", synthia16, "image",
     "cityscapes_estimated_counts_from_synthia_modified_aspp_16"),
    ("synthia_source_image_counts", synthia16, "image", "synthia_source_image_counts_16"),
    ("gta5_pixel_frequency", cityscapes19, "pixel", "gta5_pixel_frequency_19"),
    ("synthia_pixel_frequency", synthia16, "pixel", "synthia_pixel_frequency_16"),
])
def test_presets_have_class_set_kind_and_provenance(name, classes, kind, key):
    prior = preset(name)
    values = np.asarray(reference_statistics()[key], dtype=np.float64)
    assert prior.classes == classes().names and prior.kind == kind
    assert prior.probs.sum() == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(prior.probs, values / values.sum(), atol=1e-12)
    assert prior.provenance["published_values"] == values.tolist()
    if kind == "pixel":
        assert prior.counts is None
    else:
        assert prior.provenance["num_images"] in (2975, 9400, 24966)


def test_cityscapes_sky_estimate_is_the_published_quirk():
    prior = preset("cityscapes_from_gta5_deeplabv2")
    assert prior.counts[prior.classes.index("sky")] == 239
    assert prior.provenance["estimator"] == "reference" and prior.provenance["dataset"] == "cityscapes"


def test_unknown_preset_lists_known_names():
    with pytest.raises(KeyError, match="gta5_source_image_counts"):
        preset("gta6")


def test_from_counts_and_json_round_trip(tmp_path):
    prior = ClassPrior.from_counts(ABC, [6, 3, 1], "pixel",
                                   provenance={"dataset": "world", "num_pixels": 10,
                                               "confidence_interval": {"level": 0.9, "lower": np.array([.5, .2, .05]),
                                                                       "upper": np.array([.7, .4, .15])}})
    np.testing.assert_array_equal(prior.probs, [0.6, 0.3, 0.1])
    path = prior.to_json(tmp_path / "sub" / "prior.json")
    assert [p.name for p in path.parent.iterdir()] == ["prior.json"]  # no temporary file left behind
    loaded = ClassPrior.from_json(path)
    assert loaded.classes == ABC and loaded.kind == "pixel"
    np.testing.assert_array_equal(loaded.probs, prior.probs)
    np.testing.assert_array_equal(loaded.counts, [6, 3, 1])
    lower, upper = loaded.confidence_interval
    np.testing.assert_array_equal(lower, [.5, .2, .05])
    assert loaded.provenance["dataset"] == "world"
    assert ClassPrior.from_dict(prior.to_dict()).to_dict() == prior.to_dict()
    preset_round_trip = ClassPrior.from_dict(json.loads(json.dumps(preset("gta5_pixel_frequency").to_dict())))
    np.testing.assert_array_equal(preset_round_trip.probs, preset("gta5_pixel_frequency").probs)


def test_probabilities_are_read_only_and_normalised():
    prior = ClassPrior(ABC, [2.0, 1.0, 1.0], "image")
    np.testing.assert_array_equal(prior.probs, [0.5, 0.25, 0.25])
    with pytest.raises(ValueError):
        prior.probs[0] = 1.0


def test_bad_documents_and_values_raise(tmp_path):
    with pytest.raises(ValueError, match="format"):
        ClassPrior.from_dict({"format": "other", "classes": ABC, "kind": "pixel", "probs": [1, 1, 1]})
    with pytest.raises(ValueError, match="lacks"):
        ClassPrior.from_dict({"classes": ABC, "probs": [1, 1, 1]})
    with pytest.raises(ValueError, match="kind"):
        ClassPrior(ABC, [1, 1, 1], "voxel")
    with pytest.raises(ValueError, match="shape"):
        ClassPrior(ABC, [1, 1], "pixel")
    with pytest.raises(ValueError, match="non-negative"):
        ClassPrior(ABC, [1, -1, 1], "pixel")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ClassPrior.from_json(tmp_path / "broken.json")


def test_zero_mass_classes_warn_and_are_floored():
    with pytest.warns(UserWarning, match=r"\['b'\].*floored"):
        prior = ClassPrior.from_counts(ABC, [3, 0, 1], "image")
    assert prior.probs[1] == pytest.approx(PRIOR_FLOOR, rel=1e-5)
    assert prior.probs.sum() == pytest.approx(1.0, abs=1e-15)
    assert math.isfinite(prior.log_probs()[1])
    np.testing.assert_array_equal(prior.counts, [3, 0, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an already floored prior does not warn again
        ClassPrior.from_dict(prior.to_dict())


def test_check_compatible_rejects_other_class_sets_and_kinds():
    check_compatible(preset("gta5_source_image_counts"), preset("cityscapes_from_gta5_deeplabv2"))
    with pytest.raises(ValueError, match="different class sets.*only in the first: \\['terrain', 'truck', 'train'\\]"):
        check_compatible(preset("gta5_source_image_counts"), preset("cityscapes_from_synthia_deeplabv2"))
    with pytest.raises(ValueError, match="different kinds.*image prior.*pixel prior"):
        check_compatible(preset("gta5_source_image_counts"), preset("gta5_pixel_frequency"))


def test_load_prior_resolves_presets_paths_and_checks_the_class_set(tmp_path):
    assert load_prior("gta5_source_image_counts") is preset("gta5_source_image_counts")
    path = preset("synthia_pixel_frequency").to_json(tmp_path / "p.json")
    loaded = load_prior(str(path), class_set=synthia16())
    np.testing.assert_array_equal(loaded.probs, preset("synthia_pixel_frequency").probs)
    assert load_prior(path, class_set="synthia16").kind == "pixel"
    with pytest.raises(ValueError, match="expected"):
        load_prior(path, class_set=cityscapes19())
    with pytest.raises(PriorError, match="neither a preset"):
        load_prior(tmp_path / "missing.json")


def test_l1_and_kl_distances():
    p = ClassPrior(ABC, [0.5, 0.3, 0.2], "pixel")
    q = ClassPrior(ABC, [0.2, 0.3, 0.5], "pixel")
    assert prior_l1(p, q) == pytest.approx(0.6)
    assert prior_l1([1, 1, 2], [0.25, 0.25, 0.5]) == pytest.approx(0.0)
    assert prior_kl(p, p) == 0.0
    assert prior_kl(p, q) == pytest.approx(0.5 * math.log(2.5) + 0.2 * math.log(0.4))
    assert prior_kl([1, 0], [0.5, 0.5]) == pytest.approx(math.log(2), abs=1e-4)  # floored, finite
    assert math.isfinite(prior_kl([0.5, 0.5], [1, 0]))
    with pytest.raises(ValueError, match="different kinds"):
        prior_l1(p, ClassPrior(ABC, [0.5, 0.3, 0.2], "image"))


def _label_maps():
    first = np.array([[0, 0, 1], [255, 2, 2]], dtype=np.uint8)
    second = np.array([[[0, 0, 0], [0, 0, 255]], [[2, 2, 2], [2, 255, 255]]], dtype=np.uint8)
    return first, second


def test_label_statistics_counts_pixels_and_images():
    first, second = _label_maps()
    stats = LabelStatistics(ABC)
    stats.update(first)
    stats.update(torch.from_numpy(second))
    np.testing.assert_array_equal(stats.pixel_counts, [2 + 5, 1, 2 + 4])
    np.testing.assert_array_equal(stats.image_counts, [2, 1, 2])
    assert (stats.num_images, stats.num_pixels, stats.num_ignored) == (3, 14, 4)
    pixel = stats.pixel_prior(dataset="world", split="source")
    np.testing.assert_allclose(pixel.probs, np.array([7, 1, 6]) / 14)
    assert pixel.kind == "pixel" and pixel.provenance["num_pixels"] == 14 and pixel.provenance["split"] == "source"
    image = stats.image_prior()
    np.testing.assert_allclose(image.probs, [0.4, 0.2, 0.4])
    np.testing.assert_array_equal(image.counts, [2, 1, 2])


def test_label_statistics_merge_equals_whole_and_rejects_bad_labels():
    first, second = _label_maps()
    whole = LabelStatistics(ABC)
    whole.update(first)
    whole.update(second)
    left, right = LabelStatistics(ABC), LabelStatistics(ABC)
    left.update(first)
    right.update(second)
    merged = left.merge(right)
    np.testing.assert_array_equal(merged.pixel_counts, whole.pixel_counts)
    np.testing.assert_array_equal(merged.image_counts, whole.image_counts)
    assert (merged.num_images, merged.num_pixels) == (whole.num_images, whole.num_pixels)
    with pytest.raises(ValueError, match=r"\[3, 7\]"):
        whole.update(np.array([[3, 7], [0, 255]]))
    with pytest.raises(ValueError, match="different class sets"):
        whole.merge(LabelStatistics(("a", "b")))


def test_prior_from_label_counts():
    first, second = _label_maps()
    prior = prior_from_label_counts([first, second], ABC, kind="image", dataset="gta5")
    np.testing.assert_allclose(prior.probs, [0.4, 0.2, 0.4])
    assert prior.provenance["dataset"] == "gta5" and prior.provenance["num_images"] == 3
