"""What the server answers for one segmented image: a palette PNG of trainIds, a colour overlay, or JSON."""
from __future__ import annotations

import base64
from typing import Any, Sequence

import cv2
import numpy as np

from labelshift.data.io import encode_palette_png

OVERLAY_ALPHA = 0.5  # weight of the class colours over the image


def class_shares(mask: np.ndarray, class_names: Sequence[str]) -> dict[str, float]:
    """{class: fraction of the mask's pixels} for every class (0.0 for absent ones); mask (H, W) trainIds."""
    counts = np.bincount(mask.reshape(-1), minlength=len(class_names))[: len(class_names)]
    return {name: float(count) / mask.size for name, count in zip(class_names, counts)}


def mask_png(mask: np.ndarray, palette: Sequence[Sequence[int]]) -> bytes:
    """(H, W) uint8 trainIds -> palette PNG bytes (index = trainId; decode with PIL to get the ids back)."""
    return encode_palette_png(mask, palette)


def overlay_png(image: np.ndarray, mask: np.ndarray, palette: Sequence[Sequence[int]],
                alpha: float = OVERLAY_ALPHA) -> bytes:
    """image (H, W, 3) uint8 RGB blended with the class colours of mask (H, W) -> RGB PNG bytes."""
    colours = np.zeros((256, 3), dtype=np.float32)
    colours[: len(palette)] = np.asarray(palette, dtype=np.float32)
    blended = (1.0 - alpha) * image.astype(np.float32) + alpha * colours[mask]
    rgb = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError(f"cannot encode an overlay of shape {rgb.shape} as PNG")
    return encoded.tobytes()


def segmentation_document(mask: np.ndarray, class_names: Sequence[str], palette: Sequence[Sequence[int]],
                          info: dict[str, Any]) -> dict[str, Any]:
    """The JSON answer: size, class names, per-class pixel shares, the palette PNG (base64) and ``info`` (the
    adjustment and prior used)."""
    height, width = mask.shape
    return {"width": width, "height": height, "classes": list(class_names),
            "class_shares": class_shares(mask, class_names),
            "mask_png_base64": base64.b64encode(mask_png(mask, palette)).decode("ascii"), **info}
