"""The base of the streaming, mergeable estimators: input handling, unit counting, merging, the bootstrap.

Every estimator has ``update(probs)``, ``merge(other)`` and ``result() -> ClassPrior``. ``probs`` are
PROBABILITIES (softmax applied, possibly calibrated), torch (any device) or numpy: ``(B, K, H, W)`` (B
images) or ``(N, K)`` (N samples, each its own unit: classification data, or one row per image).
Small per-image statistics (K floats per image; for EM the image of each sampled pixel) are kept, so
``result()`` reports a percentile bootstrap interval over images in ``provenance["confidence_interval"]``.

``update(probs, names=...)`` names the images of a batch: every random draw of an image (EM's pixel keys, the
bootstrap's multiplicities, drawn as Poisson(1) weights) then comes from a key of its name
(:mod:`labelshift.sampling`), so shards merged in a fixed order give the estimate of one pass, whatever the
sharding. Without names, draws follow the order of arrival (a multinomial bootstrap over positions).
"""
from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Sequence

import numpy as np
import torch

from labelshift.classes import ClassSet
from labelshift.priors import ClassPrior, PriorKind, class_names_of, floor_probabilities
from labelshift.sampling import BOOTSTRAP_WEIGHTS, keyed_generator, name_key


def as_tensor(data: Any) -> torch.Tensor:
    """A torch view of a tensor or array (read-only arrays, e.g. from Ray Data, without torch's warning)."""
    if torch.is_tensor(data):
        return data.detach()
    array = np.asarray(data)
    if array.flags.writeable:
        return torch.from_numpy(array)
    with warnings.catch_warnings():  # never written to: the estimators only read their inputs
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def as_units(probs: Any, num_classes: int) -> torch.Tensor:
    """(B, K, H, W) or (N, K) probabilities -> a (U, K, H, W) tensor ((N, K) becomes (N, K, 1, 1))."""
    tensor = as_tensor(probs)
    if tensor.ndim == 2:
        tensor = tensor[:, :, None, None]
    if tensor.ndim != 4 or tensor.shape[1] != num_classes:
        raise ValueError(f"expected probabilities (B, {num_classes}, H, W) or (N, {num_classes}), "
                         f"got shape {tuple(tensor.shape)}")
    if not tensor.is_floating_point():
        raise TypeError(f"probabilities must be floating point, got {tensor.dtype}")
    return tensor


def argmax_histograms(units: torch.Tensor) -> np.ndarray:
    """(U, K, H, W) -> (U, K) float64 per-unit histogram of the argmax class."""
    num_units, num_classes = units.shape[:2]
    predicted = units.argmax(dim=1).flatten(1)
    offsets = torch.arange(num_units, device=units.device)[:, None] * num_classes
    histogram = torch.bincount((predicted + offsets).flatten(), minlength=num_units * num_classes)
    return histogram.view(num_units, num_classes).cpu().numpy().astype(np.float64)


def prior_vector(prior: ClassPrior | Any, class_names: tuple[str, ...], role: str) -> np.ndarray:
    if isinstance(prior, ClassPrior):
        if prior.classes != class_names:
            raise ValueError(f"{role} is over classes {list(prior.classes)}, the estimator over {list(class_names)}")
        return prior.probs
    values = np.asarray(prior.detach().cpu() if torch.is_tensor(prior) else prior, dtype=np.float64)
    if values.shape != (len(class_names),):
        raise ValueError(f"{role} must have shape ({len(class_names)},), got {values.shape}")
    return floor_probabilities(values, class_names)


@dataclass(frozen=True)
class EstimatorInputs:
    """What an estimate pass knows about the source, from which each estimator takes what it needs
    (:meth:`PriorEstimator.arguments`)."""

    source_pixel_prior: ClassPrior  # the source pixel frequencies (the reference rule's thresholds)
    calibrated_prior: ClassPrior  # the prior under which the calibrated posteriors hold (EM's source prior)
    em_sample_pixels: int = 200_000
    presence_threshold: float = 0.001


