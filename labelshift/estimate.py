"""Streaming, mergeable estimators of the target class prior π_t (no target labels needed).

Every estimator has ``update(probs)``, ``merge(other)`` and ``result() -> ClassPrior``. ``probs`` are
PROBABILITIES (softmax applied, possibly calibrated), torch (any device) or numpy: ``(B, K, H, W)`` (B
images) or ``(N, K)`` (N samples, each its own unit: classification data, or one row per image).
Small per-image statistics (K floats per image; for EM the image of each sampled pixel) are kept, so
``result()`` reports a percentile bootstrap interval over images in ``provenance["confidence_interval"]``.

Methods (``make_estimator(method, classes, **kw)``): ``reference`` (the reference code's rule, bit-exact),
``count`` / ``soft_count`` (pixel priors), ``presence`` (image prior), ``em`` (Saerens et al. 2002, on a
bounded uniform pixel sample) and ``bbse`` (Lipton et al. 2018 with a soft confusion matrix and a ridge).
"""
from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from itertools import chain
from typing import Any, ClassVar, Iterator, Sequence

import numpy as np
import torch

from labelshift.classes import IGNORE_INDEX, ClassSet
from labelshift.priors import ClassPrior, PriorKind, class_names_of, floor_probabilities

def _as_tensor(data: Any) -> torch.Tensor:
    """A torch view of a tensor or array (read-only arrays, e.g. from Ray Data, without torch's warning)."""
    if torch.is_tensor(data):
        return data.detach()
    array = np.asarray(data)
    if array.flags.writeable:
        return torch.from_numpy(array)
    with warnings.catch_warnings():  # never written to: the estimators only read their inputs
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def _as_units(probs: Any, num_classes: int) -> torch.Tensor:
    """(B, K, H, W) or (N, K) probabilities -> a (U, K, H, W) tensor ((N, K) becomes (N, K, 1, 1))."""
    tensor = _as_tensor(probs)
    if tensor.ndim == 2:
        tensor = tensor[:, :, None, None]
    if tensor.ndim != 4 or tensor.shape[1] != num_classes:
        raise ValueError(f"expected probabilities (B, {num_classes}, H, W) or (N, {num_classes}), "
                         f"got shape {tuple(tensor.shape)}")
    if not tensor.is_floating_point():
        raise TypeError(f"probabilities must be floating point, got {tensor.dtype}")
    return tensor


def _argmax_histograms(units: torch.Tensor) -> np.ndarray:
    """(U, K, H, W) -> (U, K) float64 per-unit histogram of the argmax class."""
    num_units, num_classes = units.shape[:2]
    predicted = units.argmax(dim=1).flatten(1)
    offsets = torch.arange(num_units, device=units.device)[:, None] * num_classes
    histogram = torch.bincount((predicted + offsets).flatten(), minlength=num_units * num_classes)
    return histogram.view(num_units, num_classes).cpu().numpy().astype(np.float64)


def _prior_vector(prior: ClassPrior | Any, class_names: tuple[str, ...], role: str) -> np.ndarray:
    if isinstance(prior, ClassPrior):
        if prior.classes != class_names:
            raise ValueError(f"{role} is over classes {list(prior.classes)}, the estimator over {list(class_names)}")
        return prior.probs
    values = np.asarray(prior.detach().cpu() if torch.is_tensor(prior) else prior, dtype=np.float64)
    if values.shape != (len(class_names),):
        raise ValueError(f"{role} must have shape ({len(class_names)},), got {values.shape}")
    return floor_probabilities(values, class_names)


