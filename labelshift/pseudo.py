"""Pseudo labels for self-distillation: the corrected teacher labels every target-train image.

One function, :func:`write_pseudo_labels`, so that a later Ray Data pipeline can replace the engine.
Output: ``<out_dir>/<stem>.png`` single-channel uint8 trainIds at the model input size, 255 where the
teacher's confidence is below the threshold.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn

from labelshift.classes import IGNORE_INDEX
from labelshift.data.io import write_png_atomic
from labelshift.inference import iterate_predictions


def write_pseudo_labels(model: nn.Module, loader: Iterable[dict], out_dir: str | Path, *, device: torch.device,
                        logit_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                        confidence_threshold: float = 0.0, amp_dtype: torch.dtype | None = None) -> dict:
    """Label every image of ``loader``; returns counts (images, kept pixels, kept fraction)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images = kept = total = 0
    for logits, _, names in iterate_predictions(model, loader, device=device, at_label_size=False,
                                                    amp_dtype=amp_dtype):
        if logit_transform is not None:
            logits = logit_transform(logits)
        confidence, labels = logits.softmax(1).max(1)
        labels[confidence < confidence_threshold] = IGNORE_INDEX
        for name, label in zip(names, labels.to(torch.uint8).cpu().numpy()):
            write_png_atomic(out_dir / f"{name}.png", np.ascontiguousarray(label))
        images += len(names)
        kept += int((labels != IGNORE_INDEX).sum())
        total += labels.numel()
    return {"images": images, "kept_pixel_fraction": kept / max(total, 1)}
