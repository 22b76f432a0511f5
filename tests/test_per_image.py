"""Per-image priors (``adjust.mode: local``): MAP-EM on synthetic posteriors with planted priors, its limits
(κ → ∞ is global IA, κ → 0 plain per-image EM), batch independence, the safety counts, and the mode wired into
``labelshift evaluate`` and the job's evaluation and pseudo-label stages on the tiny world."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from labelshift.adjust import LocalIA, adjust_logits, ia_transform
from labelshift.calibrate import Calibration
from labelshift.config import AdjustConfig
from labelshift.config.sections import LocalAdjustConfig
from labelshift.estimate import em_label_shift
from labelshift.estimate.per_image import floor_rows, grid_pixels, map_em
from labelshift.image_presence import (PRESENCE_GRID_PIXELS, PresenceModel, fit_presence_model, label_presence,
                                       presence_features)
from labelshift.priors import ClassPrior, SourcePriors

CLASSES = ("a", "b", "c", "d")
SOURCE = np.array([0.4, 0.3, 0.2, 0.1])
MEANS = np.array([-3.0, -1.0, 1.0, 3.0])  # class-conditional N(mean, 1) on a line: overlapping neighbours


def planted_posteriors(priors: np.ndarray, pixels: int, seed: int = 0) -> torch.Tensor:
    """(N, K, pixels) exact source posteriors p_s(y|x) of points x drawn per image from Σ_y q_i(y)·N(μ_y, 1)."""
    rng = np.random.default_rng(seed)
    rows = []
    for prior in priors:
        labels = rng.choice(len(prior), size=pixels, p=prior)
        points = rng.normal(MEANS[labels], 1.0)
        log_joint = -0.5 * (points[None, :] - MEANS[:, None]) ** 2 + np.log(SOURCE)[:, None]  # (K, pixels)
        rows.append(torch.from_numpy(log_joint).softmax(0))
    return torch.stack(rows)


def local_adjust(estimator: str = "map_em", **local) -> AdjustConfig:
    return AdjustConfig(mode="local", local=LocalAdjustConfig(estimator=estimator, **local))


def test_map_em_recovers_planted_per_image_priors_and_shrinks_toward_the_dataset_prior():
    planted = np.array([[0.7, 0.2, 0.05, 0.05], [0.05, 0.05, 0.2, 0.7], [0.25, 0.25, 0.25, 0.25]])
    posteriors = planted_posteriors(planted, 5000)
    dataset = planted.mean(0)
    free, iterations, converged = map_em(posteriors, SOURCE, dataset, kappa=0.0, effective_pixels=1000,
                                         max_iter=2000, tol=1e-7)
    assert converged.all() and (iterations > 1).all()
    errors = np.abs(free.numpy() - planted).sum(1)
    assert errors.max() < 0.06, errors  # the data's own prior, without labels
    assert np.abs(dataset - planted).sum(1)[:2].min() > 0.5  # while the dataset prior is far from two of them
    shrunk, _, _ = map_em(posteriors, SOURCE, dataset, kappa=1000.0, effective_pixels=1000, max_iter=2000, tol=1e-7)
    # the MAP fixed point with λ = κ/(κ + n_eff) = 1/2 lies between the image's estimate and the dataset prior
    distance_to_dataset = np.abs(shrunk.numpy() - dataset).sum(1)
    assert (distance_to_dataset < np.abs(free.numpy() - dataset).sum(1) * 0.75).all()
    relative_error = np.abs(shrunk.numpy() - planted).sum(1) / np.abs(dataset - planted).sum(1)
    assert ((relative_error > 0.3) & (relative_error < 0.7)).all(), relative_error  # about half way


@pytest.fixture
def ia_inputs():
    source = ClassPrior(CLASSES, SOURCE, "pixel")
    calibrated = ClassPrior(CLASSES, [0.35, 0.3, 0.2, 0.15], "pixel")
    target = ClassPrior(CLASSES, [0.1, 0.2, 0.3, 0.4], "pixel")
    # a presence model that believes a class present when it wins a large share of the image
    presence = PresenceModel(mean=[-3.0, 0.5, -0.5], scale=[1.0, 0.2, 0.5], weights=[3.0, 0.5, 0.5], bias=-1.0)
    calibration = Calibration(1.4, np.array([0.2, -0.1, 0.0, -0.1]), "bcts", presence=presence)
    logits = torch.randn(8, len(CLASSES), 24, 40, generator=torch.Generator().manual_seed(3)) * 3
    return SourcePriors(source, source, calibrated), target, calibration, logits


def test_infinite_kappa_is_global_ia_exactly(ia_inputs):
    source, target, calibration, logits = ia_inputs
    for space in ("raw", "calibrated"):
        global_ia = ia_transform(AdjustConfig(space=space, temperature=0.8), source, target, calibration)
        local = ia_transform(local_adjust(kappa=math.inf, presence=False).model_copy(
            update={"space": space, "temperature": 0.8}), source, target, calibration)
        assert isinstance(local, LocalIA) and not isinstance(global_ia, LocalIA)
        assert torch.equal(local(logits), global_ia(logits))


def test_zero_kappa_is_plain_per_image_em(ia_inputs):
    source, target, calibration, logits = ia_inputs
    local = ia_transform(local_adjust(kappa=0.0, floor=0.0, tol=1e-10, max_iter=5000, sample_pixels=240,
                                      presence=False), source, target, calibration)
    priors = local.image_priors(logits)
    assert not priors.fallback.any()
    posteriors = grid_pixels(calibration.apply(logits), 240).softmax(1)  # (N, K, M) the same grid
    for image in range(len(logits)):
        expected, _, converged = em_label_shift(posteriors[image].T.double().numpy(), source.calibrated.probs,
                                                init=target.probs, tol=1e-10, max_iter=5000)
        assert converged
        np.testing.assert_allclose(priors.probs[image].numpy(), expected, atol=1e-7)
    assert np.abs(priors.probs.numpy() - target.probs).sum(1).min() > 0.05  # each image moved off the centre


def test_local_outputs_do_not_depend_on_the_batch(ia_inputs):
    source, target, calibration, logits = ia_inputs
    for estimator, presence in (("map_em", False), ("map_count", False), ("map_em", True), ("map_count", True)):
        local = ia_transform(local_adjust(estimator=estimator, kappa=300.0, presence=presence), source, target,
                             calibration)
        together = local(logits)
        one_by_one = torch.cat([local(logits[index: index + 1]) for index in range(len(logits))])
        assert torch.equal(together, one_by_one)
        assert not torch.equal(together, ia_transform(AdjustConfig(), source, target, calibration)(logits))


def test_floor_and_fallback_are_applied_and_counted(ia_inputs):
    source, target, calibration, logits = ia_inputs
    unconverged = ia_transform(local_adjust(kappa=0.0, max_iter=2, tol=1e-12), source, target, calibration)  # presence on
    priors = unconverged.image_priors(logits)
    assert priors.counts()["fallback_images"] == len(logits)
    assert torch.equal(unconverged(logits), ia_transform(AdjustConfig(), source, target, calibration)(logits))
    free = ia_transform(local_adjust(kappa=0.0, floor=0.0, max_iter=5000, presence=False), source, target,
                        calibration)
    free_ratio = free.image_priors(logits).probs.numpy() / target.probs
    assert free_ratio.min() < 0.8  # without a floor, per-image EM pushes some classes below 0.9·π̂
    floored = ia_transform(local_adjust(kappa=0.0, floor=0.9, max_iter=5000, presence=False), source, target,
                           calibration)
    priors = floored.image_priors(logits)
    counts = priors.counts()
    assert counts["fallback_images"] == 0
    assert counts["floored_classes"] == int((free_ratio < 0.9).sum()) > 0
    assert counts["floored_images"] == int((free_ratio < 0.9).any(1).sum())
    assert (priors.probs.numpy() / target.probs).min() > 0.9 * 0.8  # raised to 0.9·π̂, then renormalised
    record = priors.record(0)
    assert len(record["prior"]) == len(CLASSES) and math.isclose(sum(record["prior"]), 1.0)


def test_local_mode_needs_a_pixel_prior_and_the_calibration(ia_inputs):
    source, target, calibration, _ = ia_inputs
    image_target = ClassPrior(CLASSES, [0.2, 0.3, 0.3, 0.2], "image")
    with pytest.raises(ValueError, match="needs a pixel target prior"):
        ia_transform(local_adjust(), source, image_target, calibration)
    with pytest.raises(ValueError, match="needs the calibration"):
        ia_transform(local_adjust(), source, target, None)
    assert isinstance(ia_transform(local_adjust(posteriors="raw", presence=False), source, target, None), LocalIA)
    # map_count reads no posterior; presence needs the model the calibration carries
    assert isinstance(ia_transform(local_adjust("map_count", presence=False), source, target, None), LocalIA)
    with pytest.raises(ValueError, match="needs the presence model"):
        ia_transform(local_adjust("map_count"), source, target, None)
    without_model = Calibration(calibration.temperature, calibration.bias, "bcts")
    with pytest.raises(ValueError, match="needs the presence model"):
        ia_transform(local_adjust("map_count"), source, target, without_model)


def test_presence_weighs_each_image_prior_by_its_class_presence(ia_inputs):
    """q = normalise(q_without · max(P(present), floor)), P read on the image's grid after global IA, then the
    usual floor; a class that never wins in an image loses its mass there, and the images where it wins keep it."""
    source, target, calibration, logits = ia_inputs
    logits = logits.clone()
    logits[:4, 3] -= 12.0  # class d (almost) never wins in the first four images
    settings = {"estimator": "map_count", "kappa": 300.0, "sample_pixels": 240}
    without = ia_transform(local_adjust(presence=False, **settings), source, target, calibration)
    weighted = ia_transform(local_adjust(presence=True, **settings), source, target, calibration)
    # read on the presence grid after raw IA toward π̂ at T = τ = 1 (the model's own space)
    presence = calibration.presence.probability(presence_features(
        adjust_logits(grid_pixels(logits, PRESENCE_GRID_PIXELS), source.pixel, target)))
    expected = without.image_priors(logits).probs * presence.clamp_min(0.01)
    expected, _ = floor_rows(expected / expected.sum(1, keepdim=True), target.probs, 0.01)  # then the floor
    found = weighted.image_priors(logits).probs
    torch.testing.assert_close(found, expected, rtol=0, atol=1e-12)
    assert (presence[:4, 3] < 0.05).all() and (presence[4:, 3] > 0.5).all()  # d: absent where it rarely wins
    assert (found[:4, 3] < 0.05 * without.image_priors(logits).probs[:4, 3]).all()  # down to the floor, 0.01·π̂
    assert torch.allclose(found[:4, 3], torch.tensor(0.01 * target.probs[3], dtype=torch.float64), rtol=0.05)
    # whatever the IA's space, temperature and τ (κ = inf: the estimate before presence is π̂ itself)
    fixed = {"kappa": math.inf, "presence": True}
    plain = ia_transform(local_adjust(**fixed), source, target, calibration).image_priors(logits).probs
    for changes in ({"temperature": 0.5, "tau_target": 0.7}, {"space": "calibrated"}):
        other = ia_transform(local_adjust(**fixed).model_copy(update=changes), source, target, calibration)
        torch.testing.assert_close(other.image_priors(logits).probs, plain, rtol=0, atol=0)


def test_presence_model_separates_present_from_absent_classes_and_round_trips():
    """Fitted on images whose present classes win large shares and absent ones at most a few confused pixels,
    the model tells them apart on fresh images; the calibration document carries it."""
    generator = torch.Generator().manual_seed(0)

    def images(count: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randint(0, 3, (count, 16, 16), generator=generator)  # classes 0-2 present, 3-5 absent
        logits = torch.nn.functional.one_hot(labels, 6).permute(0, 3, 1, 2).float() * 4.0
        logits = logits + torch.randn(logits.shape, generator=generator)  # a few pixels won by absent classes
        return presence_features(grid_pixels(logits, 4096)), label_presence(labels, 6)

    features, present = images(40)
    model = fit_presence_model(features, present)
    fresh_features, fresh_present = images(20)
    probability = model.probability(fresh_features)
    assert probability[fresh_present].min() > 0.9 and probability[~fresh_present].max() < 0.25
    assert probability[~fresh_present].mean() < 0.02  # every pair on the right side of 1/2, most far from it
    assert model.metrics["pairs"] == 40 * 6 and math.isclose(model.metrics["present_share"], 0.5)
    document = Calibration(1.0, np.zeros(6), "temperature", presence=model).to_dict()
    restored = Calibration.from_dict(json.loads(json.dumps(document))).presence
    torch.testing.assert_close(restored.probability(fresh_features), probability)
    with pytest.raises(ValueError, match="both present and absent"):
        fit_presence_model(features, torch.ones_like(present))


LOCAL_OVERRIDES = ("adjust.mode=local", "adjust.local.estimator=map_count", "adjust.local.kappa=300")


def test_job_evaluates_and_pseudo_labels_with_per_image_priors(shared_cfg, tiny_trained, tmp_path):
    """The tiny world's job with ``adjust.mode: local``: evaluate_adapted gains the local row (global rows
    unchanged), and the pseudo stage (adapted model + IA as teacher) records each image's prior."""
    from labelshift.artifacts import CALIBRATION_FILE, LOCAL_IA, TARGET, evaluation_key, ia_name, read_priors
    from labelshift.pipeline import Pipeline
    from labelshift.pseudo import IMAGE_PRIORS, LABEL_MANIFEST
    from labelshift.runners import LocalTrainRunner
    from labelshift.tracking import Tracker

    out = tiny_trained.copy_stages(tmp_path / "run")
    cfg = shared_cfg(*LOCAL_OVERRIDES, "pseudo.teacher=adapted_ia", "tracking.enabled=false", out=out)
    job = Pipeline(cfg, LocalTrainRunner(out / "train"), Tracker(), log=lambda m: None)
    job.run(("pretrain", "estimate", "evaluate_adapted", "pseudo"))
    metrics = job.results["evaluate_adapted"]
    local, global_ia = (metrics[evaluation_key("target_val", name)] for name in (LOCAL_IA, ia_name(TARGET)))
    # the 4-step tiny model predicts one class whatever the prior (decisions that change: the synthetic tests)
    assert set(local) == set(global_ia) and 0 < local["pixel_accuracy"] <= 100
    pseudo_dir = out / "stages" / "pseudo"
    manifest = json.loads((pseudo_dir / LABEL_MANIFEST).read_text())
    assert manifest["priors"]["mode"] == "local" and IMAGE_PRIORS in manifest["settings"]["directories"]
    records = sorted((pseudo_dir / IMAGE_PRIORS).glob("*.json"))
    assert len(records) == manifest["counts"]["images"] == 16
    dataset_prior = read_priors(tiny_trained.estimate)[TARGET].probs
    image_priors = np.array([json.loads(path.read_text())["prior"] for path in records])
    assert image_priors.shape == (16, len(dataset_prior)) and np.allclose(image_priors.sum(1), 1.0)
    assert np.abs(image_priors - dataset_prior).sum(1).min() > 1e-3  # each image its own prior
    assert manifest["counts"]["prior_fallbacks"] == 0
    # the estimate stage fitted the presence model with the calibration, on every source-val image
    presence = json.loads((out / "stages" / "estimate" / CALIBRATION_FILE).read_text())["presence"]
    assert presence["metrics"]["images"] > 0
    assert presence["metrics"]["pairs"] == presence["metrics"]["images"] * len(dataset_prior)
    assert 0 < presence["metrics"]["present_share"] < 1


