"""Safe image I/O for the dataset layouts, and the file-pair machinery the datasets share.

Label files hide traps: GTA5 labels are 8-bit palette PNGs that OpenCV expands
to colour, so they are read with PIL; SYNTHIA labels are 16-bit 3-channel PNGs that PIL truncates to 8 bits,
so they are read with OpenCV. Every failure raises :class:`DatasetError` naming the file and the expectation.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Callable, Literal, Sequence

import cv2
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from labelshift.atomic import write_bytes_atomic
from labelshift.classes import IGNORE_INDEX, ClassSet

LabelKind = Literal["palette", "gray", "synthia16bit"]
LABEL_KINDS: tuple[str, ...] = ("palette", "gray", "synthia16bit")


class DatasetError(ValueError):
    """A dataset file or layout is missing, unreadable or malformed; the message names the path."""


def _require_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise DatasetError(f"{what} {path} does not exist")


def _decode_with_cv2(path: Path, what: str) -> np.ndarray:
    """Decode ``path`` with ``cv2.IMREAD_UNCHANGED`` (channels in BGR order); errors name the path."""
    _require_file(path, what)
    encoded = np.fromfile(str(path), dtype=np.uint8)
    decoded = cv2.imdecode(encoded, cv2.IMREAD_UNCHANGED) if encoded.size else None
    if decoded is None:
        raise DatasetError(f"cannot decode {what} {path}: not a readable image file (corrupt or wrong format)")
    return decoded


def read_image(path: str | Path) -> np.ndarray:
    """Read an 8-bit colour image as RGB.

    Returns: (H, W, 3) uint8, channels R, G, B. A missing, undecodable, grayscale, alpha or 16-bit file
    raises :class:`DatasetError` naming the path.
    """
    path = Path(path)
    decoded = _decode_with_cv2(path, "image file")
    if decoded.ndim != 3 or decoded.shape[2] != 3 or decoded.dtype != np.uint8:
        raise DatasetError(
            f"image file {path}: expected an 8-bit 3-channel colour image, "
            f"got shape {decoded.shape} dtype {decoded.dtype}"
        )
    return cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB)


def _read_palette_ids(path: Path) -> np.ndarray:
    _require_file(path, "label file")
    try:
        with Image.open(path) as image:
            image.load()
            mode = image.mode
            ids = np.array(image)
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise DatasetError(f"cannot decode label file {path}: not a readable image file ({err})") from None
    if mode not in ("P", "L") or ids.ndim != 2:
        raise DatasetError(
            f"label file {path}: expected an 8-bit palette PNG (PIL mode 'P' or 'L'), got mode {mode!r} "
            f"shape {ids.shape}"
        )
    return ids.astype(np.uint8, copy=False)


def read_label_ids(path: str | Path, kind: LabelKind) -> np.ndarray:
    """Read the raw label ids of a label PNG.

    ``kind``: ``"palette"`` (GTA5, 8-bit palette PNG read with PIL), ``"gray"`` (Cityscapes
    ``*_gtFine_labelIds.png`` or our trainId pseudo labels, 8-bit single channel) or ``"synthia16bit"``
    (SYNTHIA RAND_CITYSCAPES ``GT/LABELS``, 16-bit 3-channel, class id in the red channel).
    Returns: (H, W) uint8 for ``palette``/``gray``, (H, W) uint16 for ``synthia16bit``.
    """
    path = Path(path)
    if kind == "palette":
        return _read_palette_ids(path)
    if kind == "gray":
        decoded = _decode_with_cv2(path, "label file")
        if decoded.ndim != 2 or decoded.dtype != np.uint8:
            raise DatasetError(
                f"label file {path}: expected a single-channel 8-bit label PNG, "
                f"got shape {decoded.shape} dtype {decoded.dtype}"
            )
        return decoded
    if kind == "synthia16bit":
        decoded = _decode_with_cv2(path, "label file")
        if decoded.ndim != 3 or decoded.shape[2] != 3 or decoded.dtype != np.uint16:
            raise DatasetError(
                f"label file {path}: expected a 16-bit 3-channel SYNTHIA label PNG (class id in the red "
                f"channel), got shape {decoded.shape} dtype {decoded.dtype}"
            )
        return np.ascontiguousarray(decoded[..., 2])  # OpenCV order is B, G, R
    raise ValueError(f"unknown label kind {kind!r}; known: {list(LABEL_KINDS)}")


def write_png_atomic(path: str | Path, array: np.ndarray) -> None:
    """Write a PNG atomically (temporary name in the same directory, then ``os.replace``).

    ``array``: (H, W) single channel, (H, W, 3) RGB or (H, W, 4) RGBA; uint8 or uint16. Channel order is the
    one :func:`read_image` returns (R first), so a SYNTHIA-style label is written with the id in channel 0.
    """
    path = Path(path)
    if array.dtype not in (np.uint8, np.uint16):
        raise DatasetError(f"cannot write {path}: expected a uint8 or uint16 array, got dtype {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 3:
        array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    elif array.ndim == 3 and array.shape[2] == 4:
        array = cv2.cvtColor(array, cv2.COLOR_RGBA2BGRA)
    elif array.ndim != 2:
        raise DatasetError(f"cannot write {path}: expected shape (H, W), (H, W, 3) or (H, W, 4), got {array.shape}")
    ok, encoded = cv2.imencode(".png", np.ascontiguousarray(array))
    if not ok:
        raise DatasetError(f"cannot encode {path} as PNG (shape {array.shape}, dtype {array.dtype})")
    write_bytes_atomic(path, encoded.tobytes())


def write_palette_png(path: str | Path, ids: np.ndarray, palette: Sequence[Sequence[int]] | np.ndarray) -> None:
    """Write label ids as an 8-bit palette PNG (PIL mode ``"P"``, the GTA5 label format), atomically.

    ``ids``: (H, W) integers in 0..255. ``palette``: up to 256 (r, g, b) triples; entry i colours id i
    (missing entries are black).
    """
    write_bytes_atomic(path, encode_palette_png(ids, palette, what=f"cannot write {path}"))


def encode_palette_png(ids: np.ndarray, palette: Sequence[Sequence[int]] | np.ndarray, *,
                       what: str = "cannot encode a palette PNG") -> bytes:
    """The bytes of an 8-bit palette PNG of ``ids`` (H, W) in 0..255 (what :func:`write_palette_png` writes)."""
    ids = np.asarray(ids)
    if ids.ndim != 2 or ids.size == 0 or ids.min() < 0 or ids.max() > 255:
        raise DatasetError(f"{what}: expected (H, W) ids in 0..255, got shape {ids.shape}")
    colours = np.asarray(palette, dtype=np.int64).reshape(-1, 3)
    if len(colours) > 256 or colours.min(initial=0) < 0 or colours.max(initial=0) > 255:
        raise DatasetError(f"{what}: expected at most 256 (r, g, b) triples in 0..255 as palette")
    flat_palette = np.zeros((256, 3), dtype=np.uint8)
    flat_palette[: len(colours)] = colours
    ids8 = np.ascontiguousarray(ids, dtype=np.uint8)
    image = Image.frombytes("P", (ids8.shape[1], ids8.shape[0]), ids8.tobytes())
    image.putpalette(flat_palette.reshape(-1).tolist())
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def require_directory(path: Path, description: str, layout: str) -> Path:
    """``path`` if it is a directory, else a :class:`DatasetError` ``"<description> <path> does not exist; ..."``."""
    if not path.is_dir():
        raise DatasetError(f"{description} {path} does not exist; expected the {layout}")
    return path


def index_images(image_dir: Path, pattern: str, image_suffix: str, dataset_name: str) -> dict[str, Path]:
    """stem -> path of the files matching ``pattern`` under ``image_dir`` (stem = name minus ``image_suffix``);
    none found raises :class:`DatasetError`."""
    images = {path.name[: -len(image_suffix)]: path for path in image_dir.glob(pattern)
              if path.is_file() and path.name.endswith(image_suffix)}
    if not images:
        raise DatasetError(f"{dataset_name} image directory {image_dir} contains no {pattern} images")
    return images


def resolve_list_path(list_file: str | Path, root: Path) -> Path:
    """The list file's path: a relative ``list_file`` resolves against the dataset ``root``."""
    list_path = Path(list_file)
    return list_path if list_path.is_absolute() else root / list_path


