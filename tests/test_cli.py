"""The `labelshift` command on a tiny world: train, source-stats, evaluate (with IA), estimate-prior."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import DEMO_CONFIG, tiny_overrides
from labelshift.cli import main
from labelshift.priors import ClassPrior


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli")
    overrides = tiny_overrides(out)
    from labelshift.data.world import generate_world

    world = out / "world"
    generate_world(world, size=(64, 32), num_source=40, num_target_train=16, num_target_val=8)
    assert main(["train", "--config", str(DEMO_CONFIG), "--out", str(out / "model"), *overrides]) == 0
    return out, overrides


def test_source_stats_matches_world_json(trained, tmp_path, capsys):
    out, _ = trained
    world = json.loads((out / "world" / "world.json").read_text())
    assert main(["source-stats", "--dataset", "cityscapes", "--root", str(out / "world" / "cityscapes"),
                 "--split", "val", "--out", str(tmp_path / "prior.json")]) == 0
    pixel = ClassPrior.from_json(tmp_path / "prior.json")
    image = ClassPrior.from_json(tmp_path / "prior_image.json")
    expected = world["splits"]["target_val"]
    np.testing.assert_array_equal(pixel.counts, expected["pixel_counts"])
    np.testing.assert_array_equal(image.counts, expected["image_counts"])
    assert pixel.kind == "pixel" and image.kind == "image" and pixel.provenance["num_images"] == 8


def test_evaluate_with_and_without_ia(trained, tmp_path, capsys):
    out, overrides = trained
    model = str(out / "model" / "model.safetensors")
    assert main(["evaluate", "--config", str(DEMO_CONFIG), "--checkpoint", model, "--out", str(tmp_path / "a.json"),
                 *overrides]) == 0
    table = capsys.readouterr().out
    assert "mIoU" in table and "traffic light" in table
    plain = json.loads((tmp_path / "a.json").read_text())
    assert main(["evaluate", "--config", str(DEMO_CONFIG), "--checkpoint", model, "--adjust", "ia",
                 "--source-prior", "gta5_pixel_frequency", "--target-prior", "gta5_pixel_frequency",
                 "--out", str(tmp_path / "b.json"), *overrides]) == 0
    same = json.loads((tmp_path / "b.json").read_text())
    assert same["miou"] == plain["miou"]  # equal priors, temperature 1: IA changes nothing
    assert main(["evaluate", "--config", str(DEMO_CONFIG), "--checkpoint", model, "--adjust", "ia",
                 "--source-prior", "gta5_source_image_counts", "--target-prior", "cityscapes_from_gta5_deeplabv2",
                 "--out", str(tmp_path / "c.json"), *overrides]) == 0
    shifted = json.loads((tmp_path / "c.json").read_text())
    assert shifted["adjust"] == "ia" and shifted["per_class_iou"] != plain["per_class_iou"]


def test_estimate_prior_writes_a_prior_with_an_interval(trained, tmp_path):
    out, overrides = trained
    assert main(["estimate-prior", "--config", str(DEMO_CONFIG), "--checkpoint",
                 str(out / "model" / "model.safetensors"), "--method", "bbse", "--out", str(tmp_path / "p.json"),
                 *overrides]) == 0
    prior = ClassPrior.from_json(tmp_path / "p.json")
    lower, upper = prior.confidence_interval
    assert prior.provenance["estimator"] == "bbse" and lower.shape == (19,) and (lower <= upper).all()


def test_world_subcommand_and_bad_config_exit_cleanly(tmp_path):
    done = subprocess.run([sys.executable, "-m", "labelshift.cli", "world", "--out", str(tmp_path / "w"), "--size",
                           "32x16", "--num-source", "4", "--num-target-train", "2", "--num-target-val", "2"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "w" / "world.json").is_file()
    bad = subprocess.run([sys.executable, "-m", "labelshift.cli", "evaluate", "--config", str(DEMO_CONFIG),
                          "--checkpoint", "x", "prior.methd=em"], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "prior.methd: unknown key" in bad.stderr