def test_evaluate_command_with_local_adjustment(tiny_trained, tmp_path):
    from conftest import DEMO_CONFIG
    from labelshift.artifacts import CALIBRATION_FILE, SOURCE_CALIBRATED, TARGET, source_prior_name
    from labelshift.cli import main

    estimate = tiny_trained.estimate
    common = ["evaluate", "--config", str(DEMO_CONFIG), "--checkpoint", str(tiny_trained.model),
              "--source-prior", str(estimate / f"{source_prior_name('pixel')}.json"),
              "--target-prior", str(estimate / f"{TARGET}.json")]
    overrides = list(tiny_trained.overrides)
    calibrated = ["--calibration", str(estimate / CALIBRATION_FILE),
                  "--calibrated-source-prior", str(estimate / f"{SOURCE_CALIBRATED}.json")]
    assert main([*common, "--adjust", "ia", "--out", str(tmp_path / "ia.json"), *overrides]) == 0
    assert main([*common, "--adjust", "local", *calibrated, "--out", str(tmp_path / "local.json"), *overrides,
                 "adjust.local.kappa=.inf", "adjust.local.presence=false"]) == 0
    assert main([*common, "--adjust", "local", *calibrated, "--out", str(tmp_path / "map_em.json"), *overrides,
                 "adjust.local.kappa=100"]) == 0
    ia, infinite, map_em_run = (json.loads((tmp_path / f"{name}.json").read_text())
                                for name in ("ia", "local", "map_em"))
    assert infinite["mode"] == "local" and infinite["miou"] == ia["miou"]  # κ = inf: global IA exactly
    assert map_em_run["local"]["kappa"] == 100 and map_em_run["calibrated_source_prior"]["kind"] == "pixel"
    assert main([*common, "--adjust", "local", "--out", str(tmp_path / "x.json"), *overrides,
                 "adjust.local.estimator=map_em"]) == 2  # map_em on calibrated posteriors needs the calibration
    assert main([*common, "--adjust", "local", "--out", str(tmp_path / "x.json"), *overrides]) == 2  # presence too
    document = json.loads((estimate / CALIBRATION_FILE).read_text())
    (tmp_path / "old_calibration.json").write_text(json.dumps({k: v for k, v in document.items() if k != "presence"}))
    old = ["--calibration", str(tmp_path / "old_calibration.json"), "--calibrated-source-prior",
           str(estimate / f"{SOURCE_CALIBRATED}.json")]
    assert main([*common, "--adjust", "local", *old, "--out", str(tmp_path / "x.json"), *overrides]) == 2
    assert main([*common, "--adjust", "local", *old, "--out", str(tmp_path / "x.json"), *overrides,
                 "adjust.local.presence=false"]) == 0