class PriorEstimator(ABC):
    """Base of the streaming estimators: unit counting, merging, bootstrap over units, the result."""

    method: ClassVar[str] = ""
    kind: ClassVar[PriorKind] = "pixel"

    def __init__(self, classes: ClassSet | Sequence[str], *, bootstrap: int = 100, confidence: float = 0.9,
                 seed: int = 0, provenance: dict[str, Any] | None = None) -> None:
        if bootstrap < 0 or not 0 < confidence < 1:
            raise ValueError(f"need bootstrap >= 0 and 0 < confidence < 1, got {bootstrap}, {confidence}")
        self.class_names = class_names_of(classes)
        self.bootstrap, self.confidence, self.seed = int(bootstrap), float(confidence), int(seed)
        self.provenance = dict(provenance or {})
        self.num_units = 0  # images (or rows of (N, K) inputs)
        self.num_pixels = 0

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def update(self, probs: Any, **kwargs: Any) -> None:
        """Add a batch of probabilities (B, K, H, W) or (N, K)."""
        units = _as_units(probs, self.num_classes)
        self._ingest(units, **kwargs)
        self.num_units += units.shape[0]
        self.num_pixels += units.shape[0] * units.shape[2] * units.shape[3]

    def merge(self, other: PriorEstimator) -> PriorEstimator:
        """Add the state of ``other`` (same method, classes and settings) after this one's; returns self."""
        if type(other) is not type(self) or other.class_names != self.class_names:
            raise ValueError(f"cannot merge a {other.method} estimator over {len(other.class_names)} classes "
                             f"into a {self.method} estimator over {self.num_classes} classes")
        if other.settings() != self.settings():
            raise ValueError(f"cannot merge estimators with different settings: "
                             f"{other.settings()} vs {self.settings()}")
        self._merge_state(other)
        self.num_units += other.num_units
        self.num_pixels += other.num_pixels
        return self

    def result(self) -> ClassPrior:
        """The point estimate as a ClassPrior with provenance (settings, counts, bootstrap interval)."""
        if self.num_units == 0:
            raise RuntimeError(f"the {self.method} estimator has seen no data: call update() first")
        point = self._estimate(None)
        prior = ClassPrior(self.class_names, point, self.kind, self._counts(point))
        provenance = {**self.provenance,  # the caller's notes (dataset, split, ...) never override what was computed
                      "estimator": self.method, "num_images": self.num_units, "num_pixels": self.num_pixels,
                      **self.settings(), **self._diagnostics(), "bootstrap": self.bootstrap, "seed": self.seed,
                      "confidence_interval": self._bootstrap_interval()}
        return prior.with_provenance(**provenance)

    def settings(self) -> dict[str, Any]:
        """The parameters that define the estimate (merging requires equal settings)."""
        return {}

    def _bootstrap_interval(self) -> dict[str, Any] | None:
        if self.bootstrap == 0:
            return None
        rng = np.random.default_rng(self.seed)
        replicates = np.full((self.bootstrap, self.num_classes), np.nan)
        for row in range(self.bootstrap):
            unit_weights = np.bincount(rng.integers(0, self.num_units, self.num_units), minlength=self.num_units)
            estimate = self._estimate(unit_weights.astype(np.float64))
            if estimate.sum() > 0:
                replicates[row] = floor_probabilities(estimate, warn=False)
        tail = (1.0 - self.confidence) / 2.0
        lower, upper = np.nanquantile(replicates, [tail, 1.0 - tail], axis=0)
        return {"level": self.confidence, "lower": lower.tolist(), "upper": upper.tolist(),
                "replicates": self.bootstrap, "method": "percentile bootstrap over images"}

    def _counts(self, point: np.ndarray) -> np.ndarray | None:  # raw counts of the result, if any
        return None

    def _diagnostics(self) -> dict[str, Any]:  # extra provenance of the fit
        return {}

    @abstractmethod
    def _ingest(self, units: torch.Tensor, **kwargs: Any) -> None:
        """Accumulate a (U, K, H, W) batch."""

    @abstractmethod
    def _merge_state(self, other: PriorEstimator) -> None:
        """Append ``other``'s state (its units come after this one's)."""

    @abstractmethod
    def _estimate(self, unit_weights: np.ndarray | None) -> np.ndarray:
        """(K,) non-negative prior weights; ``unit_weights`` (U,) are bootstrap multiplicities (None: all 1)."""


