"""Joint image/label transforms on numpy arrays, ending in tensors.

Inputs: image (H, W, 3) uint8 RGB, label (H, W) uint8 trainIds (255 = ignore) or ``None``.
Output of a built transform: image float32 (3, h, w) normalised with mean/std, label int64 (h', w') or ``None``.
All randomness comes from the ``np.random.Generator`` passed per call, so a seed fixes the output.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch

from labelshift.classes import IGNORE_INDEX
from labelshift.data.io import DatasetError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Size = tuple[int, int]  # (width, height), as OpenCV and the configs write it
INTERPOLATIONS: tuple[str, ...] = ("area_linear", "bicubic")


def resize_image(image: np.ndarray, size: Size, interpolation: str = "area_linear") -> np.ndarray:
    """(H, W, 3) uint8 -> (height, width, 3). ``interpolation``: ``area_linear`` (area when shrinking, bilinear
    when enlarging: no aliasing) or ``bicubic`` (what the reference's PIL ``Image.BICUBIC`` resize does)."""
    width, height = size
    if image.shape[1] == width and image.shape[0] == height:
        return image
    if interpolation == "bicubic":
        return cv2.resize(image, (width, height), interpolation=cv2.INTER_CUBIC)
    if interpolation != "area_linear":
        raise ValueError(f"unknown interpolation {interpolation!r}; expected one of {INTERPOLATIONS}")
    shrinking = width * height < image.shape[0] * image.shape[1]
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


def resize_label(label: np.ndarray, size: Size) -> np.ndarray:
    """(H, W) uint8 -> (height, width), nearest neighbour (never invents a class)."""
    width, height = size
    if label.shape[1] == width and label.shape[0] == height:
        return label
    return cv2.resize(label, (width, height), interpolation=cv2.INTER_NEAREST_EXACT)


def random_scale(image: np.ndarray, label: np.ndarray | None, scale_range: tuple[float, float],
                 rng: np.random.Generator, interpolation: str = "area_linear") -> tuple[np.ndarray, np.ndarray | None]:
    """Rescale image (H, W, 3) and label (H, W) by one factor drawn uniformly from ``scale_range``."""
    low, high = scale_range
    if low == high == 1.0:
        return image, label
    factor = rng.uniform(low, high)
    size = (max(1, round(image.shape[1] * factor)), max(1, round(image.shape[0] * factor)))
    return resize_image(image, size, interpolation), (resize_label(label, size) if label is not None else None)


def random_crop(image: np.ndarray, label: np.ndarray | None, crop_size: Size,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
    """Crop image (H, W, 3) and label (H, W) to (height, width) at one random offset.

    A side shorter than the crop is first padded at the bottom/right: image with 0, label with 255 (ignore).
    """
    crop_width, crop_height = crop_size
    pad_bottom = max(0, crop_height - image.shape[0])
    pad_right = max(0, crop_width - image.shape[1])
    if pad_bottom or pad_right:
        image = np.pad(image, ((0, pad_bottom), (0, pad_right), (0, 0)), constant_values=0)
        if label is not None:
            label = np.pad(label, ((0, pad_bottom), (0, pad_right)), constant_values=IGNORE_INDEX)
    top = int(rng.integers(0, image.shape[0] - crop_height + 1))
    left = int(rng.integers(0, image.shape[1] - crop_width + 1))
    rows, cols = slice(top, top + crop_height), slice(left, left + crop_width)
    return image[rows, cols], (label[rows, cols] if label is not None else None)


def horizontal_flip(image: np.ndarray, label: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Mirror image (H, W, 3) and label (H, W) left-right together."""
    return image[:, ::-1], (label[:, ::-1] if label is not None else None)


def color_jitter(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Random brightness, contrast and saturation, each a factor in [1 - strength, 1 + strength].

    image: (H, W, 3) uint8 RGB -> (H, W, 3) uint8 RGB.
    """
    brightness, contrast, saturation = rng.uniform(max(0.0, 1.0 - strength), 1.0 + strength, size=3)
    pixels = image.astype(np.float32) * brightness
    gray = pixels @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    pixels = (pixels - gray.mean()) * contrast + gray.mean()
    gray = pixels @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    pixels = gray[..., None] + (pixels - gray[..., None]) * saturation
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def hue_shift(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Rotate every pixel's hue by one factor drawn from [-strength, strength] of the colour wheel (torchvision's
    ``ColorJitter(hue=strength)``); OpenCV's 8-bit HSV quantises the hue to 2 degrees.

    image: (H, W, 3) uint8 RGB -> (H, W, 3) uint8 RGB.
    """
    factor = rng.uniform(-strength, strength)
    hsv = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2HSV)
    hsv[..., 0] = ((hsv[..., 0].astype(np.int32) + int(round(factor * 180))) % 180).astype(np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def to_tensors(image: np.ndarray, label: np.ndarray | None, mean: tuple[float, float, float],
               std: tuple[float, float, float]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """image (H, W, 3) uint8 -> float32 (3, H, W) ``(x / 255 - mean) / std``; label (H, W) -> int64 (H, W)."""
    pixels = image.astype(np.float32) / 255.0
    pixels = (pixels - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    image_tensor = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))
    label_tensor = torch.from_numpy(label.astype(np.int64)) if label is not None else None
    return image_tensor, label_tensor


def _check_inputs(image: np.ndarray, label: np.ndarray | None) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise DatasetError(f"expected an (H, W, 3) uint8 image, got shape {image.shape} dtype {image.dtype}")
    if label is not None and label.ndim != 2:
        raise DatasetError(f"expected an (H, W) label, got shape {label.shape}")


@dataclass(frozen=True)
class SegmentationTransform:
    """A picklable joint transform; build it with :func:`build_transforms`.

    Call: ``(image (H, W, 3) uint8, label (H, W) uint8 | None, rng) -> (float32 (3, h, w), int64 | None)``.
    Training: resize to ``base_size`` (else ``size``) -> random scale -> random crop -> flip -> colour jitter ->
    hue. Evaluation: resize the image to ``size``; the label follows, or keeps its own resolution when
    ``keep_label_size``. Images resize with ``interpolation``, labels with nearest neighbour.
    """

    train: bool
    size: Size | None
    crop_size: Size | None = None
    scale_range: tuple[float, float] = (1.0, 1.0)
    flip: bool = False
    color_jitter: float = 0.0
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    keep_label_size: bool = False
    base_size: Size | None = None
    hue: float = 0.0
    interpolation: str = "area_linear"

    def __call__(self, image: np.ndarray, label: np.ndarray | None,
                 rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        _check_inputs(image, label)
        size = self.base_size if self.train and self.base_size is not None else self.size
        if size is not None:
            image = resize_image(image, size, self.interpolation)
            if label is not None and not self.keep_label_size:
                label = resize_label(label, size)
        if self.train:
            image, label = self._augment(image, label, rng)
        return to_tensors(image, label, self.mean, self.std)

    def _augment(self, image: np.ndarray, label: np.ndarray | None,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
        if label is not None and label.shape != image.shape[:2]:
            raise DatasetError(f"image shape {image.shape[:2]} and label shape {label.shape} differ")
        image, label = random_scale(image, label, self.scale_range, rng, self.interpolation)
        if self.crop_size is not None:
            image, label = random_crop(image, label, self.crop_size, rng)
        if self.flip and rng.random() < 0.5:
            image, label = horizontal_flip(image, label)
        if self.color_jitter > 0:
            image = color_jitter(image, self.color_jitter, rng)
        if self.hue > 0:
            image = hue_shift(image, self.hue, rng)
        return image, label


def build_transforms(*, train: bool, size: Size | None, crop_size: Size | None = None,
                     scale_range: tuple[float, float] = (1.0, 1.0), flip: bool = False,
                     color_jitter: float = 0.0, mean: tuple[float, float, float] = IMAGENET_MEAN,
                     std: tuple[float, float, float] = IMAGENET_STD,
                     keep_label_size: bool = False, base_size: Size | None = None, hue: float = 0.0,
                     interpolation: str = "area_linear") -> SegmentationTransform:
    """Build the joint transform ``(image, label | None, rng) -> (image_tensor, label_tensor | None)``.

    ``size``/``crop_size``/``base_size`` are (width, height); ``size=None`` keeps the input size.
    ``base_size`` (the size training resizes to before scale and crop), ``crop_size``, ``scale_range``,
    ``flip``, ``color_jitter`` and ``hue`` apply only when ``train`` (evaluation is deterministic).
    ``keep_label_size`` (evaluation only) keeps the label at its original resolution.
    """
    if keep_label_size and train:
        raise ValueError("keep_label_size is for evaluation; a training label must match the image crop")
    low, high = scale_range
    if not 0 < low <= high:
        raise ValueError(f"scale_range must satisfy 0 < low <= high, got {scale_range}")
    if color_jitter < 0 or not 0 <= hue <= 0.5:
        raise ValueError(f"need color_jitter >= 0 and 0 <= hue <= 0.5, got {color_jitter}, {hue}")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"unknown interpolation {interpolation!r}; expected one of {INTERPOLATIONS}")
    for name, value in (("size", size), ("crop_size", crop_size), ("base_size", base_size)):
        if value is not None and (len(value) != 2 or min(value) < 1):
            raise ValueError(f"{name} must be (width, height) with positive sides, got {value}")
    return SegmentationTransform(
        train=train, size=tuple(size) if size is not None else None,
        crop_size=tuple(crop_size) if crop_size is not None else None,
        scale_range=(float(low), float(high)), flip=flip, color_jitter=float(color_jitter),
        mean=tuple(mean), std=tuple(std), keep_label_size=keep_label_size,
        base_size=tuple(base_size) if base_size is not None else None, hue=float(hue), interpolation=interpolation,
    )