class PriorEstimator(ABC):
    """Base of the streaming estimators: unit counting, merging, bootstrap over units, the result.

    Class attributes describe each method once, for every caller: ``method`` (its registry name), ``kind``
    (the prior it estimates), ``posteriors`` (what an estimate pass feeds it: the raw softmax, or the
    calibrated one), ``source_prior_argument`` (the constructor argument a single source prior goes to, if
    any) and ``needs_source_labels`` (a labelled source split, through ``update_source``).
    """

    method: ClassVar[str] = ""
    kind: ClassVar[PriorKind] = "pixel"
    posteriors: ClassVar[Literal["raw", "calibrated"]] = "calibrated"
    source_prior_argument: ClassVar[str | None] = None
    needs_source_labels: ClassVar[bool] = False

    @classmethod
    def arguments(cls, inputs: EstimatorInputs) -> dict[str, Any]:
        """The constructor arguments an estimate pass gives this method (beyond classes, bootstrap, seed)."""
        return {}

    def __init__(self, classes: ClassSet | Sequence[str], *, bootstrap: int = 100, confidence: float = 0.9,
                 seed: int = 0, provenance: dict[str, Any] | None = None) -> None:
        if bootstrap < 0 or not 0 < confidence < 1:
            raise ValueError(f"need bootstrap >= 0 and 0 < confidence < 1, got {bootstrap}, {confidence}")
        self.class_names = class_names_of(classes)
        self.bootstrap, self.confidence, self.seed = int(bootstrap), float(confidence), int(seed)
        self.provenance = dict(provenance or {})
        self.num_units = 0  # images (or rows of (N, K) inputs)
        self.num_pixels = 0
        self.unit_keys: list[int | None] = []  # (U,) key of each unit's name (None: unnamed)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def update(self, probs: Any, names: Sequence[str] | None = None, **kwargs: Any) -> None:
        """Add a batch of probabilities (B, K, H, W) or (N, K); ``names`` (B,) names its images (e.g. the
        Cityscapes stems), which keys their random draws."""
        units = as_units(probs, self.num_classes)
        if names is not None and len(names) != units.shape[0]:
            raise ValueError(f"{len(names)} names for a batch of {units.shape[0]} images")
        keys = [None] * units.shape[0] if names is None else [name_key(name) for name in names]
        self._ingest(units, unit_keys=keys, **kwargs)
        self.unit_keys.extend(keys)
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
        repeated = {k for k in self.unit_keys if k is not None} & {k for k in other.unit_keys if k is not None}
        if repeated:
            raise ValueError(f"cannot merge estimators that both saw the same {len(repeated)} image(s): a shard "
                             "must hold images no other shard holds")
        self._merge_state(other)
        self.unit_keys.extend(other.unit_keys)
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

    def expect_pixels(self, total_pixels: int) -> None:
        """Told how many pixels the whole pass feeds (over all shards), a shard may keep only what the merged
        estimate can use (EM: the keys that can still make the merged bottom-k). A no-op by default."""

    def _bootstrap_weights(self) -> np.ndarray:
        """(R, U) multiplicities of the units in R bootstrap replicates: Poisson(1) drawn from each unit's
        name when every unit is named (independent of order and sharding), else a multinomial over positions."""
        if self.unit_keys and all(key is not None for key in self.unit_keys):
            return np.stack([keyed_generator(self.seed, BOOTSTRAP_WEIGHTS, key).poisson(1.0, self.bootstrap)
                             for key in self.unit_keys], axis=1).astype(np.float64)
        rng = np.random.default_rng(self.seed)
        return np.stack([np.bincount(rng.integers(0, self.num_units, self.num_units), minlength=self.num_units)
                         for _ in range(self.bootstrap)]).astype(np.float64)

    def _bootstrap_interval(self) -> dict[str, Any] | None:
        if self.bootstrap == 0:
            return None
        replicates = np.full((self.bootstrap, self.num_classes), np.nan)
        for row, unit_weights in enumerate(self._bootstrap_weights()):
            if unit_weights.sum() == 0:
                continue
            estimate = self._estimate(unit_weights)
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


class UnitStatisticsEstimator(PriorEstimator):
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
        assert isinstance(other, UnitStatisticsEstimator)
        self._unit_blocks.append(other.unit_statistics().copy())

    def _estimate(self, unit_weights: np.ndarray | None) -> np.ndarray:
        statistics = self.unit_statistics()
        return statistics.sum(axis=0) if unit_weights is None else unit_weights @ statistics

    def _counts(self, point: np.ndarray) -> np.ndarray | None:
        return point if self.counts_are_sums else None