class _UnitStatisticsEstimator(PriorEstimator):
    """An estimator whose estimate is a function of Σ_units (K,) per-unit statistics."""

    counts_are_sums: ClassVar[bool] = True

    def __init__(self, classes: ClassSet | Sequence[str], **base: Any) -> None:
        super().__init__(classes, **base)
        self._unit_blocks: list[np.ndarray] = []

    @abstractmethod
    def _unit_statistics(self, units: torch.Tensor) -> np.ndarray:
        """(U, K, H, W) -> (U, K) float64 statistics."""

    def unit_statistics(self) -> np.ndarray:
        """(U, K) float64 per-unit statistics, in the order the units came."""
        if len(self._unit_blocks) != 1:
            blocks = self._unit_blocks or [np.zeros((0, self.num_classes))]
            self._unit_blocks = [np.concatenate(blocks, axis=0)]
        return self._unit_blocks[0]

    def _ingest(self, units: torch.Tensor, **kwargs: Any) -> None:
        self._unit_blocks.append(self._unit_statistics(units))

    def _merge_state(self, other: PriorEstimator) -> None:
        assert isinstance(other, _UnitStatisticsEstimator)
        self._unit_blocks.append(other.unit_statistics().copy())

    def _estimate(self, unit_weights: np.ndarray | None) -> np.ndarray:
        statistics = self.unit_statistics()
        return statistics.sum(axis=0) if unit_weights is None else unit_weights @ statistics

    def _counts(self, point: np.ndarray) -> np.ndarray | None:
        return point if self.counts_are_sums else None


class CountEstimator(_UnitStatisticsEstimator):
    """Classify and count: histogram of the argmax class -> pixel prior (``counts``: predicted pixels)."""

    method, kind = "count", "pixel"

    def _unit_statistics(self, units: torch.Tensor) -> np.ndarray:
        return _argmax_histograms(units)


class SoftCountEstimator(_UnitStatisticsEstimator):
    """Mean predicted probability per class -> pixel prior (``counts``: soft pixel mass)."""

    method, kind = "soft_count", "pixel"

    def _unit_statistics(self, units: torch.Tensor) -> np.ndarray:
        return torch.sum(units, dim=(2, 3), dtype=torch.float64).cpu().numpy()


class PresenceEstimator(_UnitStatisticsEstimator):
    """Image prior: an image counts for class c when its predicted (argmax) pixel share of c exceeds ``threshold``."""

    method, kind = "presence", "image"

    def __init__(self, classes: ClassSet | Sequence[str], *, threshold: float = 0.001, **base: Any) -> None:
        super().__init__(classes, **base)
        self.threshold = float(threshold)

    def settings(self) -> dict[str, Any]:
        return {"threshold": self.threshold}

    def _unit_statistics(self, units: torch.Tensor) -> np.ndarray:
        shares = _argmax_histograms(units) / float(units.shape[2] * units.shape[3])
        return (shares > self.threshold).astype(np.float64)


class ReferenceEstimator(_UnitStatisticsEstimator):
    """The reference code's rule (``test_trainlabelfre.py``), bit-exact, quirks included.

    Per image and class c: ``log(sum(exp(prob_c)) / (H*W)) > thresholds[c]`` in float32 torch ops, where
    ``thresholds`` is the source PIXEL frequency ((K,) values, or a pixel ClassPrior: for presets the
    published values themselves). ``counts``: per-class image counts; an image prior.
    """

    method, kind = "reference", "image"

    def __init__(self, classes: ClassSet | Sequence[str], *, thresholds: ClassPrior | Any, **base: Any) -> None:
        super().__init__(classes, **base)
        if isinstance(thresholds, ClassPrior):
            if thresholds.kind != "pixel":
                raise ValueError("the reference rule compares with the source PIXEL frequency; "
                                 f"got a {thresholds.kind} prior ({thresholds.describe()})")
            values = thresholds.provenance.get("published_values", thresholds.probs)
            _prior_vector(thresholds, self.class_names, "thresholds")
        else:
            values = thresholds.detach().cpu() if torch.is_tensor(thresholds) else thresholds
        self.thresholds = tuple(float(v) for v in np.asarray(values, dtype=np.float64))
        if len(self.thresholds) != self.num_classes:
            raise ValueError(f"thresholds must have {self.num_classes} values, got {len(self.thresholds)}")

    def settings(self) -> dict[str, Any]:
        return {"thresholds": list(self.thresholds)}

    def _unit_statistics(self, units: torch.Tensor) -> np.ndarray:
        probs = units.float()
        height, width = probs.shape[2:]
        log_mean_exp = torch.stack([
            torch.stack([torch.log(torch.sum(torch.exp(probs[image, c])) / (height * width))
                         for c in range(self.num_classes)])
            for image in range(probs.shape[0])]).cpu()
        # A float32 tensor compared with a Python float compares in float32: same as the reference's scalars.
        thresholds = torch.tensor(self.thresholds, dtype=torch.float64).to(torch.float32)
        return (log_mean_exp > thresholds).numpy().astype(np.float64)


