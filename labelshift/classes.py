"""Class sets: names, label-id -> trainId lookup tables, colour palettes.

The Cityscapes table comes from the official ``cityscapesscripts`` package (``helpers/labels.py``);
the SYNTHIA-16 label map comes from the reference code's published map, shipped as data in
``labelshift/presets/reference-priors.json``.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from importlib import resources

import numpy as np

IGNORE_INDEX = 255


@functools.cache
def reference_statistics() -> dict:
    """The published statistics of the reference code (``presets/reference-priors.json``)."""
    text = resources.files("labelshift").joinpath("presets/reference-priors.json").read_text()
    return json.loads(text)


@dataclass(frozen=True)
class ClassSet:
    """An ordered set of training classes (index = trainId).

    ``label_lut`` maps a raw label id (0..65535 at most) to the trainId, 255 elsewhere.
    """

    name: str
    names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    label_ids: tuple[int, ...]  # raw dataset label id of each class (Cityscapes ids for the 19/16 sets)

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def index(self, name: str) -> int:
        return self.names.index(name)

    def subset_indices(self, names: tuple[str, ...] | list[str]) -> list[int]:
        """trainIds of ``names``; unknown names raise ``KeyError`` naming them."""
        missing = [n for n in names if n not in self.names]
        if missing:
            raise KeyError(f"classes {missing} are not in class set {self.name!r} ({list(self.names)})")
        return [self.names.index(n) for n in names]

    def cityscapes_id_lut(self) -> np.ndarray:
        """(256,) uint8: Cityscapes label id -> trainId of this class set (255 when not in the set)."""
        lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
        for train_id, label_id in enumerate(self.label_ids):
            lut[label_id] = train_id
        return lut

    def colorize(self, train_ids: np.ndarray) -> np.ndarray:
        """(H, W) trainIds -> (H, W, 3) uint8 RGB; ignore pixels are black."""
        palette = np.zeros((256, 3), dtype=np.uint8)
        palette[: self.num_classes] = np.asarray(self.palette, dtype=np.uint8)
        return palette[train_ids]


@functools.cache
def _cityscapes_train_labels() -> list:
    from cityscapesscripts.helpers.labels import labels  # stdlib-only module of the official package

    train = [lab for lab in labels if 0 <= lab.trainId < IGNORE_INDEX and lab.id >= 0]
    return sorted(train, key=lambda lab: lab.trainId)


@functools.cache
def cityscapes19() -> ClassSet:
    """The 19 Cityscapes evaluation classes, from the official label table."""
    labs = _cityscapes_train_labels()
    return ClassSet(
        name="cityscapes19",
        names=tuple(lab.name for lab in labs),
        palette=tuple(tuple(lab.color) for lab in labs),
        label_ids=tuple(lab.id for lab in labs),
    )


@functools.cache
def synthia16() -> ClassSet:
    """The 16 classes shared by SYNTHIA and Cityscapes (the 19 without terrain, truck, train)."""
    full = cityscapes19()
    keep = [i for i, n in enumerate(full.names) if n not in ("terrain", "truck", "train")]
    return ClassSet(
        name="synthia16",
        names=tuple(full.names[i] for i in keep),
        palette=tuple(full.palette[i] for i in keep),
        label_ids=tuple(full.label_ids[i] for i in keep),
    )


MIOU13_EXCLUDED = ("wall", "fence", "pole")


def miou13_names() -> tuple[str, ...]:
    """The 13 classes of SYNTHIA's mIoU* (the 16 without wall, fence, pole)."""
    return tuple(n for n in synthia16().names if n not in MIOU13_EXCLUDED)


@functools.cache
def synthia_label_lut() -> np.ndarray:
    """(65536,) uint8: SYNTHIA RAND_CITYSCAPES class id -> synthia16 trainId (255 elsewhere)."""
    lut = np.full(65536, IGNORE_INDEX, dtype=np.uint8)
    for label_id, train_id in reference_statistics()["synthia_label_id_to_train_id_16"].items():
        lut[int(label_id)] = train_id
    return lut


CLASS_SETS = {"cityscapes19": cityscapes19, "synthia16": synthia16}


def get_class_set(name: str) -> ClassSet:
    try:
        return CLASS_SETS[name]()
    except KeyError:
        raise KeyError(f"unknown class set {name!r}; known: {sorted(CLASS_SETS)}") from None