def read_list_file(list_path: Path, image_suffix: str = ".png") -> list[str]:
    """Stems listed in ``list_path``, one per line, in file order.

    Lines may hold stems (``00001``) or file names (``00001.png``, ``images/00001.png``); the directory part
    and ``image_suffix`` (else ``.png``) are dropped. Blank lines and lines starting with ``#`` are skipped.
    """
    if not list_path.is_file():
        raise DatasetError(f"list file {list_path} does not exist")
    stems = []
    for line in list_path.read_text().splitlines():
        entry = line.strip()
        if entry and not entry.startswith("#"):
            name = Path(entry).name
            for suffix in (image_suffix, ".png"):
                if name.endswith(suffix):
                    name = name[: -len(suffix)]
                    break
            stems.append(name)
    if not stems:
        raise DatasetError(f"list file {list_path} lists no images")
    return stems


def select_images(images: dict[str, Path], list_path: Path | None, expected: Callable[[str], Path],
                  image_suffix: str = ".png") -> list[tuple[str, Path]]:
    """(stem, image path) pairs: all of ``images`` (stem -> path) in sorted order, or those ``list_path`` names.

    ``expected(stem)`` gives the image path a listed stem should have, for the error message.
    """
    if list_path is None:
        return sorted(images.items(), key=lambda item: str(item[1]))
    selected = []
    for line_number, stem in enumerate(read_list_file(list_path, image_suffix), start=1):
        if stem not in images:
            raise DatasetError(f"list file {list_path} entry {line_number} ({stem!r}): image {expected(stem)} "
                               "does not exist")
        selected.append((stem, images[stem]))
    return selected