def em_label_shift(posteriors: Any, source_prior: Any, *, weights: np.ndarray | None = None,
                   init: np.ndarray | None = None, tol: float = 1e-7,
                   max_iter: int = 1000) -> tuple[np.ndarray, int, bool]:
    """Maximum-likelihood target prior under label shift (Saerens, Latinne & Decaestecker 2002).

    posteriors: (M, K) p_s(y|x) under ``source_prior`` (K,); weights: (M,) sample weights or None.
    Iterates q <- mean_x normalise(p_s(y|x)·q/π_s) until the L1 change is below ``tol``.
    Returns (q (K,), iterations, converged).
    """
    posterior = np.asarray(posteriors, dtype=np.float64)
    source = np.asarray(source_prior, dtype=np.float64)
    sample_weights = np.ones(len(posterior)) if weights is None else np.asarray(weights, dtype=np.float64)
    total_weight = sample_weights.sum()
    estimate = source.copy() if init is None else np.asarray(init, dtype=np.float64).copy()
    for iteration in range(1, max_iter + 1):
        # normalise(p·r) averaged over x, with r = q/π_s, as two matrix-vector products (no (M, K) temporary)
        ratio = estimate / source
        normaliser = np.maximum(posterior @ ratio, np.finfo(np.float64).tiny)
        updated = ratio * (posterior.T @ (sample_weights / normaliser)) / total_weight
        change = np.abs(updated - estimate).sum()
        estimate = updated
        if change < tol:
            return estimate, iteration, True
    return estimate, max_iter, False


class EMEstimator(PriorEstimator):
    """EM / MLLS on a bounded uniform pixel sample gathered during the pass (a pixel prior).

    The sample keeps the ``sample_size`` pixels with the smallest uniform random keys (bottom-k
    sampling): a uniform sample without replacement of all pixels seen, and merging two estimators keeps
    the bottom-k of the union (give each worker its own ``seed``). ``source_prior``: the prior the
    posteriors were trained/calibrated under (the source pixel prior). The bootstrap reweights the
    sampled pixels by their image's multiplicity and restarts EM from the point estimate.
    """

    method, kind = "em", "pixel"

    def __init__(self, classes: ClassSet | Sequence[str], *, source_prior: ClassPrior | Any,
                 sample_size: int = 200_000, tol: float = 1e-7, max_iter: int = 1000, **base: Any) -> None:
        super().__init__(classes, **base)
        if source_prior is None:
            raise ValueError("the em estimator needs source_prior= (the prior of the posteriors' training data)")
        self.source_probs = _prior_vector(source_prior, self.class_names, "source_prior")
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
        self.sampling_seeds = {self.seed}  # seeds whose key streams the sample holds (merged shards included)

    def settings(self) -> dict[str, Any]:
        return {"source_prior": self.source_probs.tolist(), "sample_size": self.sample_size,
                "tol": self.tol, "max_iter": self.max_iter}

    def _keep(self, probs: np.ndarray, keys: np.ndarray, units: np.ndarray) -> None:
        probs = np.concatenate([self.sample_probs, probs])
        keys = np.concatenate([self.sample_keys, keys])
        units = np.concatenate([self.sample_units, units])
        if len(keys) > self.sample_size:
            kept = np.sort(np.argpartition(keys, self.sample_size - 1)[: self.sample_size])
            probs, keys, units = probs[kept], keys[kept], units[kept]
        self.sample_probs, self.sample_keys, self.sample_units = probs, keys, units
        self._point = None

    def _ingest(self, units: torch.Tensor, **kwargs: Any) -> None:
        pixels_per_unit = units.shape[2] * units.shape[3]
        keys = self._rng.random(units.shape[0] * pixels_per_unit)
        full = len(self.sample_keys) >= self.sample_size
        candidates = np.flatnonzero(keys < (self.sample_keys.max() if full else np.inf))
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
        self._keep(other.sample_probs, other.sample_keys, other.sample_units + self.num_units)

    def _estimate(self, unit_weights: np.ndarray | None) -> np.ndarray:
        if unit_weights is None:
            self._point, iterations, converged = em_label_shift(
                self.sample_probs, self.source_probs, tol=self.tol, max_iter=self.max_iter)
            self._fit = {"iterations": iterations, "converged": converged}
            return self._point
        if self._point is None:
            self._estimate(None)
        estimate, _, _ = em_label_shift(self.sample_probs, self.source_probs, weights=unit_weights[self.sample_units],
                                        init=self._point, tol=self.tol, max_iter=self.max_iter)
        return estimate

    def _diagnostics(self) -> dict[str, Any]:
        return {"source_prior_description": self.source_description, "sampled_pixels": len(self.sample_keys),
                **self._fit}


