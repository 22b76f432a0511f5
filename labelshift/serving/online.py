"""Online tracking of the target class prior from what a server segments.

A bounded window of the last ``window_images`` served images keeps ``pixels_per_image`` uniformly drawn pixels
of each image's raw logits (K floats a pixel). Every ``update_every`` images (once ``min_images`` are in the
window) the target prior is re-estimated with the library's estimate pass: a fresh EM estimator
(:mod:`labelshift.estimate`) fed the window through :func:`~labelshift.estimate.update_estimators`, i.e. on the
BCTS-calibrated posteriors under the prior of the calibrated posteriors, as the job's estimate stage does.
"""
from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from labelshift.calibrate import Calibration
from labelshift.estimate import EstimatorInputs, estimator_results, make_estimators, update_estimators
from labelshift.priors import ClassPrior, SourcePriors

ONLINE_METHOD = "em"


@dataclass(frozen=True)
class OnlineState:
    """What ``GET /v1/priors`` reports: the tracked prior (None until the first estimate), the window's fill
    and capacity, the images seen, the estimates made and when the last one was (Unix seconds, or None)."""

    prior: ClassPrior | None
    window_images: int
    window_capacity: int
    pixels_per_image: int
    images_seen: int
    updates: int
    updated_at: float | None

    def to_dict(self) -> dict[str, Any]:
        return {"prior": None if self.prior is None else self.prior.to_dict(), "window_images": self.window_images,
                "window_capacity": self.window_capacity, "pixels_per_image": self.pixels_per_image,
                "images_seen": self.images_seen, "updates": self.updates, "updated_at": self.updated_at}


class OnlinePriorTracker:
    """Re-estimates the target prior (EM, a pixel prior) over a sliding window of served images.

    ``source``: the bundle's source priors (``source.calibrated``: the prior of the calibrated posteriors, EM's
    source prior); ``calibration``: the estimate stage's calibration. Thread-safe: a server observes from its
    inference thread and reports from its event loop.
    """

    def __init__(self, class_names: tuple[str, ...], source: SourcePriors, calibration: Calibration, *,
                 window_images: int = 32, pixels_per_image: int = 1000, update_every: int = 4,
                 min_images: int = 4, seed: int = 0) -> None:
        if min(window_images, pixels_per_image, update_every, min_images) < 1 or min_images > window_images:
            raise ValueError("online tracking needs positive window_images, pixels_per_image, update_every and "
                             f"1 <= min_images <= window_images, got {window_images}, {pixels_per_image}, "
                             f"{update_every}, {min_images}")
        self.class_names = class_names
        self.inputs = EstimatorInputs(source.pixel, source.calibrated or source.pixel,
                                      em_sample_pixels=window_images * pixels_per_image)
        self.calibration = calibration
        self.window: collections.deque[torch.Tensor] = collections.deque(maxlen=window_images)
        self.pixels_per_image, self.update_every, self.min_images = pixels_per_image, update_every, min_images
        self.seed = seed
        self._rng = np.random.default_rng(seed)
        self._lock = threading.Lock()
        self._since_update = 0
        self._images_seen = 0
        self._updates = 0
        self._updated_at: float | None = None
        self._prior: ClassPrior | None = None

    @property
    def prior(self) -> ClassPrior | None:
        """The latest estimate, or None before the window first held ``min_images``."""
        return self._prior

    def observe(self, logits: torch.Tensor) -> None:
        """Add one served image's raw logits (1, K, H, W) to the window; re-estimate when due."""
        pixels = logits.shape[2] * logits.shape[3]
        chosen = torch.from_numpy(self._rng.choice(pixels, size=min(self.pixels_per_image, pixels), replace=False))
        sample = logits.flatten(2)[0][:, chosen.to(logits.device)].float().cpu()  # (K, M)
        with self._lock:
            self.window.append(sample)
            self._images_seen += 1
            self._since_update += 1
            due = self._since_update >= self.update_every and len(self.window) >= self.min_images
            window = list(self.window) if due else []
            if due:
                self._since_update = 0
        if due:
            prior = self.estimate(window)
            with self._lock:
                self._prior, self._updates, self._updated_at = prior, self._updates + 1, time.time()

    def estimate(self, window: list[torch.Tensor]) -> ClassPrior:
        """EM over the window's samples ((K, M) raw logits per image, each image one unit)."""
        estimators = make_estimators((ONLINE_METHOD,), self.class_names, self.inputs, bootstrap=0, seed=self.seed)
        for sample in window:
            update_estimators(estimators, sample[None, :, None, :], self.calibration)
        provenance = {"split": "served images (online window)", "window_images": len(window),
                      "calibration": self.calibration.to_dict()}
        return estimator_results(estimators, provenance)[ONLINE_METHOD]

    def state(self) -> OnlineState:
        with self._lock:
            return OnlineState(self._prior, len(self.window), self.window.maxlen or 0, self.pixels_per_image,
                               self._images_seen, self._updates, self._updated_at)
