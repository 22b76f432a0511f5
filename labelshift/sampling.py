"""Random draws keyed by an image's name, so that a sample does not depend on sharding, batching or order.

A pass that runs over many workers (Ray Data actors) sees images in any order and grouping. Every random draw
that belongs to one image (EM's pixel keys, the calibration's pixel sample, the bootstrap's multiplicities) comes
from a generator seeded by ``(seed, stream, key of the image's name)``: the same image gets the same draw
wherever and whenever it is processed.
"""
from __future__ import annotations

import hashlib

import numpy as np

EM_PIXEL_KEYS = 1  # EM's uniform pixel keys (bottom-k sample)
BOOTSTRAP_WEIGHTS = 2  # the bootstrap's per-image multiplicities
CALIBRATION_PIXELS = 3  # the labelled pixel sample calibration and BBSE's confusion are fitted on


def name_key(name: str) -> int:
    """A stable 64-bit key of an image name (the first 8 bytes of its sha256)."""
    return int.from_bytes(hashlib.sha256(str(name).encode("utf-8")).digest()[:8], "little")


def keyed_generator(seed: int, stream: int, key: int) -> np.random.Generator:
    """The generator of one image's draws of one ``stream`` (a constant above) under ``seed``."""
    return np.random.default_rng([int(seed), int(stream), int(key)])