def bbse_solve(joint_confusion: np.ndarray, mean_prediction: np.ndarray, *, ridge: float = 1e-3) -> np.ndarray:
    """Target prior from a source confusion and the target mean prediction (Lipton et al. 2018).

    joint_confusion: (K, K) C[i, j] = P_s(y=i, ŷ=j) (soft: E[p_j | y=i]·P_s(y=i)); mean_prediction: (K,) μ_t.
    Solves C^T w = μ_t for w = π_t/π_s by ridge least squares shrunk towards w = 1 (RLLS-style;
    λ = ridge·trace(C Cᵀ)/K), clips negatives, returns π_t = w·π_s normalised (K,).
    """
    source_prior = joint_confusion.sum(axis=1)
    gram = joint_confusion @ joint_confusion.T
    penalty = ridge * np.trace(gram) / len(gram)
    rhs = joint_confusion @ mean_prediction + penalty
    weights = np.clip(np.linalg.solve(gram + penalty * np.eye(len(gram)), rhs), 0.0, None)
    target = weights * source_prior
    return target / target.sum() if target.sum() > 0 else source_prior / source_prior.sum()


class BBSEEstimator(_UnitStatisticsEstimator):
    """Black-box shift estimation with a (soft by default) source confusion matrix; a pixel prior.

    ``update_source(probs, labels)`` accumulates the joint confusion on a labelled source split (the same
    posterior transform, e.g. calibration, as the target); ``update(probs)`` the target predictions.
    The bootstrap resamples target images; the source confusion is held fixed.
    """

    method, kind = "bbse", "pixel"
    counts_are_sums = False

    def __init__(self, classes: ClassSet | Sequence[str], *, soft: bool = True, ridge: float = 1e-3,
                 **base: Any) -> None:
        super().__init__(classes, **base)
        self.soft, self.ridge = bool(soft), float(ridge)
        self.joint_counts = np.zeros((self.num_classes, self.num_classes))  # Σ onehot(y) ⊗ p over source pixels
        self.source_pixels = 0

    def settings(self) -> dict[str, Any]:
        return {"soft": self.soft, "ridge": self.ridge}

    def update_source(self, probs: Any, labels: Any, *, ignore_index: int = IGNORE_INDEX,
                      chunk_pixels: int = 1 << 18) -> None:
        """Add labelled source data: probs (B, K, H, W) or (N, K); labels (B, H, W) or (N,) trainIds."""
        units = _as_units(probs, self.num_classes)
        targets = _as_tensor(labels)
        if targets.numel() != units.shape[0] * units.shape[2] * units.shape[3]:
            raise ValueError(f"labels of shape {tuple(targets.shape)} do not match probabilities {tuple(probs.shape)}")
        targets = targets.to(units.device).reshape(-1).long()
        pixels = units.movedim(1, -1).reshape(-1, self.num_classes)
        valid = targets != ignore_index
        if torch.any(valid & ((targets < 0) | (targets >= self.num_classes))):
            raise ValueError(f"source labels must be trainIds 0..{self.num_classes - 1} or {ignore_index}")
        pixels, targets = pixels[valid], targets[valid]
        joint = torch.zeros(self.num_classes, self.num_classes, dtype=torch.float64, device=units.device)
        if not self.soft:
            predicted = pixels.argmax(dim=1)
            flat = torch.bincount(targets * self.num_classes + predicted, minlength=self.num_classes ** 2)
            joint += flat.view(self.num_classes, self.num_classes)
        else:
            for start in range(0, len(targets), chunk_pixels):
                chunk = slice(start, start + chunk_pixels)
                joint.index_add_(0, targets[chunk], pixels[chunk].to(torch.float64))
        self.joint_counts += joint.cpu().numpy()
        self.source_pixels += int(len(targets))

    def _unit_statistics(self, units: torch.Tensor) -> np.ndarray:
        if self.soft:
            return torch.sum(units, dim=(2, 3), dtype=torch.float64).cpu().numpy()
        return _argmax_histograms(units)

    def _merge_state(self, other: PriorEstimator) -> None:
        assert isinstance(other, BBSEEstimator)
        super()._merge_state(other)
        self.joint_counts = self.joint_counts + other.joint_counts
        self.source_pixels += other.source_pixels

    def _estimate(self, unit_weights: np.ndarray | None) -> np.ndarray:
        if self.source_pixels == 0:
            raise RuntimeError("bbse needs labelled source data: call update_source(probs, labels) first")
        target_mass = super()._estimate(unit_weights)
        return bbse_solve(self.joint_counts / self.source_pixels, target_mass / target_mass.sum(), ridge=self.ridge)

    def _diagnostics(self) -> dict[str, Any]:
        joint = self.joint_counts / max(self.source_pixels, 1)
        return {"source_pixels": self.source_pixels, "confusion_condition_number": float(np.linalg.cond(joint))}


