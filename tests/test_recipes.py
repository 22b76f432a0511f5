"""The real-data recipes (configs/recipes/) run end to end on a tiny world, GTA5 and SYNTHIA layouts, with the
published prior presets; and the two crashes of issue 10 (a preset as ``prior.source_prior``) stay fixed.

Each run keeps every knob of its recipe except the sizes, iteration counts and the model: the world is 64x32
(the recipes' 2048x1024 base and 1024x512 crops become 128x64 and 64x32), the small model of the suite, 4 steps
per training stage, one process (``LocalTrainRunner``). GTA5 runs start from the suite's shared tiny model
(``tiny_trained``); SYNTHIA runs from one tiny model trained here on a SYNTHIA-layout world.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import DEMO_CONFIG, PROJECT, tiny_overrides
from labelshift.artifacts import TARGET, estimate_name, evaluation_key, source_prior_name
from labelshift.config import load_config
from labelshift.estimate import METHODS
from labelshift.pipeline import Pipeline
from labelshift.runners import LocalTrainRunner
from labelshift.tracking import Tracker

RECIPES = PROJECT / "configs" / "recipes"
AFTER_PRETRAIN = ("estimate", "evaluate_adapted", "refine", "evaluate_refined", "pseudo", "distill",
                  "evaluate_distilled")


def tiny_recipe(recipe: str, out: Path, world: Path, model: Path, *extra: str):
    """``configs/recipes/<recipe>.yaml`` at the tiny world's sizes, starting from ``model`` (a small model)."""
    source = "synthia" if recipe.startswith("synthia") else "gta5"
    overrides = [f"output_dir={out}", f"data.source.root={world}/{source}", f"data.source_val.root={world}/{source}",
                 f"data.target.root={world}/cityscapes", f"data.target_val.root={world}/cityscapes",
                 "data.num_workers=0", "data.source_transform.size=[64,32]", "data.target_transform.size=[64,32]",
                 "data.target_transform.base_size=[128,64]", "data.target_transform.crop_size=[64,32]",
                 "model.name=small", "model.width=32", "model.frozen_bn=false", f"model.checkpoint={model}",
                 "train.distill.student_pretrained=null", "prior.bootstrap=3", "prior.em_sample_pixels=2000",
                 "eval.batch_size=8", "ray.use_gpu=false", "tracking.enabled=false"]
    for stage in ("refine", "distill"):
        overrides += [f"train.{stage}.iterations=4", f"train.{stage}.batch_size=4",
                      f"train.{stage}.checkpoint_every=2", f"train.{stage}.log_every=1"]
    if recipe.endswith("reference"):
        overrides.append("eval.input_sizes={distilled: [128, 64]}")  # the recipe's full-resolution student test
    return load_config(RECIPES / f"{recipe}.yaml", overrides + list(extra))


def run_job(cfg, stages=AFTER_PRETRAIN) -> dict:
    out = Path(cfg.output_dir)
    return Pipeline(cfg, LocalTrainRunner(out / "train"), Tracker(), log=lambda m: None).run(stages)


def estimate_outputs(out: Path) -> dict:
    from labelshift.artifacts import read_priors

    return read_priors(out / "stages" / "estimate")


@pytest.fixture(scope="module")
def synthia_tiny(tmp_path_factory):
    """A tiny SYNTHIA-layout world and a small 16-class model trained on it (the stand-in adapted model)."""
    out = tmp_path_factory.mktemp("synthia") / "pretrain"
    world = out.parent / "world"
    overrides = tiny_overrides(out, world=world) + [
        "data.class_set=synthia16", "data.world.source_layout=synthia", "data.source.kind=synthia",
        "data.source_val.kind=synthia", f"data.source.root={world}/synthia", f"data.source_val.root={world}/synthia"]
    cfg = load_config(DEMO_CONFIG, overrides)
    Pipeline(cfg, LocalTrainRunner(out / "train"), Tracker(), log=lambda m: None).run(("pretrain",))
    return world, out / "stages" / "pretrain" / "model.safetensors"


