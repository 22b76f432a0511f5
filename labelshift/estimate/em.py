"""EM / MLLS (Saerens, Latinne & Decaestecker 2002) on a bounded uniform pixel sample."""
from __future__ import annotations

import warnings
from typing import Any, Sequence

import numpy as np
import torch

from labelshift.classes import ClassSet
from labelshift.estimate.base import EstimatorInputs, PriorEstimator, prior_vector
from labelshift.priors import ClassPrior
from labelshift.sampling import EM_PIXEL_KEYS, keyed_generator


# EM keeps every class at least this probability: a class driven to exactly 0 would leave a pixel whose posterior
# sits on such classes with zero likelihood (0/0: NaN in every later iteration). Estimates above it are unchanged.
EM_PROBABILITY_FLOOR = 1e-12


def _checked_em_inputs(posterior: np.ndarray, source: np.ndarray, sample_weights: np.ndarray,
                       estimate: np.ndarray) -> None:
    """Refuse what EM cannot turn into a prior (NaN/inf logits reach here as NaN posteriors)."""
    if posterior.ndim != 2 or posterior.shape[1] != len(source):
        raise ValueError(f"em: posteriors must be (M, {len(source)}), got shape {posterior.shape}")
    if not np.isfinite(posterior).all() or (posterior < 0).any() or (posterior.sum(1) <= 0).any():
        raise ValueError("em: posteriors must be finite, non-negative and have mass in every row (non-finite "
                         "logits give NaN probabilities; a float16 logit above 65504 is inf)")
    if not np.isfinite(source).all() or (source <= 0).any():
        raise ValueError("em: the source prior must be finite and positive (floor zero-mass classes)")
    if sample_weights.shape != (len(posterior),) or not np.isfinite(sample_weights).all() \
            or (sample_weights < 0).any() or sample_weights.sum() <= 0:
        raise ValueError("em: weights must be (M,), finite, non-negative, with a positive sum")
    if not np.isfinite(estimate).all() or (estimate < 0).any() or estimate.sum() <= 0:
        raise ValueError("em: init must be finite, non-negative, with a positive sum")


def em_label_shift(posteriors: Any, source_prior: Any, *, weights: np.ndarray | None = None,
                   init: np.ndarray | None = None, tol: float = 1e-7,
                   max_iter: int = 1000) -> tuple[np.ndarray, int, bool]:
    """Maximum-likelihood target prior under label shift (Saerens, Latinne & Decaestecker 2002).

    posteriors: (M, K) p_s(y|x) under ``source_prior`` (K,); weights: (M,) sample weights or None.
    Iterates q <- mean_x normalise(p_s(y|x)·q/π_s) until the L1 change is below ``tol``, keeping every class at
    least ``EM_PROBABILITY_FLOOR`` (renormalised), so the estimate is finite for any valid input (one-hot
    posteriors of huge logits and an init with zeros included). Invalid input (NaN or inf posteriors, weights
    summing to 0) raises ``ValueError``. Returns (q (K,), iterations, converged).
    """
    posterior = np.asarray(posteriors, dtype=np.float64)
    source = np.asarray(source_prior, dtype=np.float64)
    sample_weights = np.ones(len(posterior)) if weights is None else np.asarray(weights, dtype=np.float64)
    estimate = source.copy() if init is None else np.asarray(init, dtype=np.float64).copy()
    _checked_em_inputs(posterior, source, sample_weights, estimate)
    total_weight = sample_weights.sum()
    estimate = np.maximum(estimate / estimate.sum(), EM_PROBABILITY_FLOOR)
    estimate /= estimate.sum()
    for iteration in range(1, max_iter + 1):
        # normalise(p·r) averaged over x, with r = q/π_s, as two matrix-vector products (no (M, K) temporary);
        # every row has mass and every r_k > 0, so the normaliser is positive
        ratio = estimate / source
        normaliser = posterior @ ratio
        updated = ratio * (posterior.T @ (sample_weights / normaliser)) / total_weight
        updated = np.maximum(updated, EM_PROBABILITY_FLOOR)
        updated /= updated.sum()
        change = np.abs(updated - estimate).sum()
        estimate = updated
        if change < tol:
            return estimate, iteration, True
    return estimate, max_iter, False