ESTIMATORS: dict[str, type[PriorEstimator]] = {
    estimator.method: estimator for estimator in (
        ReferenceEstimator, CountEstimator, SoftCountEstimator, PresenceEstimator, EMEstimator, BBSEEstimator)
}


def make_estimator(method: str, classes: ClassSet | Sequence[str], **kwargs: Any) -> PriorEstimator:
    """A fresh estimator: ``method`` in :data:`ESTIMATORS`; ``kwargs`` its settings (and bootstrap, seed, ...)."""
    try:
        estimator_class = ESTIMATORS[method]
    except KeyError:
        raise ValueError(f"unknown prior estimator {method!r}; known: {sorted(ESTIMATORS)}") from None
    return estimator_class(classes, **kwargs)


def _batches(data: Any) -> Iterator[Any]:
    if torch.is_tensor(data) or isinstance(data, np.ndarray):
        return iter([data])
    return iter(data)


def estimate_prior(probs: Any, method: str = "em", *, classes: ClassSet | Sequence[str] | None = None,
                   source_prior: ClassPrior | Any = None, source_probs: Any = None, source_labels: Any = None,
                   **kwargs: Any) -> ClassPrior:
    """One call: feed ``probs`` (an array/tensor, or an iterable of batches) to a fresh estimator.

    ``source_prior`` goes to ``em``, and to ``reference`` as its ``thresholds`` (ignored by the others); ``source_probs``/``source_labels`` (arrays or
    iterables of batches) feed ``bbse``'s confusion. ``classes`` default to the source prior's classes.
    """
    batches = _batches(probs)
    first = next(batches)
    if classes is None:
        classes = source_prior.classes if isinstance(source_prior, ClassPrior) else \
            tuple(f"class{c}" for c in range(first.shape[1]))
    if method == "em":
        kwargs["source_prior"] = source_prior
    elif method == "reference" and source_prior is not None:
        kwargs.setdefault("thresholds", source_prior)  # the reference rule thresholds on the source pixel prior
    estimator = make_estimator(method, classes, **kwargs)
    if isinstance(estimator, BBSEEstimator):
        if source_probs is None or source_labels is None:
            raise ValueError("bbse needs source_probs= and source_labels= (a labelled source split)")
        for source_batch, label_batch in zip(_batches(source_probs), _batches(source_labels), strict=True):
            estimator.update_source(source_batch, label_batch)
    for batch in chain([first], batches):
        estimator.update(batch)
    return estimator.result()
