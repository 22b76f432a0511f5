"""The `labelshift` command on the session's tiny world and tiny trained model: train, source-stats, evaluate
(with IA), estimate-prior; make-splits and world on worlds of their own."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import DEMO_CONFIG, tiny_overrides
from labelshift.cli import main
from labelshift.priors import ClassPrior


@pytest.fixture
def overrides(tiny_world, tmp_path):
    """The tiny demo overrides on the shared world, writing under this test's tmp_path."""
    return tiny_overrides(tmp_path / "run", world=tiny_world)


def test_train_trains_the_model_of_the_pretrain_stage(overrides, tiny_trained, tmp_path, capsys):
    from labelshift.models.checkpoint import read_state_dict

    assert main(["train", "--config", str(DEMO_CONFIG), "--out", str(tmp_path / "model"), *overrides]) == 0
    printed = json.loads(capsys.readouterr().out.split("\nmodel written to")[0])
    assert (printed["stage"], printed["steps_run"], printed["resumed_from"]) == ("source", 4, 0)
    trained, _, _ = read_state_dict(tmp_path / "model" / "model.safetensors")
    shared, _, _ = read_state_dict(tiny_trained.model)
    assert trained.keys() == shared.keys() and all(np.array_equal(trained[k], shared[k]) for k in shared)


def test_source_stats_matches_world_json(tiny_world, tmp_path):
    world = json.loads((tiny_world / "world.json").read_text())
    assert main(["source-stats", "--dataset", "cityscapes", "--root", str(tiny_world / "cityscapes"),
                 "--split", "val", "--out", str(tmp_path / "prior.json")]) == 0
    pixel = ClassPrior.from_json(tmp_path / "prior.json")
    image = ClassPrior.from_json(tmp_path / "prior_image.json")
    expected = world["splits"]["target_val"]
    np.testing.assert_array_equal(pixel.counts, expected["pixel_counts"])
    np.testing.assert_array_equal(image.counts, expected["image_counts"])
    assert pixel.kind == "pixel" and image.kind == "image" and pixel.provenance["num_images"] == 8


def test_source_stats_of_a_gta5_layout_maps_label_ids_to_train_ids(tiny_world, tmp_path):
    world = json.loads((tiny_world / "world.json").read_text())
    assert main(["source-stats", "--dataset", "gta5", "--root", str(tiny_world / "gta5"), "--list-file",
                 "splits/val.txt", "--out", str(tmp_path / "gta5.json")]) == 0
    pixel = ClassPrior.from_json(tmp_path / "gta5.json")
    np.testing.assert_array_equal(pixel.counts, world["splits"]["source_val"]["pixel_counts"])
    assert pixel.provenance["dataset"] == "gta5" and pixel.provenance["split"] == "splits/val.txt"


@pytest.fixture
def evaluate(overrides, tiny_trained, tmp_path):
    """``labelshift evaluate`` of the shared model; returns the JSON it wrote."""
    def run(name: str, *extra: str) -> dict:
        assert main(["evaluate", "--config", str(DEMO_CONFIG), "--checkpoint", str(tiny_trained.model), "--out",
                     str(tmp_path / name), *extra, *overrides]) == 0
        return json.loads((tmp_path / name).read_text())

    return run


SHIFT = ["--adjust", "ia", "--source-prior", "gta5_source_image_counts", "--target-prior",
         "cityscapes_from_gta5_deeplabv2"]


def test_evaluate_prints_the_iou_table_and_writes_under_output_dir_by_default(evaluate, overrides, tiny_trained,
                                                                             tmp_path, capsys):
    plain = evaluate("a.json")
    table = capsys.readouterr().out
    assert "mIoU" in table and "traffic light" in table and "pixel acc." in table
    assert main(["evaluate", "--config", str(DEMO_CONFIG), "--checkpoint", str(tiny_trained.model), *overrides]) == 0
    assert json.loads((tmp_path / "run" / "eval" / "target_val_none.json").read_text()) == plain


def test_ia_between_equal_priors_keeps_the_argmax(evaluate):
    plain = evaluate("a.json")
    same = evaluate("b.json", "--adjust", "ia", "--source-prior", "gta5_pixel_frequency", "--target-prior",
                    "gta5_pixel_frequency", "--temperature", "2.0")
    assert same["miou"] == plain["miou"]  # equal priors: IA only rescales the logits, the argmax stays
    assert same["temperature"] == 2.0 and same["source_prior"]["provenance"]["preset"] == "gta5_pixel_frequency"


