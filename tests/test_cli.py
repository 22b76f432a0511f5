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


def test_source_stats_of_a_gta5_layout_maps_label_ids_to_train_ids(trained, tmp_path):
    out, _ = trained
    world = json.loads((out / "world" / "world.json").read_text())
    assert main(["source-stats", "--dataset", "gta5", "--root", str(out / "world" / "gta5"), "--list-file",
                 "splits/val.txt", "--out", str(tmp_path / "gta5.json")]) == 0
    pixel = ClassPrior.from_json(tmp_path / "gta5.json")
    np.testing.assert_array_equal(pixel.counts, world["splits"]["source_val"]["pixel_counts"])
    assert pixel.provenance["dataset"] == "gta5" and pixel.provenance["split"] == "splits/val.txt"


def test_evaluate_with_and_without_ia(trained, tmp_path, capsys):
    out, overrides = trained
    model = str(out / "model" / "model.safetensors")

    def evaluate(name: str, *extra: str) -> dict:
        assert main(["evaluate", "--config", str(DEMO_CONFIG), "--checkpoint", model, "--out",
                     str(tmp_path / name), *extra, *overrides]) == 0
        return json.loads((tmp_path / name).read_text())

    plain = evaluate("a.json")
    table = capsys.readouterr().out
    assert "mIoU" in table and "traffic light" in table and "pixel acc." in table
    same = evaluate("b.json", "--adjust", "ia", "--source-prior", "gta5_pixel_frequency", "--target-prior",
                    "gta5_pixel_frequency", "--temperature", "2.0")
    assert same["miou"] == plain["miou"]  # equal priors: IA only rescales the logits, the argmax stays
    assert same["temperature"] == 2.0 and same["source_prior"]["provenance"]["preset"] == "gta5_pixel_frequency"
    shift = ["--adjust", "ia", "--source-prior", "gta5_source_image_counts", "--target-prior",
             "cityscapes_from_gta5_deeplabv2"]
    shifted = evaluate("c.json", *shift)
    assert shifted["adjust"] == "ia" and shifted["per_class_iou"] != plain["per_class_iou"]
    switched_off = evaluate("d.json", *shift, "--tau-source", "0", "--tau-target", "0")
    assert switched_off["per_class_iou"] == plain["per_class_iou"]  # both exponents 0: no adjustment
    assert main(["evaluate", "--config", str(DEMO_CONFIG), "--checkpoint", model, *overrides]) == 0
    assert json.loads((out / "eval" / "target_val_none.json").read_text())["miou"] == plain["miou"]


def test_estimate_prior_records_where_it_came_from(trained, tmp_path, capsys):
    from labelshift.models import checkpoint_sha256

    out, overrides = trained
    model = out / "model" / "model.safetensors"
    assert main(["estimate-prior", "--config", str(DEMO_CONFIG), "--checkpoint", str(model), "--method", "em",
                 "--out", str(tmp_path / "p.json"), *overrides]) == 0
    prior = ClassPrior.from_json(tmp_path / "p.json")
    lower, upper = prior.confidence_interval
    assert prior.provenance["estimator"] == "em" and lower.shape == (19,) and (lower <= upper).all()
    assert prior.provenance["checkpoint_sha256"] == checkpoint_sha256(model)
    assert (prior.provenance["dataset"], prior.provenance["split"]) == ("cityscapes", "train")
    assert prior.provenance["calibration"]["method"] == "bcts"
    source = ClassPrior.from_json(tmp_path / "p_source.json")
    assert source.kind == "pixel" and source.provenance["dataset"] == "gta5"
    calibration = json.loads((tmp_path / "p_calibration.json").read_text())
    assert calibration == prior.provenance["calibration"]
    assert f"--source-prior {tmp_path / 'p_source.json'} --target-prior {tmp_path / 'p.json'}" in capsys.readouterr().out


def test_make_splits_writes_disjoint_seeded_lists(tmp_path):
    from labelshift.data.world import generate_world

    generate_world(tmp_path / "w", size=(32, 16), num_source=10, num_target_train=1, num_target_val=1)
    root = tmp_path / "w" / "gta5"
    assert main(["make-splits", "--dataset", "gta5", "--root", str(root), "--val-size", "3", "--seed", "1"]) == 0
    train = (root / "splits" / "train.txt").read_text().split()
    val = (root / "splits" / "val.txt").read_text().split()
    assert len(train) == 7 and len(val) == 3 and not set(train) & set(val)
    assert sorted(train + val) == sorted(path.stem for path in (root / "images").glob("*.png"))
    first = val
    assert main(["make-splits", "--dataset", "gta5", "--root", str(root), "--val-size", "3", "--seed", "1"]) == 0
    assert (root / "splits" / "val.txt").read_text().split() == first


def test_world_subcommand_and_bad_inputs_exit_cleanly(tmp_path):
    done = subprocess.run([sys.executable, "-m", "labelshift.cli", "world", "--out", str(tmp_path / "w"), "--size",
                           "32x16", "--num-source", "4", "--num-target-train", "2", "--num-target-val", "2"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "w" / "world.json").is_file()
    bad_key = subprocess.run([sys.executable, "-m", "labelshift.cli", "evaluate", "--config", str(DEMO_CONFIG),
                              "--checkpoint", "x", "prior.methd=em"], capture_output=True, text=True, timeout=120)
    assert bad_key.returncode == 2 and "Traceback" not in bad_key.stderr
    assert bad_key.stderr.startswith(f"labelshift evaluate: error: invalid configuration in {DEMO_CONFIG}:\n"
                                     "  prior.methd: unknown key; expected one of")
    missing = subprocess.run([sys.executable, "-m", "labelshift.cli", "source-stats", "--dataset", "gta5", "--root",
                              str(tmp_path / "nope"), "--out", str(tmp_path / "p.json")],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr == (f"labelshift source-stats: error: GTA5 root {tmp_path / 'nope'} does not exist; "
                              "expected the GTA5 layout: <root>/images/*.png and <root>/labels/*.png\n")
