"""Per-image target priors, shrunk toward the dataset's: what ``adjust.mode: local`` adjusts each image with.

A street image's class mix differs far more from the dataset's than the dataset's from the source's; an image's
own prior q_i, estimated from its pixel posteriors without labels, is shrunk toward the dataset prior π̂ (the
configured target estimate, e.g. ``em``). Everything here is batched over images, runs on the logits' device
and is stateless: an image's prior depends on that image alone (its pixels are read on a regular grid), so a
batch of 1 and a batch of 8 give the same priors, and a Serve request needs nothing but the bundle.

Estimators (``adjust.local.estimator``):

- ``map_em``: MAP-EM (Saerens et al. 2002 with a Dirichlet prior of concentration κ centred on π̂). The image
  weighs ``effective_pixels`` = n_eff pixels (its pixels are strongly correlated, so not their count); the
  fixed point is ``q = (n_eff·mean_x r_x(q) + κ·π̂) / (n_eff + κ)`` with the responsibilities
  ``r_x(q) ∝ p(y|x)·q/π_post``. κ = inf gives π̂ exactly (global IA); κ = 0 plain per-image EM.
- ``map_count``: hard EM: the image's argmax histogram after IA toward its current prior, shrunk the same way,
  ``count_steps`` times from q = π̂ (the first step reads the argmax of global IA).

With ``presence`` (the default) the estimate is then multiplied by each class's probability of being present in
the image (:mod:`labelshift.image_presence`, a model fitted with the calibration on labelled source val, read on
the image's logits after global IA), floored at ``floor``, and renormalised: the classes an image predicts but
most likely does not contain lose their mass, where the shrinkage alone keeps λ·π̂_c for them.

Safety: every class keeps at least ``floor``·π̂_c (then renormalised), and an image whose EM has not converged
after ``max_iter`` iterations uses π̂; both are counted in :class:`ImagePriors`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from labelshift.image_presence import (MISSING_MODEL, PRESENCE_GRID_PIXELS, PresenceModel, grid_pixels,
                                       presence_features)

__all__ = ["ImagePriors", "LocalSettings", "estimate_image_priors", "floor_rows", "grid_pixels", "map_count",
           "map_em", "summarise_counts"]


@dataclass(frozen=True)
class LocalSettings:
    """The settings of one per-image estimate (the fields of ``labelshift.config.sections.LocalAdjustConfig``,
    whose defaults they take through :meth:`of`)."""

    estimator: str
    kappa: float
    effective_pixels: float
    sample_pixels: int
    posteriors: str
    floor: float
    max_iter: int
    tol: float
    count_steps: int
    presence: bool

    @classmethod
    def of(cls, local: Any) -> LocalSettings:
        """From a ``LocalAdjustConfig`` (or anything with these attributes)."""
        return local if isinstance(local, cls) else cls(**{name: getattr(local, name)
                                                            for name in cls.__dataclass_fields__})

    @property
    def reads_calibrated(self) -> bool:
        """Whether the estimate reads calibrated posteriors (``map_em`` on ``posteriors: calibrated``): it then
        needs the calibration."""
        return self.estimator == "map_em" and self.posteriors == "calibrated"

    @property
    def shrinkage(self) -> float:
        """λ = κ / (κ + n_eff): the weight of the dataset prior in the MAP fixed point (1 for κ = inf)."""
        return 1.0 if math.isinf(self.kappa) else self.kappa / (self.kappa + self.effective_pixels)


@dataclass
class ImagePriors:
    """The per-image priors of a batch and how they were reached.

    probs: (N, K) float64 (on the logits' device), each row a floored probability vector; iterations: (N,)
    int64 (0 for a closed form); fallback: (N,) bool, EM not converged so the dataset prior was used;
    floored: (N,) int64, classes raised to the floor.
    """

    probs: torch.Tensor
    iterations: torch.Tensor
    fallback: torch.Tensor
    floored: torch.Tensor

    def __len__(self) -> int:
        return self.probs.shape[0]

    def row(self, index: int) -> ImagePriors:
        """The priors of image ``index`` alone (a batch of one)."""
        return ImagePriors(*(part[index: index + 1] for part in
                             (self.probs, self.iterations, self.fallback, self.floored)))

    def counts(self) -> dict[str, int]:
        """Safety counts of the batch: images, images that fell back to the dataset prior, images with a floored
        class, floored (image, class) pairs."""
        return {"images": len(self), "fallback_images": int(self.fallback.sum()),
                "floored_images": int((self.floored > 0).sum()), "floored_classes": int(self.floored.sum())}

    def record(self, index: int) -> dict[str, Any]:
        """A JSON-ready record of image ``index``: its prior and diagnostics."""
        return {"prior": self.probs[index].cpu().tolist(), "iterations": int(self.iterations[index]),
                "fallback": bool(self.fallback[index]), "floored_classes": int(self.floored[index])}


def _as_rows(prior: Any, num_classes: int, device: torch.device, role: str) -> torch.Tensor:
    """A (K,) prior (ClassPrior, array, tensor) -> (1, K) float64 on ``device``."""
    values = getattr(prior, "probs", prior)
    values = values.detach().cpu().numpy() if torch.is_tensor(values) else np.array(values, dtype=np.float64)
    if values.shape != (num_classes,):
        raise ValueError(f"{role} must have shape ({num_classes},), got {values.shape}")
    return torch.as_tensor(values, dtype=torch.float64, device=device)[None]


def map_em(posteriors: torch.Tensor, posterior_prior: Any, dataset_prior: Any, *, kappa: float,
           effective_pixels: float, max_iter: int = 200, tol: float = 1e-6,
           init: Any = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batched MAP-EM: per image, q = (n_eff·mean_x r_x(q) + κ·π̂) / (n_eff + κ), r_x(q) ∝ p(y|x)·q/π_post.

    posteriors: (N, K, M) pixel posteriors p(y|x) (softmax over K), holding under ``posterior_prior`` (K,)
    (π_post: the calibrated source prior for calibrated posteriors); dataset_prior: (K,) π̂, the Dirichlet's
    centre and the starting point (``init`` (K,) or (N, K) overrides the start). κ = inf returns π̂ at once.
    Each image iterates until the L1 change of its q is below ``tol`` (then it stops, independently of the
    others). Returns (q (N, K) float64, iterations (N,) int64, converged (N,) bool).
    """
    num_images, num_classes = posteriors.shape[:2]
    device = posteriors.device
    centre = _as_rows(dataset_prior, num_classes, device, "dataset_prior")
    if math.isinf(kappa):
        return (centre.expand(num_images, -1).clone(), torch.zeros(num_images, dtype=torch.int64, device=device),
                torch.ones(num_images, dtype=torch.bool, device=device))
    probs = posteriors.to(torch.float64)
    inverse_posterior_prior = 1.0 / _as_rows(posterior_prior, num_classes, device, "posterior_prior")
    if init is None:
        estimate = centre.expand(num_images, -1).clone()
    else:
        estimate = torch.as_tensor(np.asarray(init, dtype=np.float64), device=device).expand(num_images, -1).clone()
    data_weight = effective_pixels / (effective_pixels + kappa)
    prior_part = (1.0 - data_weight) * centre
    iterations = torch.zeros(num_images, dtype=torch.int64, device=device)
    active = torch.ones(num_images, dtype=torch.bool, device=device)
    rows, active_probs = torch.arange(num_images, device=device), probs  # the images still iterating
    for _ in range(max_iter):
        if rows.numel() == 0:
            break
        ratio = estimate[rows] * inverse_posterior_prior  # (A, K)
        normaliser = (active_probs * ratio[:, :, None]).sum(1).clamp_min(torch.finfo(torch.float64).tiny)  # (A, M)
        responsibility = ratio * (active_probs / normaliser[:, None, :]).mean(2)  # (A, K)
        updated = data_weight * responsibility + prior_part
        change = (updated - estimate[rows]).abs().sum(1)
        estimate[rows] = updated
        iterations[rows] += 1
        done = change < tol
        if bool(done.any()):  # drop the converged images (copies the posteriors only when the set shrinks)
            active[rows[done]] = False
            rows, active_probs = rows[~done], active_probs[~done]
    return estimate, iterations, ~active


def map_count(logits: torch.Tensor, adjust_toward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
              dataset_prior: Any, *, kappa: float, effective_pixels: float, steps: int = 2) -> torch.Tensor:
    """Hard EM: ``steps`` times q <- (n_eff·h(q) + κ·π̂) / (n_eff + κ), from q = π̂, where h(q) (N, K) is the share of
    the image's pixels whose argmax after IA toward q wins each class (``adjust_toward(logits, q)``: logits
    (N, K, M) and priors (N, K) -> adjusted logits). logits: raw (N, K, M). Returns (N, K) float64."""
    num_images, num_classes, num_pixels = logits.shape
    device = logits.device
    centre = _as_rows(dataset_prior, num_classes, device, "dataset_prior").expand(num_images, -1)
    if math.isinf(kappa):
        return centre.clone()
    data_weight = effective_pixels / (effective_pixels + kappa)
    offsets = torch.arange(num_images, device=device)[:, None] * num_classes
    estimate = centre.clone()
    for _ in range(steps):
        winners = adjust_toward(logits, estimate).argmax(1)  # (N, M)
        histogram = torch.bincount((winners + offsets).flatten(), minlength=num_images * num_classes)
        shares = histogram.view(num_images, num_classes).to(torch.float64) / num_pixels
        estimate = data_weight * shares + (1.0 - data_weight) * centre
    return estimate


def floor_rows(probs: torch.Tensor, dataset_prior: Any, floor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Raise q_c below ``floor``·π̂_c to it and renormalise the rows that changed; (N, K) -> (q, floored (N,))."""
    centre = _as_rows(dataset_prior, probs.shape[1], probs.device, "dataset_prior")
    minimum = floor * centre
    low = probs < minimum
    floored = low.sum(1)
    if floor <= 0 or not bool(low.any()):
        return probs, floored
    raised = torch.where(low, minimum, probs)
    changed = floored > 0
    probs = torch.where(changed[:, None], raised / raised.sum(1, keepdim=True), probs)
    return probs, floored


def weigh_by_presence(probs: torch.Tensor, presence_logits: torch.Tensor, floor: float,
                      presence_model: PresenceModel) -> torch.Tensor:
    """q_c·max(P(c present | image), floor), renormalised; P read on ``presence_logits`` (N, K, M), the image's
    grid after global IA toward the dataset prior in the presence model's own space."""
    present = presence_model.probability(presence_features(presence_logits)).clamp_min(floor)
    weighted = probs * present
    return weighted / weighted.sum(1, keepdim=True)


def estimate_image_priors(logits: torch.Tensor, settings: LocalSettings, *, dataset_prior: Any,
                          posterior_prior: Any, calibrate: Callable[[torch.Tensor], torch.Tensor] | None = None,
                          adjust_toward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                          presence_model: PresenceModel | None = None,
                          presence_view: Callable[[torch.Tensor], torch.Tensor] | None = None) -> ImagePriors:
    """Per-image priors of a batch of raw logits (N, K, H, W) (any resolution: the model's output grid, the
    input or the label size; ``settings.sample_pixels`` of a regular grid are read).

    ``posterior_prior``: the prior the posteriors hold under (the calibrated source prior when
    ``settings.posteriors == "calibrated"``, else the source pixel prior); ``calibrate``: raw logits -> calibrated
    logits (required for calibrated posteriors); ``adjust_toward(logits, priors (N, K))``: IA toward per-image
    priors (``map_count``); with ``settings.presence``: ``presence_model`` and ``presence_view`` (raw grid logits
    (N, K, M) -> the logits the presence features are read on: IA toward the dataset prior at T = τ = 1 in the raw
    space, as the model was fitted, whatever the IA settings).
    """
    if settings.presence and (presence_model is None or presence_view is None):
        raise ValueError(MISSING_MODEL)
    grid = grid_pixels(logits, settings.sample_pixels)  # (N, K, M)
    device, num_images = logits.device, logits.shape[0]
    iterations = torch.zeros(num_images, dtype=torch.int64, device=device)
    converged = torch.ones(num_images, dtype=torch.bool, device=device)
    if settings.estimator == "map_em":
        if settings.reads_calibrated:
            if calibrate is None:
                raise ValueError("per-image priors on calibrated posteriors need the calibration")
            grid = calibrate(grid)
        probs, iterations, converged = map_em(
            grid.softmax(1), posterior_prior, dataset_prior, kappa=settings.kappa,
            effective_pixels=settings.effective_pixels, max_iter=settings.max_iter, tol=settings.tol)
    elif settings.estimator == "map_count":
        if adjust_toward is None:
            raise ValueError("map_count needs the IA toward per-image priors (adjust_toward)")
        probs = map_count(grid, adjust_toward, dataset_prior, kappa=settings.kappa,
                          effective_pixels=settings.effective_pixels, steps=settings.count_steps)
    else:
        raise ValueError(f"unknown per-image estimator {settings.estimator!r}; known: map_em, map_count")
    centre = _as_rows(dataset_prior, probs.shape[1], device, "dataset_prior")
    if settings.presence:
        probs = weigh_by_presence(probs, presence_view(grid_pixels(logits, PRESENCE_GRID_PIXELS)), settings.floor,
                                  presence_model)
    fallback = ~converged
    probs = torch.where(fallback[:, None], centre, probs)
    probs, floored = floor_rows(probs, dataset_prior, settings.floor)
    return ImagePriors(probs, iterations, fallback, floored)


def summarise_counts(counts: Sequence[dict[str, int]]) -> dict[str, int]:
    """The sum of several :meth:`ImagePriors.counts`."""
    keys = ("images", "fallback_images", "floored_images", "floored_classes")
    return {key: int(sum(count.get(key, 0) for count in counts)) for key in keys}