def test_the_source_val_pass_reads_presence_at_each_labels_own_size_and_skips_unlabelled_images():
    """A batch whose labels differ in size is padded (collate_eval): each image's presence features are read on
    its own size, equal to the image alone; an image with no labelled pixel adds no presence pair."""
    from labelshift.data.io import collate_eval
    from labelshift.inference import sample_pixels

    model = torch.nn.Conv2d(3, 5, 1).eval()
    generator = torch.Generator().manual_seed(1)
    items = [{"image": torch.randn(3, 8, 12, generator=generator), "name": name,
              "label": torch.randint(0, 5, size, generator=generator)}
             for name, size in (("wide", (16, 24)), ("small", (10, 14)))]
    unlabelled = {"image": torch.randn(3, 8, 12, generator=generator), "name": "void",
                  "label": torch.full((16, 24), 255, dtype=torch.int64)}
    options = {"device": torch.device("cpu"), "pixels_per_image": 50}
    with torch.no_grad():
        together = sample_pixels(model, [collate_eval(items + [unlabelled])], **options)
        alone = [sample_pixels(model, [collate_eval([item])], **options) for item in items]
    assert together.presence_features.shape == (2, 5, 3) and together.presence.shape == (2, 5)
    for row, single in enumerate(alone):
        torch.testing.assert_close(together.presence_features[row], single.presence_features[0])
        assert torch.equal(together.presence[row], single.presence[0])
