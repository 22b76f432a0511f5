"""Dataset layer: label decoding in the real on-disk layouts, joint transforms, and every bad input's error."""
from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from labelshift.classes import IGNORE_INDEX, cityscapes19, synthia16
from labelshift.config import DataConfig, DatasetConfig, TransformConfig
from labelshift.build import build_dataset, build_transforms_for
from labelshift.data import (CityscapesDataset, DatasetError, GTA5Dataset, SynthiaDataset, build_transforms,
                             read_image, read_label_ids, write_palette_png, write_png_atomic)

IDENTITY = build_transforms(train=False, size=None, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
HEIGHT, WIDTH = 4, 6


def _rgb_image(seed: int, height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def _write_rgb(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


def _write_gta5_label(path: Path, ids: np.ndarray) -> None:
    """A real GTA5-style label: 8-bit palette PNG written by PIL, Cityscapes colours in the palette."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(ids.astype(np.uint8)).convert("P")
    image.putpalette(np.random.default_rng(0).integers(0, 256, 768, dtype=np.uint8).tolist())
    image.save(path)
    assert Image.open(path).mode == "P"


def _write_synthia_label(path: Path, ids: np.ndarray) -> None:
    """A real SYNTHIA label: 16-bit 3-channel PNG, class id in R (OpenCV's channel 2)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    bgr = np.zeros(ids.shape + (3,), dtype=np.uint16)
    bgr[..., 2] = ids
    bgr[..., 0] = 7  # instance channel, must be ignored
    assert cv2.imwrite(str(path), bgr)


def _write_gray(path: Path, ids: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), ids.astype(np.uint8))


GTA5_IDS = np.array([[7, 26, 0, 8, 33, 3]] * HEIGHT, dtype=np.uint8)
GTA5_TRAIN_IDS = np.array([[0, 13, 255, 1, 18, 255]] * HEIGHT)
SYNTHIA_IDS = np.array([[3, 11, 259, 300, 2, 0]] * HEIGHT, dtype=np.uint16)  # 259 = 256 + 3: road if truncated
SYNTHIA_TRAIN_IDS = np.array([[0, 15, 255, 255, 2, 255]] * HEIGHT)
CITYSCAPES_IDS = np.array([[7, 33, 22, 27, 1, 26]] * HEIGHT, dtype=np.uint8)


@pytest.fixture
def gta5_root(tmp_path: Path) -> Path:
    root = tmp_path / "gta5"
    for index in (1, 2, 3):
        _write_rgb(root / "images" / f"{index:05d}.png", _rgb_image(index))
        _write_gta5_label(root / "labels" / f"{index:05d}.png", GTA5_IDS)
    return root


@pytest.fixture
def synthia_parent(tmp_path: Path) -> Path:
    root = tmp_path / "synthia" / "RAND_CITYSCAPES"
    for index in (1, 2):
        _write_rgb(root / "RGB" / f"{index:07d}.png", _rgb_image(index))
        _write_synthia_label(root / "GT" / "LABELS" / f"{index:07d}.png", SYNTHIA_IDS)
    return root.parent


@pytest.fixture
def cityscapes_root(tmp_path: Path) -> Path:
    root = tmp_path / "cityscapes"
    for split, city, frame in (("train", "aachen", 19), ("train", "bochum", 7), ("val", "lindau", 1)):
        stem = f"{city}_000000_{frame:06d}"
        _write_rgb(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", _rgb_image(frame))
        _write_gray(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", CITYSCAPES_IDS)
    return root


# ---------------------------------------------------------------- io


def test_read_image_returns_rgb(tmp_path: Path) -> None:
    rgb = _rgb_image(5)
    _write_rgb(tmp_path / "a.png", rgb)
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), rgb)


def test_read_image_errors_name_the_path(tmp_path: Path) -> None:
    missing, corrupt, gray = tmp_path / "missing.png", tmp_path / "corrupt.png", tmp_path / "gray.png"
    corrupt.write_bytes(b"this is not a png")
    _write_gray(gray, np.zeros((HEIGHT, WIDTH)))
    with pytest.raises(DatasetError, match=re.escape(f"image file {missing} does not exist")):
        read_image(missing)
    with pytest.raises(DatasetError, match=re.escape(
            f"cannot decode image file {corrupt}: not a readable image file (corrupt or wrong format)")):
        read_image(corrupt)
    with pytest.raises(DatasetError, match=re.escape(
            f"image file {gray}: expected an 8-bit 3-channel colour image, got shape (4, 6) dtype uint8")):
        read_image(gray)


def test_synthia_16bit_id_survives(tmp_path: Path) -> None:
    _write_synthia_label(tmp_path / "label.png", SYNTHIA_IDS)
    ids = read_label_ids(tmp_path / "label.png", "synthia16bit")
    assert ids.dtype == np.uint16
    np.testing.assert_array_equal(ids, SYNTHIA_IDS)


def test_read_label_ids_rejects_wrong_formats(tmp_path: Path) -> None:
    palette, rgb, corrupt = tmp_path / "palette.png", tmp_path / "rgb.png", tmp_path / "corrupt.png"
    _write_gta5_label(palette, GTA5_IDS)
    _write_rgb(rgb, _rgb_image(1))
    corrupt.write_bytes(b"\x89PNG broken")
    np.testing.assert_array_equal(read_label_ids(palette, "palette"), GTA5_IDS)
    with pytest.raises(DatasetError, match=re.escape(
            f"label file {palette}: expected a single-channel 8-bit label PNG, got shape (4, 6, 3) dtype uint8")):
        read_label_ids(palette, "gray")  # OpenCV expands the palette to colour
    with pytest.raises(DatasetError, match=re.escape(
            f"label file {rgb}: expected an 8-bit palette PNG (PIL mode 'P' or 'L'), got mode 'RGB'")):
        read_label_ids(rgb, "palette")
    with pytest.raises(DatasetError, match=re.escape(
            f"label file {rgb}: expected a 16-bit 3-channel SYNTHIA label PNG (class id in the red channel), "
            "got shape (4, 6, 3) dtype uint8")):
        read_label_ids(rgb, "synthia16bit")
    with pytest.raises(DatasetError, match=re.escape(f"cannot decode label file {corrupt}: not a readable")):
        read_label_ids(corrupt, "palette")
    with pytest.raises(DatasetError, match=re.escape(f"label file {tmp_path / 'none.png'} does not exist")):
        read_label_ids(tmp_path / "none.png", "gray")
    with pytest.raises(ValueError, match="unknown label kind 'rgb'"):
        read_label_ids(palette, "rgb")


def test_atomic_writers_round_trip(tmp_path: Path) -> None:
    rgb, ids16 = _rgb_image(3), (np.arange(24, dtype=np.uint16).reshape(HEIGHT, WIDTH) * 1000)
    write_png_atomic(tmp_path / "out" / "rgb.png", rgb)
    synthia_like = np.zeros((HEIGHT, WIDTH, 3), dtype=np.uint16)
    synthia_like[..., 0] = ids16  # channel 0 = R in the RGB convention
    write_png_atomic(tmp_path / "out" / "synthia.png", synthia_like)
    write_palette_png(tmp_path / "out" / "gta5.png", GTA5_IDS, cityscapes19().palette)
    np.testing.assert_array_equal(read_image(tmp_path / "out" / "rgb.png"), rgb)
    np.testing.assert_array_equal(read_label_ids(tmp_path / "out" / "synthia.png", "synthia16bit"), ids16)
    np.testing.assert_array_equal(read_label_ids(tmp_path / "out" / "gta5.png", "palette"), GTA5_IDS)
    with Image.open(tmp_path / "out" / "gta5.png") as written:
        assert written.mode == "P"
        assert tuple(written.getpalette()[:3]) == cityscapes19().palette[0]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["gta5.png", "rgb.png", "synthia.png"]
    with pytest.raises(DatasetError, match=re.escape("expected a uint8 or uint16 array, got dtype float32")):
        write_png_atomic(tmp_path / "bad.png", np.zeros((2, 2), dtype=np.float32))


# ---------------------------------------------------------------- transforms


def test_crop_pads_label_with_ignore_and_image_with_zero() -> None:
    transform = build_transforms(train=True, size=None, crop_size=(10, 8), mean=(0.0, 0.0, 0.0),
                                 std=(1.0, 1.0, 1.0))
    image, label = transform(np.full((HEIGHT, WIDTH, 3), 255, np.uint8), np.zeros((HEIGHT, WIDTH), np.uint8),
                             np.random.default_rng(0))
    assert image.shape == (3, 8, 10) and label.shape == (8, 10) and label.dtype == torch.int64
    assert (label[:HEIGHT, :WIDTH] == 0).all() and (label[HEIGHT:] == IGNORE_INDEX).all()
    assert (label[:, WIDTH:] == IGNORE_INDEX).all()
    assert (image[:, HEIGHT:] == 0).all() and (image[:, :HEIGHT, :WIDTH] == 1).all()


def test_flip_moves_image_and_label_together() -> None:
    label = np.tile(np.arange(WIDTH, dtype=np.uint8), (HEIGHT, 1))
    image = np.repeat((label * 40)[..., None], 3, axis=2)
    transform = build_transforms(train=True, size=None, flip=True, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    first_columns = set()
    for seed in range(20):
        image_tensor, label_tensor = transform(image, label, np.random.default_rng(seed))
        np.testing.assert_allclose((image_tensor[0] * 255).round().numpy(), label_tensor.numpy() * 40)
        first_columns.add(int(label_tensor[0, 0]))
    assert first_columns == {0, WIDTH - 1}


def test_same_seed_same_output_and_eval_is_deterministic() -> None:
    image, label = _rgb_image(1, 32, 48), np.random.default_rng(2).integers(0, 19, (32, 48), dtype=np.uint8)
    train = build_transforms(train=True, size=(40, 24), crop_size=(16, 12), scale_range=(0.5, 1.5), flip=True,
                             color_jitter=0.4)
    first = train(image, label, np.random.default_rng([7, 0, 3]))
    again = train(image, label, np.random.default_rng([7, 0, 3]))
    other = train(image, label, np.random.default_rng([7, 1, 3]))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])
    assert set(first[1].unique().tolist()) <= set(np.unique(label).tolist()) | {IGNORE_INDEX}
    evaluate = build_transforms(train=False, size=(24, 16), crop_size=(8, 8), flip=True, color_jitter=0.5)
    outputs = [evaluate(image, label, np.random.default_rng(seed)) for seed in (0, 1)]
    assert torch.equal(outputs[0][0], outputs[1][0]) and torch.equal(outputs[0][1], outputs[1][1])
    assert outputs[0][0].shape == (3, 16, 24) and outputs[0][1].shape == (16, 24)


def test_keep_label_size_keeps_full_label_resolution() -> None:
    image, label = _rgb_image(1, 32, 48), np.full((32, 48), 3, np.uint8)
    evaluate = build_transforms(train=False, size=(24, 16), keep_label_size=True)
    image_tensor, label_tensor = evaluate(image, label, np.random.default_rng(0))
    assert image_tensor.shape == (3, 16, 24) and image_tensor.dtype == torch.float32
    assert label_tensor.shape == (32, 48)
    with pytest.raises(ValueError, match="keep_label_size is for evaluation"):
        build_transforms(train=True, size=(24, 16), keep_label_size=True)


def test_normalisation_uses_mean_and_std() -> None:
    transform = build_transforms(train=False, size=None)
    image_tensor, label_tensor = transform(np.full((2, 2, 3), 255, np.uint8), None, np.random.default_rng(0))
    expected = (1.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(image_tensor[:, 0, 0].numpy(), expected, rtol=1e-6)
    assert label_tensor is None


# ---------------------------------------------------------------- datasets


def test_gta5_decodes_palette_labels_to_train_ids(gta5_root: Path) -> None:
    dataset = GTA5Dataset(gta5_root, IDENTITY, seed=3)
    assert len(dataset) == 3 and dataset.class_set.name == "cityscapes19"
    assert dataset.files[0] == (gta5_root / "images" / "00001.png", gta5_root / "labels" / "00001.png")
    item = dataset[1]
    assert item["name"] == "00002" and item["label"].dtype == torch.int64
    np.testing.assert_array_equal(item["label"].numpy(), GTA5_TRAIN_IDS)
    np.testing.assert_allclose((item["image"] * 255).round().numpy().transpose(1, 2, 0), _rgb_image(2))


def test_gta5_list_file_and_unlabelled(gta5_root: Path) -> None:
    (gta5_root / "subset.txt").write_text("00003.png\n\n# comment\nimages/00001.png\n00002\n")
    dataset = GTA5Dataset(gta5_root, IDENTITY, list_file="subset.txt")
    assert [dataset[i]["name"] for i in range(3)] == ["00003", "00001", "00002"]
    for label_file in (gta5_root / "labels").iterdir():
        label_file.unlink()
    unlabelled = GTA5Dataset(gta5_root, IDENTITY, with_labels=False)
    assert "label" not in unlabelled[0] and unlabelled.files[0][1] is None


def test_synthia_decodes_16bit_labels_from_parent_or_own_dir(synthia_parent: Path) -> None:
    for root in (synthia_parent, synthia_parent / "RAND_CITYSCAPES"):
        dataset = SynthiaDataset(root, IDENTITY)
        assert len(dataset) == 2 and dataset.class_set.name == "synthia16"
        assert dataset[0]["name"] == "0000001"
        np.testing.assert_array_equal(dataset[0]["label"].numpy(), SYNTHIA_TRAIN_IDS)
    as_19 = SynthiaDataset(synthia_parent, IDENTITY, class_set=cityscapes19())
    assert as_19[0]["label"][0, 1] == cityscapes19().index("bicycle") == 18


def test_cityscapes_maps_ids_for_19_and_16_classes(cityscapes_root: Path) -> None:
    dataset = CityscapesDataset(cityscapes_root, "train", IDENTITY)
    assert [dataset[i]["name"] for i in range(2)] == ["aachen_000000_000019", "bochum_000000_000007"]
    np.testing.assert_array_equal(dataset[0]["label"][0].numpy(), [0, 18, 9, 14, 255, 13])
    sixteen = CityscapesDataset(cityscapes_root, "val", IDENTITY, class_set=synthia16())
    assert len(sixteen) == 1
    np.testing.assert_array_equal(sixteen[0]["label"][0].numpy(), [0, 15, 255, 255, 255, 12])


def test_cityscapes_pseudo_labels_are_read_as_train_ids(cityscapes_root: Path, tmp_path: Path) -> None:
    pseudo_dir = tmp_path / "pseudo"
    pseudo = np.array([[0, 18, 255, 5, 5, 5]] * HEIGHT, dtype=np.uint8)
    for stem in ("aachen_000000_000019", "bochum_000000_000007"):
        _write_gray(pseudo_dir / f"{stem}.png", pseudo)
    dataset = CityscapesDataset(cityscapes_root, "train", IDENTITY, pseudo_label_dir=pseudo_dir)
    np.testing.assert_array_equal(dataset[0]["label"].numpy(), pseudo)
    _write_gray(pseudo_dir / "bochum_000000_000007.png", np.full((HEIGHT, WIDTH), 40))
    with pytest.raises(DatasetError, match=re.escape(
            f"label file {pseudo_dir / 'bochum_000000_000007.png'}: expected trainIds 0..18 or 255, found [40]")):
        dataset[1]


def test_per_item_randomness_follows_seed_and_epoch(gta5_root: Path) -> None:
    crop = build_transforms(train=True, size=(24, 16), crop_size=(8, 8), scale_range=(0.8, 1.6), flip=True)
    first, same = GTA5Dataset(gta5_root, crop, seed=1), GTA5Dataset(gta5_root, crop, seed=1)
    assert torch.equal(first[0]["image"], same[0]["image"])
    crops = {tuple(first[0]["image"].flatten()[:8].tolist())}
    for epoch in range(1, 6):
        first.set_epoch(epoch)
        crops.add(tuple(first[0]["image"].flatten()[:8].tolist()))
    assert len(crops) > 1
    batch = next(iter(torch.utils.data.DataLoader(first, batch_size=3)))
    assert batch["image"].shape == (3, 3, 8, 8) and batch["label"].shape == (3, 8, 8)


def test_builders_dispatch_on_config(gta5_root: Path, synthia_parent: Path, cityscapes_root: Path) -> None:
    data_cfg = DataConfig(
        source=DatasetConfig(kind="gta5", root=str(gta5_root)),
        target=DatasetConfig(kind="cityscapes", root=str(cityscapes_root)),
        target_val=DatasetConfig(kind="cityscapes", root=str(cityscapes_root), split="val"),
        source_transform=TransformConfig(size=(12, 8), crop_size=(8, 8), flip=True),
        target_transform=TransformConfig(size=(24, 16)),
    )
    train = build_transforms_for(data_cfg, "source", train=True)
    assert train.size == (12, 8) and train.crop_size == (8, 8) and train.flip
    evaluate = build_transforms_for(data_cfg, "target", train=False)
    assert evaluate.size == (24, 16) and evaluate.keep_label_size and not evaluate.train
    source = build_dataset(data_cfg.source, cityscapes19(), train)
    assert isinstance(source, GTA5Dataset) and source[0]["label"].shape == (8, 8)
    target_val = build_dataset(data_cfg.target_val, cityscapes19(), evaluate)
    assert isinstance(target_val, CityscapesDataset) and target_val.split == "val"
    assert target_val[0]["image"].shape == (3, 16, 24) and target_val[0]["label"].shape == (HEIGHT, WIDTH)
    target = build_dataset(data_cfg.target, cityscapes19(), evaluate, with_labels=False)
    assert target.split == "train" and "label" not in target[0]
    synthia = build_dataset(DatasetConfig(kind="synthia", root=str(synthia_parent)), synthia16(), evaluate)
    assert isinstance(synthia, SynthiaDataset)


# ---------------------------------------------------------------- bad layouts


def test_missing_roots_name_the_layout(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError, match=re.escape(
            f"GTA5 root {missing} does not exist; expected the GTA5 layout: <root>/images/*.png and "
            "<root>/labels/*.png")):
        GTA5Dataset(missing, IDENTITY)
    with pytest.raises(DatasetError, match=re.escape(
            f"SYNTHIA root {missing} does not exist; expected the SYNTHIA layout: <root>/RGB/*.png and "
            "<root>/GT/LABELS/*.png")):
        SynthiaDataset(missing, IDENTITY)
    with pytest.raises(DatasetError, match=re.escape(
            f"Cityscapes root {missing} does not exist; expected the Cityscapes layout: "
            "<root>/leftImg8bit/<split>/<city>/*_leftImg8bit.png")):
        CityscapesDataset(missing, "train", IDENTITY)
    tmp_path.joinpath("empty").mkdir()
    with pytest.raises(DatasetError, match=re.escape(
            f"GTA5 image directory {tmp_path / 'empty' / 'images'} does not exist; expected the GTA5 layout")):
        GTA5Dataset(tmp_path / "empty", IDENTITY)


def test_empty_image_dir_and_missing_label(gta5_root: Path) -> None:
    (gta5_root / "labels" / "00002.png").unlink()
    with pytest.raises(DatasetError, match=re.escape(
            f"GTA5 image {gta5_root / 'images' / '00002.png'} has no label: expected "
            f"{gta5_root / 'labels' / '00002.png'}")):
        GTA5Dataset(gta5_root, IDENTITY)
    for image_file in (gta5_root / "images").iterdir():
        image_file.unlink()
    with pytest.raises(DatasetError, match=re.escape(
            f"GTA5 image directory {gta5_root / 'images'} contains no *.png images")):
        GTA5Dataset(gta5_root, IDENTITY)


def test_missing_synthia_and_cityscapes_labels_name_both_paths(synthia_parent: Path, cityscapes_root: Path) -> None:
    root = synthia_parent / "RAND_CITYSCAPES"
    (root / "GT" / "LABELS" / "0000002.png").unlink()
    with pytest.raises(DatasetError, match=re.escape(
            f"SYNTHIA image {root / 'RGB' / '0000002.png'} has no label: expected "
            f"{root / 'GT' / 'LABELS' / '0000002.png'}")):
        SynthiaDataset(synthia_parent, IDENTITY)
    stem = "bochum_000000_000007"
    (cityscapes_root / "gtFine" / "train" / "bochum" / f"{stem}_gtFine_labelIds.png").unlink()
    with pytest.raises(DatasetError, match=re.escape(
            f"Cityscapes image {cityscapes_root / 'leftImg8bit' / 'train' / 'bochum' / f'{stem}_leftImg8bit.png'} "
            f"has no label: expected {cityscapes_root / 'gtFine' / 'train' / 'bochum' / f'{stem}_gtFine_labelIds.png'}")):
        CityscapesDataset(cityscapes_root, "train", IDENTITY)
    assert len(CityscapesDataset(cityscapes_root, "train", IDENTITY, with_labels=False)) == 2


def test_corrupt_files_fail_on_access_naming_the_path(synthia_parent: Path) -> None:
    root = synthia_parent / "RAND_CITYSCAPES"
    image_bytes = (root / "RGB" / "0000002.png").read_bytes()
    (root / "RGB" / "0000002.png").write_bytes(image_bytes[: len(image_bytes) // 2])
    label_path = root / "GT" / "LABELS" / "0000001.png"
    _write_gray(label_path, np.zeros((HEIGHT, WIDTH)))
    dataset = SynthiaDataset(synthia_parent, IDENTITY)  # pairing is checked, decoding is lazy
    with pytest.raises(DatasetError, match=re.escape(f"cannot decode image file {root / 'RGB' / '0000002.png'}")):
        dataset[1]
    with pytest.raises(DatasetError, match=re.escape(
            f"label file {label_path}: expected a 16-bit 3-channel SYNTHIA label PNG")):
        dataset[0]
    with pytest.raises(IndexError):
        dataset[2]


def test_unknown_split_and_bad_list_files(cityscapes_root: Path, gta5_root: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=re.escape(
            f"Cityscapes split 'tset' not found: {cityscapes_root / 'leftImg8bit' / 'tset'} does not exist "
            "(splits present: ['train', 'val'])")):
        CityscapesDataset(cityscapes_root, "tset", IDENTITY)
    (gta5_root / "list.txt").write_text("00001\n00009.png\n")
    with pytest.raises(DatasetError, match=re.escape(
            f"list file {gta5_root / 'list.txt'} entry 2 ('00009'): image {gta5_root / 'images' / '00009.png'} "
            "does not exist")):
        GTA5Dataset(gta5_root, IDENTITY, list_file="list.txt")
    with pytest.raises(DatasetError, match=re.escape(f"list file {tmp_path / 'none.txt'} does not exist")):
        GTA5Dataset(gta5_root, IDENTITY, list_file=tmp_path / "none.txt")
    with pytest.raises(DatasetError, match=re.escape(
            f"pseudo-label directory {tmp_path / 'nope'} does not exist")):
        CityscapesDataset(cityscapes_root, "train", IDENTITY, pseudo_label_dir=tmp_path / "nope")