def test_gta5_reference_recipe_runs_to_the_end_with_the_published_pair(tiny_trained, tmp_path):
    cfg = tiny_recipe("gta5_reference", tmp_path / "run", tiny_trained.world, tiny_trained.model)
    summary = run_job(cfg)
    priors = estimate_outputs(tmp_path / "run")
    # IA and CR pair the published target counts with the published source counts, the reference's exact pair
    assert priors[TARGET].provenance["preset"] == "cityscapes_from_gta5_deeplabv2"
    assert priors[source_prior_name("image")].provenance["preset"] == "gta5_source_image_counts"
    assert priors[source_prior_name("pixel")].provenance["preset"] == "gta5_pixel_frequency"
    assert set(METHODS) <= {name.removeprefix("estimate_") for name in priors}  # every estimator ran
    refined = json.loads((tmp_path / "run" / "stages" / "refine" / "manifest.json").read_text())
    assert refined["config"]["train"]["refine"]["sampler"] == "class_balanced"
    assert [row["model"] for row in summary["rows"]][:1] == ["source-only (adapted model)"]
    pseudo = json.loads((tmp_path / "run" / "stages" / "pseudo" / "pseudo.json").read_text())
    assert pseudo["settings"]["decide_at"] == "label"  # the reference's label resolution reached the pass
    key = evaluation_key("target_val", "none")
    distilled = summary["stages"]["evaluate_distilled"][key]
    manifest = json.loads((tmp_path / "run" / "stages" / "evaluate_distilled" / "manifest.json").read_text())
    assert distilled == manifest["metrics"][key] and summary["rows"][-1]["target_val_miou"] == distilled["miou"]
    present = [iou for iou in distilled["per_class_iou"].values() if iou is not None]  # 4-decimal percentages
    assert distilled["miou"] == pytest.approx(sum(present) / len(present), abs=1e-4)


def test_gta5_ours_recipe_runs_with_a_pixel_preset_as_the_source_prior(tiny_trained, tmp_path):
    """The first crash of issue 10: a pixel preset as prior.source_prior made IA of every image estimate raise."""
    cfg = tiny_recipe("gta5_ours", tmp_path / "run", tiny_trained.world, tiny_trained.model,
                      "prior.source_prior=gta5_pixel_frequency")
    summary = run_job(cfg)
    priors = estimate_outputs(tmp_path / "run")
    assert priors[source_prior_name("pixel")].provenance["preset"] == "gta5_pixel_frequency"
    image_source = priors[source_prior_name("image")]  # the image kind: exact counts of the CR split
    assert image_source.kind == "image" and image_source.provenance["estimator"] == "label_image_presence"
    adapted = summary["stages"]["evaluate_adapted"]
    for method in ("reference", "presence"):  # image estimates: adjusted against the image source prior
        assert evaluation_key("target_val", f"ia_{estimate_name(method)}") in adapted
    assert priors[TARGET].provenance["estimator"] == "ensemble"
    assert priors[TARGET].provenance["members"] == ["em", "reference", "soft_count"]


def test_synthia_reference_recipe_with_pseudo_labels_from_the_ia_corrected_adapted_model(synthia_tiny, tmp_path):
    world, model = synthia_tiny
    cfg = tiny_recipe("synthia_reference", tmp_path / "run", world, model, "pseudo.teacher=adapted_ia")
    assert cfg.train.distill.student_frozen_bn and cfg.data.class_set == "synthia16"
    summary = run_job(cfg)
    priors = estimate_outputs(tmp_path / "run")
    assert priors[TARGET].provenance["preset"] == "cityscapes_from_synthia_deeplabv2"
    assert priors[source_prior_name("image")].provenance["preset"] == "synthia_source_image_counts"
    pseudo = json.loads((tmp_path / "run" / "stages" / "pseudo" / "manifest.json").read_text())
    assert "refine" not in pseudo["inputs"] and "estimate" in pseudo["inputs"]  # the teacher is not the CR model
    for stage in ("evaluate_adapted", "evaluate_refined", "evaluate_distilled"):
        metrics = next(iter(v for k, v in summary["stages"][stage].items() if k.startswith("target_val/")))
        assert "miou_13" in metrics and len(metrics["per_class_iou"]) == 16


def test_synthia_ours_recipe_runs_with_an_image_preset_as_the_source_prior(synthia_tiny, tmp_path):
    """The second crash of issue 10: an image preset as prior.source_prior made the reference rule raise."""
    world, model = synthia_tiny
    cfg = tiny_recipe("synthia_ours", tmp_path / "run", world, model,
                      "prior.source_prior=synthia_source_image_counts")
    run_job(cfg)
    priors = estimate_outputs(tmp_path / "run")
    assert priors[source_prior_name("image")].provenance["preset"] == "synthia_source_image_counts"
    thresholds = priors[estimate_name("reference")].provenance
    assert priors[source_prior_name("pixel")].kind == "pixel" and "checkpoint" in thresholds
    assert (tmp_path / "run" / "stages" / "evaluate_distilled" / "manifest.json").is_file()
