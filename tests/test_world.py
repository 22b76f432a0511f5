"""The embedded world: determinism, real on-disk layouts, exact statistics, the intended label shift, the CLI."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from labelshift.classes import cityscapes19, reference_statistics
from labelshift.data.cityscapes import CityscapesDataset
from labelshift.data.gta5 import GTA5Dataset
from labelshift.data.world import SPLITS, cli_main, generate_world, presence_rates

TINY = dict(size=(64, 32), seed=3, num_source=6, num_target_train=4, num_target_val=3)
NAMES = cityscapes19().names


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _as_tensors(image: np.ndarray, label: np.ndarray | None, rng: np.random.Generator):
    return torch.from_numpy(image.copy()), (None if label is None else torch.from_numpy(label.astype(np.int64)))


@pytest.fixture(scope="module")
def knob_world(tmp_path_factory) -> tuple[Path, dict]:
    """A world of this module's own knobs (``TINY``, seed 3); not the session's shared ``tiny_world``."""
    root = tmp_path_factory.mktemp("world") / "tiny"
    return root, generate_world(root, **TINY)


def test_same_arguments_give_identical_bytes(knob_world, tmp_path):
    root, _ = knob_world
    again = generate_world(tmp_path / "again", **TINY)
    assert _digest(tmp_path / "again") == _digest(root)
    assert again == json.loads((root / "world.json").read_text())
    other = generate_world(tmp_path / "other", **{**TINY, "seed": 4})
    assert other["splits"] != again["splits"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary trees left behind


def test_files_are_where_the_real_loaders_expect_them(knob_world):
    root, manifest = knob_world
    train_list = (root / "gta5/splits/train.txt").read_text().split()
    val_list = (root / "gta5/splits/val.txt").read_text().split()
    assert len(val_list) == 1 and len(train_list) == 5 and not set(train_list) & set(val_list)
    source = GTA5Dataset(root / "gta5", _as_tensors, list_file="splits/train.txt")
    assert len(source) == 5 and source[0]["image"].shape == (32, 64, 3)
    assert source[0]["label"].max() < 19  # label ids mapped to trainIds: nothing unmapped
    for split, count in (("train", 4), ("val", 3)):
        target = CityscapesDataset(root / "cityscapes", split, _as_tensors)
        assert len(target) == count
        assert target[0]["label"].shape == (32, 64) and target[0]["label"].max() < 19
        cities = {p.name for p in (root / "cityscapes/leftImg8bit" / split).iterdir()}
        assert cities == set(manifest["layout"]["target"]["cities"][split]) and len(cities) == 2
    stem = sorted((root / "cityscapes/leftImg8bit/train").glob("*/*_leftImg8bit.png"))[0].name
    assert stem.endswith("_000019_leftImg8bit.png") and len(stem.split("_")[1]) == 6


def test_gta5_labels_are_palette_pngs_of_label_ids(knob_world):
    root, _ = knob_world
    allowed = set(cityscapes19().label_ids) | {0}
    seen: set[int] = set()
    for path in sorted((root / "gta5/labels").glob("*.png")):
        with Image.open(path) as image:
            assert image.mode == "P"
            palette = np.asarray(image.getpalette()[:768], dtype=np.uint8).reshape(256, 3)
            seen |= set(np.unique(np.asarray(image)).tolist())
    assert seen <= allowed and 7 in seen  # road is label id 7 (its trainId would be 0)
    assert tuple(palette[7]) == cityscapes19().palette[0]
    with Image.open(next((root / "cityscapes/gtFine/val").glob("*/*_gtFine_labelIds.png"))) as image:
        assert image.mode == "L"


def _recount(label_files: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    lut = cityscapes19().cityscapes_id_lut()
    pixels, images = np.zeros(19, np.int64), np.zeros(19, np.int64)
    for path in label_files:
        counts = np.bincount(lut[np.asarray(Image.open(path))].reshape(-1), minlength=256)[:19]
        pixels += counts
        images += counts > 0
    return pixels, images


def test_world_json_counts_equal_a_recount_of_the_label_files(knob_world):
    root, manifest = knob_world
    files = {f"source_{s}": [root / "gta5/labels" / f"{stem}.png"
                             for stem in (root / f"gta5/splits/{s}.txt").read_text().split()] for s in ("train", "val")}
    for split in ("train", "val"):
        files[f"target_{split}"] = sorted((root / "cityscapes/gtFine" / split).glob("*/*_gtFine_labelIds.png"))
    assert set(manifest["splits"]) == set(SPLITS)
    for split, paths in files.items():
        stats = manifest["splits"][split]
        pixels, images = _recount(paths)
        assert stats["pixel_counts"] == pixels.tolist() and stats["image_counts"] == images.tolist()
        assert stats["num_images"] == len(paths)
        assert stats["num_pixels"] + stats["num_void_pixels"] == len(paths) * 64 * 32
        np.testing.assert_allclose(stats["pixel_prior"], pixels / pixels.sum(), atol=1e-9)
        np.testing.assert_allclose(stats["image_prior"], images / images.sum(), atol=1e-9)
    assert manifest["classes"] == list(NAMES) and manifest["knobs"]["seed"] == 3


def test_presence_rates_come_from_the_published_statistics():
    stats = reference_statistics()
    rates = presence_rates(presence_floor=0.0, label_shift=1.0)
    source = np.asarray(stats["gta5_source_image_counts_19"]) / stats["gta5_num_images"]
    target = np.asarray(stats["cityscapes_estimated_counts_from_gta5_deeplabv2_19"]) / stats["cityscapes_train_num_images"]
    sky = NAMES.index("sky")
    np.testing.assert_allclose(np.delete(rates["source"], []), source)
    np.testing.assert_allclose(np.delete(rates["target"], sky), np.delete(target, sky))
    assert rates["target"][sky] == rates["source"][sky]  # the published 239/2975 sky estimate is a slip
    floored = presence_rates(presence_floor=0.1, label_shift=0.0)
    np.testing.assert_allclose(floored["target"], floored["source"])
    assert floored["source"].min() == pytest.approx(0.1)


def test_label_shift_goes_the_intended_way(tmp_path):
    manifest = generate_world(tmp_path / "w", size=(64, 32), seed=0, num_source=160, num_target_train=160,
                              num_target_val=1)
    source, target = (np.asarray(manifest["splits"][s]["presence_rate"]) for s in ("source_train", "target_train"))
    for name in ("bicycle", "rider", "motorcycle", "traffic sign"):  # rare in GTA5, common in Cityscapes
        assert source[NAMES.index(name)] < target[NAMES.index(name)], name
    for name in ("sidewalk", "wall", "terrain", "truck"):  # the reverse
        assert source[NAMES.index(name)] > target[NAMES.index(name)], name


def test_cli_writes_the_tree_and_reuses_it(tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["--out", str(out), "--size", "64x32", "--seed", "1", "--num-source", "4", "--num-target-train", "2",
            "--num-target-val", "2"]
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    assert str(out.resolve()) in printed and "bicycle" in printed
    assert (out / "world.json").is_file() and len(list((out / "gta5/images").glob("*.png"))) == 4
    before = _digest(out)
    assert cli_main(argv) == 0 and _digest(out) == before  # same knobs: nothing rewritten
    assert cli_main(argv[:-1] + ["3"]) == 2  # a different world needs --overwrite
    assert cli_main(argv[:-1] + ["3", "--overwrite"]) == 0
    assert len(list((out / "cityscapes/leftImg8bit/val").glob("*/*.png"))) == 3


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="at least 16x16"):
        generate_world(tmp_path / "w", size=(8, 8))
    with pytest.raises(ValueError, match="num_source"):
        generate_world(tmp_path / "w", num_source=0)
    with pytest.raises(TypeError, match=r"unknown world knob\(s\) \['colour_cast'\]"):
        generate_world(tmp_path / "w", colour_cast=0.5)
    assert not (tmp_path / "w").exists()
