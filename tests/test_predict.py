"""Batch prediction (`labelshift predict` in this process, `ray_jobs/predict.py` on Ray Data) on the shared tiny
world and model: Cityscapes names, full label resolution, labelIds / trainIds equal to the model's own argmax, files
the official ``cityscapesscripts`` evaluation reads; and the output directory's record (resume only the same pass,
refuse another one naming the differences, ``--overwrite``)."""
from __future__ import annotations

import copy
import importlib.util
import re

import numpy as np
import pytest
import torch

from conftest import DEMO_CONFIG, PROJECT, tiny_overrides

pytestmark = pytest.mark.timeout(300)

MODEL_INPUT = "[32,16]"  # half the world's 64x32 images: predictions are upsampled (x2) to the label resolution


def _ray_job(name: str):
    """The module of ``ray_jobs/<name>.py`` (its ``main(argv)``)."""
    spec = importlib.util.spec_from_file_location(f"ray_jobs_{name}", PROJECT / "ray_jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def predict_argv(tiny_trained, tmp_path):
    """argv of a prediction of target val (8 images, two chunks of 4) with the shared model at a half-size input."""
    overrides = [*tiny_overrides(tmp_path / "run", world=tiny_trained.world),
                 f"data.target_transform.size={MODEL_INPUT}", "eval.batch_size=4"]

    def make(out, label_format: str = "labelids", *options: str, extra: tuple[str, ...] = (),
             checkpoint=tiny_trained.model) -> list[str]:
        return ["--config", str(DEMO_CONFIG), "--checkpoint", str(checkpoint), "--split", "val",
                "--out", str(out), "--format", label_format, *options, *overrides, *extra]

    return make


def _val_split(tiny_trained, tmp_path):
    from labelshift.build import build_split
    from labelshift.config import load_config

    cfg = load_config(DEMO_CONFIG, [*tiny_overrides(tmp_path / "run", world=tiny_trained.world),
                                    f"data.target_transform.size={MODEL_INPUT}", "data.target.split=val"])
    return cfg, build_split(cfg, "target", train=False, with_labels=True)


def _expected_train_ids(cfg, model_path, dataset) -> np.ndarray:
    """(N, H, W) trainIds: the model's argmax at its input size (logits upsampled bilinearly, as every pass does),
    the same 4-image batches as the pass, each input pixel repeated 2x2 up to the 64x32 label resolution."""
    from labelshift.build import build_model
    from labelshift.models import align_corners_of, upsample_logits

    model = build_model(cfg, model_path).eval()
    decided = []
    with torch.no_grad():
        for start in range(0, len(dataset), 4):
            images = torch.stack([dataset[i]["image"] for i in range(start, min(start + 4, len(dataset)))])
            logits = upsample_logits(model(images), tuple(images.shape[-2:]), align_corners=align_corners_of(model))
            decided.append(logits.argmax(1).numpy())
    at_input = np.concatenate(decided)
    rows, cols = np.arange(32) // 2, np.arange(64) // 2
    return at_input[:, rows][:, :, cols].astype(np.uint8)


def _png(path) -> np.ndarray:
    import cv2

    return cv2.imread(str(path), cv2.IMREAD_UNCHANGED)


def test_predict_writes_cityscapes_label_ids_the_official_evaluation_reads_and_the_ray_job_writes_the_same(
        predict_argv, tiny_trained, local_ray, tmp_path):
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as official
    from cityscapesscripts.helpers.labels import trainId2label

    from labelshift.build import class_set_of
    from labelshift.cli import main as labelshift
    from labelshift.data.io import read_label_ids
    from labelshift.metrics import ConfusionMatrix

    assert labelshift(["predict", *predict_argv(tmp_path / "labelids")]) == 0
    assert labelshift(["predict", *predict_argv(tmp_path / "trainids", "trainids")]) == 0
    assert _ray_job("predict").main(predict_argv(tmp_path / "ray")) == 0

    cfg, dataset = _val_split(tiny_trained, tmp_path)
    class_set = class_set_of(cfg)
    assert len(dataset) == 8 and all(re.fullmatch(r"[a-z]+_\d{6}_\d{6}", name) for name in dataset.names)
    pngs = sorted(path.name for path in (tmp_path / "labelids").glob("*.png"))
    assert pngs == sorted(f"{name}.png" for name in dataset.names)
    assert sorted(path.name for path in (tmp_path / "ray").glob("*.png")) == pngs

    expected = _expected_train_ids(cfg, tiny_trained.model, dataset)
    assert class_set.label_ids == tuple(trainId2label[train_id].id for train_id in range(19))
    to_label_ids = np.array(class_set.label_ids, dtype=np.uint8)
    for row, name in enumerate(dataset.names):
        label_ids, train_ids = _png(tmp_path / "labelids" / f"{name}.png"), _png(tmp_path / "trainids" / f"{name}.png")
        assert label_ids.dtype == np.uint8 and label_ids.shape == (32, 64)  # one channel, the gtFine resolution
        assert read_label_ids(dataset.files[row][1], "gray").shape == label_ids.shape
        np.testing.assert_array_equal(train_ids, expected[row])
        np.testing.assert_array_equal(label_ids, to_label_ids[expected[row]])
        assert (tmp_path / "ray" / f"{name}.png").read_bytes() == (tmp_path / "labelids" / f"{name}.png").read_bytes()
    assert len(np.unique(expected)) >= 3  # a real prediction, not one class everywhere

    # the official pixel-level evaluation finds our files by the Cityscapes name and scores them as we do
    ground_truth = [str(dataset.files[row][1]) for row in range(3)]
    args = copy.copy(official.args)
    args.predictionPath, args.predictionWalk = str(tmp_path / "labelids"), None
    args.evalInstLevelScore, args.JSONOutput, args.quiet = False, False, True
    predictions = [official.getPrediction(args, gt) for gt in ground_truth]
    assert [p.split("/")[-1] for p in predictions] == [f"{dataset.names[row]}.png" for row in range(3)]
    result = official.evaluateImgLists(predictions, ground_truth, args)
    ours = ConfusionMatrix(class_set.num_classes)
    lut = class_set.cityscapes_id_lut()
    ours.update(np.stack([lut[read_label_ids(gt, "gray")] for gt in ground_truth]), expected[:3])
    official_iou = np.array([result["classScores"][name] for name in class_set.names], dtype=float)
    np.testing.assert_allclose(official_iou, ours.iou(), rtol=0, atol=1e-12, equal_nan=True)
    assert np.count_nonzero(~np.isnan(official_iou)) >= 3


def test_a_rerun_resumes_only_the_same_pass_and_another_one_is_refused_naming_the_differences(
        predict_argv, tiny_trained, tmp_path, capsys):
    import cv2

    from labelshift.build import class_set_of
    from labelshift.cli import main as labelshift
    from labelshift.pseudo import LABEL_RECORD

    cfg, _ = _val_split(tiny_trained, tmp_path)
    out = tmp_path / "out"
    assert labelshift(["predict", *predict_argv(out, "trainids")]) == 0
    first = {path.name: path.read_bytes() for path in out.glob("*.png")}
    record = (out / LABEL_RECORD).read_text()
    assert len(first) == 8 and "a new output directory" in capsys.readouterr().out

    removed = sorted(first)[5]  # in the second chunk
    (out / removed).unlink()
    assert labelshift(["predict", *predict_argv(out, "trainids")]) == 0
    assert "8 images" not in (printed := capsys.readouterr().out) and "4 images labelled in 1 of 2 chunks" in printed
    assert {path.name: path.read_bytes() for path in out.glob("*.png")} == first

    # another format, another model input size, another checkpoint: refused, nothing touched
    assert labelshift(["predict", *predict_argv(out, "labelids", extra=("data.target_transform.size=[64,32]",))]) == 2
    error = capsys.readouterr().err
    assert "settings.label_format: \"trainids\" -> \"labelids\"" in error
    assert "input.target_transform.size: [32, 16] -> [64, 32]" in error and "--overwrite" in error
    other = tmp_path / "other.safetensors"
    other.write_bytes(tiny_trained.model.read_bytes())
    with open(other, "ab") as handle:
        handle.write(b" ")  # another file: another sha256
    assert labelshift(["predict", *predict_argv(out, "trainids", checkpoint=other)]) == 2
    assert "checkpoint_sha256" in capsys.readouterr().err
    assert (out / LABEL_RECORD).read_text() == record
    assert {path.name: path.read_bytes() for path in out.glob("*.png")} == first

    # --overwrite starts over: every file is the new pass's
    assert labelshift(["predict", *predict_argv(out, "labelids", "--overwrite")]) == 0
    assert "previous pass's outputs were deleted" in capsys.readouterr().out
    assert sorted(path.name for path in out.glob("*.png")) == sorted(first)
    to_label_ids = np.array(class_set_of(cfg).label_ids, dtype=np.uint8)
    for name, train_ids in first.items():
        np.testing.assert_array_equal(_png(out / name), to_label_ids[cv2.imdecode(np.frombuffer(train_ids, np.uint8),
                                                                                  cv2.IMREAD_UNCHANGED)])
    assert '"labelids"' in (out / LABEL_RECORD).read_text()

    # pass files with no record (not ours to delete) are refused even with --overwrite
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "aachen_000000_000019.png").write_bytes(next(iter(first.values())))
    assert labelshift(["predict", *predict_argv(foreign, "trainids", "--overwrite")]) == 2
    assert f"no {LABEL_RECORD}" in capsys.readouterr().err