def pair_labels(dataset_name: str, images: list[tuple[str, Path]],
                label_path_of: Callable[[str, Path], Path] | None) -> list[tuple[Path, Path | None]]:
    """(image, label) pairs; ``label_path_of(stem, image_path)`` gives the expected label path (``None``: no
    labels). Checks existence only; a missing label raises naming the image and the expected label path."""
    pairs: list[tuple[Path, Path | None]] = []
    for stem, image_path in images:
        label_path = label_path_of(stem, image_path) if label_path_of is not None else None
        if label_path is not None and not label_path.is_file():
            raise DatasetError(f"{dataset_name} image {image_path} has no label: expected {label_path}")
        pairs.append((image_path, label_path))
    return pairs


def flat_layout_pairs(dataset_name: str, list_root: Path, image_dir: Path, label_dir: Path, layout: str,
                      list_file: str | Path | None, with_labels: bool
                      ) -> tuple[list[tuple[Path, Path | None]], list[str]]:
    """(image, label) pairs and stems of a flat layout, ``<image_dir>/<stem>.png`` with ``<label_dir>/<stem>.png``
    (GTA5, SYNTHIA). ``list_file`` (relative: against ``list_root``) selects images; default: all, sorted."""
    if with_labels:
        require_directory(label_dir, f"{dataset_name} label directory", layout)
    images = index_images(image_dir, "*.png", ".png", dataset_name)
    list_path = resolve_list_path(list_file, list_root) if list_file is not None else None
    selected = select_images(images, list_path, lambda stem: image_dir / f"{stem}.png")
    label_path_of = (lambda stem, image_path: label_dir / image_path.name) if with_labels else None
    return pair_labels(dataset_name, selected, label_path_of), [stem for stem, _ in selected]


Transform = Callable[[np.ndarray, np.ndarray | None, np.random.Generator],
                     tuple[torch.Tensor, torch.Tensor | None]]