class EMEstimator(PriorEstimator):
    """EM / MLLS on a bounded uniform pixel sample gathered during the pass (a pixel prior).

    The sample keeps the ``sample_size`` pixels with the smallest uniform random keys (bottom-k
    sampling): a uniform sample without replacement of all pixels seen, and merging two estimators keeps
    the bottom-k of the union. Named images (``update(probs, names=...)``) draw their pixels' keys from their
    name, so shards of one pass merge into exactly the sample of one process; unnamed batches draw from the
    estimator's ``seed`` stream in order (give each such shard its own ``seed``). EM runs on the sample in
    key order. ``source_prior``: the prior the posteriors were trained/calibrated under (the source pixel
    prior). The bootstrap reweights the sampled pixels by their image's multiplicity and restarts EM from the
    point estimate. A shard told the pass's total pixel count (:meth:`expect_pixels`) keeps only keys below
    a bound that the merged bottom-k stays under with overwhelming probability; a merged sample that the bound
    may have cut short raises instead of returning a different estimate.
    """

    method, kind = "em", "pixel"
    source_prior_argument = "source_prior"

    @classmethod
    def arguments(cls, inputs: EstimatorInputs) -> dict[str, Any]:
        return {"source_prior": inputs.calibrated_prior, "sample_size": inputs.em_sample_pixels}

    def __init__(self, classes: ClassSet | Sequence[str], *, source_prior: ClassPrior | Any,
                 sample_size: int = 200_000, tol: float = 1e-7, max_iter: int = 1000, **base: Any) -> None:
        super().__init__(classes, **base)
        if source_prior is None:
            raise ValueError("the em estimator needs source_prior= (the prior of the posteriors' training data)")
        self.source_probs = prior_vector(source_prior, self.class_names, "source_prior")
        if isinstance(source_prior, ClassPrior) and source_prior.kind != "pixel":
            warnings.warn(f"em: source_prior {source_prior.describe()} is an image prior; posteriors are trained "
                          "under the source PIXEL prior", stacklevel=2)
        self.source_description = source_prior.describe() if isinstance(source_prior, ClassPrior) else "vector"
        self.sample_size, self.tol, self.max_iter = int(sample_size), float(tol), int(max_iter)
        self._rng = np.random.default_rng([self.seed, 1])
        self.sample_probs = np.zeros((0, self.num_classes), dtype=np.float32)  # (M, K)
        self.sample_keys = np.zeros(0)  # (M,) uniform keys
        self.sample_units = np.zeros(0, dtype=np.int64)  # (M,) unit (image) of each sampled pixel
        self._point: np.ndarray | None = None
        self._fit: dict[str, Any] = {}
        self.sampling_seeds: set[int] = set()  # seeds whose unnamed key streams the sample holds (merges included)
        self.key_bound = 1.0  # keys at or above it are not kept (expect_pixels)
        self.pixels_over_bound = 0  # pixels dropped by the bound (merges included)

    def settings(self) -> dict[str, Any]:
        return {"source_prior": self.source_probs.tolist(), "sample_size": self.sample_size,
                "tol": self.tol, "max_iter": self.max_iter}

    def expect_pixels(self, total_pixels: int) -> None:
        """Keep only keys below ``min(1, 2·sample_size / total_pixels)``: the merged sample of the pass then
        expects twice the pixels it keeps (a shortfall is astronomically unlikely, and detected)."""
        self.key_bound = min(1.0, 2.0 * self.sample_size / max(int(total_pixels), 1))

    def _pixel_keys(self, unit_keys: list, pixels_per_unit: int) -> np.ndarray:
        """(U·P,) uniform keys: from each image's name, or from the seed's stream for unnamed batches."""
        if all(key is None for key in unit_keys):
            self.sampling_seeds.add(self.seed)
            return self._rng.random(len(unit_keys) * pixels_per_unit)
        if any(key is None for key in unit_keys):
            raise ValueError("name every image of a batch, or none")
        return np.concatenate([keyed_generator(self.seed, EM_PIXEL_KEYS, key).random(pixels_per_unit)
                               for key in unit_keys])

    def _keep(self, probs: np.ndarray, keys: np.ndarray, units: np.ndarray) -> None:
        probs = np.concatenate([self.sample_probs, probs])
        keys = np.concatenate([self.sample_keys, keys])
        units = np.concatenate([self.sample_units, units])
        if len(keys) > self.sample_size:
            kept = np.sort(np.argpartition(keys, self.sample_size - 1)[: self.sample_size])
            probs, keys, units = probs[kept], keys[kept], units[kept]
        self.sample_probs, self.sample_keys, self.sample_units = probs, keys, units
        self._point = None

    def _ingest(self, units: torch.Tensor, unit_keys: list | None = None, **kwargs: Any) -> None:
        pixels_per_unit = units.shape[2] * units.shape[3]
        keys = self._pixel_keys(unit_keys or [None] * units.shape[0], pixels_per_unit)
        full = len(self.sample_keys) >= self.sample_size
        self.pixels_over_bound += int(np.count_nonzero(keys >= self.key_bound))
        candidates = np.flatnonzero(keys < min(self.key_bound, self.sample_keys.max() if full else np.inf))
        if len(candidates) > self.sample_size:
            candidates = candidates[np.argpartition(keys[candidates], self.sample_size - 1)[: self.sample_size]]
        unit_index, pixel_index = np.divmod(candidates, pixels_per_unit)
        gathered = units.flatten(2)[torch.from_numpy(unit_index).to(units.device), :,
                                    torch.from_numpy(pixel_index).to(units.device)]
        self._keep(gathered.float().cpu().numpy(), keys[candidates], unit_index + self.num_units)

    def _merge_state(self, other: PriorEstimator) -> None:
        assert isinstance(other, EMEstimator)
        shared = self.sampling_seeds & other.sampling_seeds
        if shared:
            raise ValueError(f"cannot merge em estimators whose samples used the same seed(s) {sorted(shared)}: "
                             "equal seeds draw equal sampling keys, so the merged sample would not be uniform; "
                             "give each shard its own seed (e.g. seed + shard index)")
        self.sampling_seeds |= other.sampling_seeds
        self.pixels_over_bound += other.pixels_over_bound
        self._keep(other.sample_probs, other.sample_keys, other.sample_units + self.num_units)

    def _sample_in_key_order(self) -> tuple[np.ndarray, np.ndarray]:
        """(M, K) sampled posteriors and (M,) their units, in key order (the same for any sharding)."""
        if len(self.sample_keys) < self.sample_size and self.pixels_over_bound:
            raise RuntimeError(f"em: the merged pixel sample holds {len(self.sample_keys)} pixels, fewer than "
                               f"sample_size={self.sample_size}, while {self.pixels_over_bound} pixels were dropped "
                               "by a shard's key bound: the sample would not be the pass's bottom-k")
        order = np.argsort(self.sample_keys, kind="stable")
        return self.sample_probs[order], self.sample_units[order]

    def _estimate(self, unit_weights: np.ndarray | None) -> np.ndarray:
        probs, sample_units = self._sample_in_key_order()
        if unit_weights is None:
            self._point, iterations, converged = em_label_shift(
                probs, self.source_probs, tol=self.tol, max_iter=self.max_iter)
            self._fit = {"iterations": iterations, "converged": converged}
            return self._point
        if self._point is None:
            self._estimate(None)
        pixel_weights = unit_weights[sample_units]
        if pixel_weights.sum() <= 0:  # no sampled pixel in this replicate: the bootstrap leaves it out
            return np.zeros(self.num_classes)
        estimate, _, _ = em_label_shift(probs, self.source_probs, weights=pixel_weights,
                                        init=self._point, tol=self.tol, max_iter=self.max_iter)
        return estimate

    def _diagnostics(self) -> dict[str, Any]:
        return {"source_prior_description": self.source_description, "sampled_pixels": len(self.sample_keys),
                **self._fit}




class EMRawEstimator(EMEstimator):
    """EM on the RAW softmax (no calibration), under the source pixel prior: the uncalibrated variant the
    estimate stage computes beside ``em`` (calibrated posteriors), so that sweeps can choose between them."""

    method, posteriors = "em_raw", "raw"

    @classmethod
    def arguments(cls, inputs: EstimatorInputs) -> dict[str, Any]:
        return {"source_prior": inputs.source_pixel_prior, "sample_size": inputs.em_sample_pixels}