def test_ia_between_shifted_priors_changes_the_predictions(evaluate):
    plain = evaluate("a.json")
    shifted = evaluate("c.json", *SHIFT)
    assert shifted["adjust"] == "ia" and shifted["per_class_iou"] != plain["per_class_iou"]


def test_ia_with_both_exponents_zero_is_no_adjustment(evaluate):
    plain = evaluate("a.json")
    switched_off = evaluate("d.json", *SHIFT, "--tau-source", "0", "--tau-target", "0")
    assert switched_off["per_class_iou"] == plain["per_class_iou"]


def test_estimate_prior_gives_the_estimate_stages_prior(overrides, tiny_trained, tmp_path, capsys):
    """The command and the pipeline's estimate stage run the same estimator on the same model and data: the
    same prior (bootstrap interval and provenance included), source prior and calibration."""
    assert main(["estimate-prior", "--config", str(DEMO_CONFIG), "--checkpoint", str(tiny_trained.model),
                 "--method", "em", "--out", str(tmp_path / "p.json"), *overrides]) == 0
    stage = tiny_trained.priors()
    assert ClassPrior.from_json(tmp_path / "p.json").to_dict() == stage["estimate_em"].to_dict()
    assert ClassPrior.from_json(tmp_path / "p_source.json").to_dict() == stage["source_pixel"].to_dict()
    assert json.loads((tmp_path / "p_calibration.json").read_text()) == tiny_trained.calibration()
    printed = capsys.readouterr().out
    assert f"--source-prior {tmp_path / 'p_source.json'} --target-prior {tmp_path / 'p.json'}" in printed
    assert main(["estimate-prior", "--config", str(DEMO_CONFIG), "--checkpoint", str(tiny_trained.model),
                 "--out", str(tmp_path / "e.json"), *overrides]) == 0  # no --method: the config's, the ensemble
    ensemble = ClassPrior.from_json(tmp_path / "e.json")
    np.testing.assert_allclose(ensemble.probs, stage["estimate_ensemble"].probs, rtol=1e-12)
    assert ensemble.provenance["members"] == ["em", "reference", "soft_count"]


def test_estimate_prior_records_where_it_came_from(tiny_trained):
    from labelshift.models import checkpoint_sha256

    prior = tiny_trained.priors()["estimate_em"]
    lower, upper = prior.confidence_interval
    assert prior.provenance["estimator"] == "em" and lower.shape == (19,) and (lower <= upper).all()
    assert prior.provenance["checkpoint_sha256"] == checkpoint_sha256(tiny_trained.model)
    assert (prior.provenance["dataset"], prior.provenance["split"]) == ("cityscapes", "train")
    assert prior.provenance["calibration"] == tiny_trained.calibration()
    assert prior.provenance["calibration"]["method"] == "bcts_anchored"  # the default (prior.calibration)


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


def test_world_subcommand_writes_a_world(tmp_path, capsys):
    assert main(["world", "--out", str(tmp_path / "w"), "--size", "32x16", "--num-source", "4",
                 "--num-target-train", "2", "--num-target-val", "2"]) == 0
    world = json.loads((tmp_path / "w" / "world.json").read_text())
    assert world["knobs"]["size"] == [32, 16] and world["knobs"]["num_source"] == 4
    assert f"world written to {tmp_path / 'w'}" in capsys.readouterr().out


def test_python_m_labelshift_cli_exits_2_with_one_error_line_for_a_bad_key():
    bad_key = subprocess.run([sys.executable, "-m", "labelshift.cli", "evaluate", "--config", str(DEMO_CONFIG),
                              "--checkpoint", "x", "prior.methd=em"], capture_output=True, text=True, timeout=120)
    assert bad_key.returncode == 2 and "Traceback" not in bad_key.stderr
    assert bad_key.stderr.startswith(f"labelshift evaluate: error: invalid configuration in {DEMO_CONFIG}:\n"
                                     "  prior.methd: unknown key; expected one of")


def test_a_missing_dataset_root_is_one_error_line(tmp_path, capsys):
    assert main(["source-stats", "--dataset", "gta5", "--root", str(tmp_path / "nope"), "--out",
                 str(tmp_path / "p.json")]) == 2
    assert capsys.readouterr().err == (f"labelshift source-stats: error: GTA5 root {tmp_path / 'nope'} does not "
                                       "exist; expected the GTA5 layout: <root>/images/*.png and <root>/labels/*.png\n")