class SegmentationFileDataset(Dataset):
    """A list of (image, label) files decoded lazily; the base of the GTA5, SYNTHIA and Cityscapes loaders.

    ``__getitem__(i)`` returns ``{"image": float32 (3, H, W), "label": int64 (H, W) trainIds with 255 = ignore
    (absent when ``with_labels=False``), "name": str stem}``. The per-item generator is
    ``np.random.default_rng([seed, epoch, i])``, so a seed and epoch fix every random transform. With
    persistent DataLoader workers call ``set_epoch`` before the workers start (it is not propagated to them).
    """

    dataset_name = "dataset"

    def __init__(self, files: list[tuple[Path, Path | None]], names: list[str], class_set: ClassSet,
                 transform: Transform, label_kind: LabelKind, label_lut: np.ndarray | None,
                 seed: int = 0) -> None:
        self.files = files
        self.names = names
        self.class_set = class_set
        self.transform = transform
        self.label_kind = label_kind
        self.label_lut = label_lut
        self.seed = seed
        self.epoch = 0
        self.with_labels = all(label_path is not None for _, label_path in files)

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch`` in the per-item random generators from now on."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.files)

    def read_train_ids(self, label_path: Path) -> np.ndarray:
        """Decode one label file to (H, W) uint8 trainIds of ``class_set`` (255 = ignore)."""
        raw_ids = read_label_ids(label_path, self.label_kind)
        if self.label_lut is not None:
            return self.label_lut[raw_ids]
        invalid = (raw_ids >= self.class_set.num_classes) & (raw_ids != IGNORE_INDEX)
        if invalid.any():
            raise DatasetError(
                f"label file {label_path}: expected trainIds 0..{self.class_set.num_classes - 1} or "
                f"{IGNORE_INDEX}, found {sorted(np.unique(raw_ids[invalid]).tolist())[:5]}"
            )
        return raw_ids

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {self.dataset_name} dataset of {len(self)} items")
        index = index % len(self)
        image_path, label_path = self.files[index]
        image = read_image(image_path)
        train_ids = self.read_train_ids(label_path) if label_path is not None else None
        rng = np.random.default_rng([self.seed, self.epoch, index])
        try:
            image_tensor, label_tensor = self.transform(image, train_ids, rng)
        except DatasetError as err:
            raise DatasetError(f"{image_path}: {err}") from None
        item = {"image": image_tensor, "name": self.names[index]}
        if label_tensor is not None:
            item["label"] = label_tensor
        return item

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({len(self)} images, class_set={self.class_set.name!r}, "
                f"with_labels={self.with_labels})")


class LabelMaps(Dataset):
    """The label maps of a labelled :class:`SegmentationFileDataset`, decoded without reading any image.

    ``__getitem__(i)`` returns ``{"label": uint8 (H, W) trainIds at full resolution, "name": str}``: what exact
    class statistics need (``labelshift source-stats``, the estimate stage), at a fraction of the I/O.
    """

    def __init__(self, dataset: SegmentationFileDataset) -> None:
        if not dataset.with_labels:
            raise DatasetError(f"{dataset!r} has no labels to count")
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        _, label_path = self.dataset.files[index]
        return {"label": torch.from_numpy(self.dataset.read_train_ids(label_path)), "name": self.dataset.names[index]}


def collate_eval(items: list[dict]) -> dict:
    """Batch evaluation items whose labels may differ in size (a few GTA5 frames do): images are stacked (they
    are resized to the model input), labels padded with the ignore index to the largest, and ``label_size``
    (B, 2) records each label's own (height, width)."""
    batch = {"image": torch.stack([item["image"] for item in items]), "name": [item["name"] for item in items]}
    if "label" in items[0]:
        sizes = [tuple(item["label"].shape) for item in items]
        height, width = max(h for h, _ in sizes), max(w for _, w in sizes)
        labels = torch.full((len(items), height, width), IGNORE_INDEX, dtype=items[0]["label"].dtype)
        for row, item in enumerate(items):
            labels[row, : item["label"].shape[0], : item["label"].shape[1]] = item["label"]
        batch["label"] = labels
        batch["label_size"] = torch.tensor(sizes)
    return batch
