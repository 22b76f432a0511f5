"""Class priors as data with provenance: :class:`ClassPrior`, named presets, JSON I/O, label statistics.

A prior is a (K,) probability vector over an ordered class set, of one of two kinds:

- ``pixel``: fraction of labelled pixels per class;
- ``image``: per-class count of images in which the class is present, normalised over classes
  (what the reference code uses for both domains).

Presets are built from ``presets/reference-priors.json`` (the vectors published with the reference code of
Liu et al., CVPR 2022); no class statistic is written in this file.
"""
from __future__ import annotations

import functools
import json
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Sequence

import numpy as np

from labelshift.atomic import write_json_atomic
from labelshift.classes import IGNORE_INDEX, ClassSet, get_class_set, reference_statistics

PRIOR_FLOOR = 1e-6
PRIOR_KINDS = ("pixel", "image")
PriorKind = Literal["pixel", "image"]
_FORMAT = "labelshift.ClassPrior/1"
REFERENCE_SOURCE = (
    "reference code of Liu et al., 'Undoing the Damage of Label Shift for Cross-domain Semantic "
    "Segmentation', CVPR 2022 (labelshift/presets/reference-priors.json)"
)


def class_names_of(classes: ClassSet | Sequence[str]) -> tuple[str, ...]:
    """The ordered class names of a :class:`ClassSet` or a sequence of names."""
    names = classes.names if isinstance(classes, ClassSet) else tuple(str(n) for n in classes)
    if not names:
        raise ValueError("a class set needs at least one class")
    return names


def floor_probabilities(weights: Any, class_names: Sequence[str] | None = None, *,
                        eps: float = PRIOR_FLOOR, warn: bool = True) -> np.ndarray:
    """Normalise non-negative weights (K,) or rows of (R, K) to probabilities, raising entries below ``eps``.

    Entries below ``eps`` (zero-mass classes) are set to ``eps`` and the vector renormalised, so that
    ``log`` is always finite. With ``warn`` a :func:`warnings.warn` names the floored classes.
    Returns float64 of the input's shape.
    """
    probs = np.array(weights, dtype=np.float64)
    if probs.ndim not in (1, 2) or probs.shape[-1] == 0:
        raise ValueError(f"a prior must be a non-empty (K,) or (R, K) array, got shape {probs.shape}")
    if not np.all(np.isfinite(probs)) or np.any(probs < 0):
        raise ValueError(f"prior weights must be finite and non-negative, got {probs.tolist()}")
    totals = probs.sum(axis=-1, keepdims=True)
    if np.any(totals <= 0):
        raise ValueError("prior weights sum to zero: no class has any mass")
    low = probs < eps * totals / (1.0 + probs.shape[-1] * eps)  # an already floored entry is not low again
    if not low.any() and np.all(np.abs(totals - 1.0) <= 1e-12):
        return probs  # already a floored probability vector: keep it bit-exact
    probs = probs / totals
    if low.any():
        if warn:
            columns = np.flatnonzero(low.any(axis=0) if probs.ndim == 2 else low)
            named = [class_names[i] if class_names else str(i) for i in columns]
            warnings.warn(f"classes {named} have (near-)zero prior mass; floored to {eps:g} and renormalised",
                          stacklevel=3)
        probs = np.where(low, eps, probs)
        probs = probs / probs.sum(axis=-1, keepdims=True)
    return probs


def _jsonable(value: Any) -> Any:
    """Provenance values -> JSON types (numpy arrays/scalars to lists/numbers, tuples to lists)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


class PriorError(ValueError):
    """A prior file, preset name or class set that cannot be used; the message names it."""


@dataclass(frozen=True, eq=False)
class ClassPrior:
    """A class prior π over ``classes``: ``probs`` (K,) float64 summing to 1, floored at :data:`PRIOR_FLOOR`.

    ``probs`` given to the constructor are normalised (and floored, with a warning naming the classes).

    ``counts`` (K,) holds the raw counts it was computed from (pixels or images), else None.
    ``provenance`` holds estimator, dataset, split, checkpoint hash, num_images/num_pixels,
    confidence_interval ({"level", "lower", "upper"}), source and notes.
    """

    classes: tuple[str, ...]
    probs: np.ndarray
    kind: PriorKind
    counts: np.ndarray | None = None
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = class_names_of(self.classes)
        if self.kind not in PRIOR_KINDS:
            raise ValueError(f"prior kind must be one of {PRIOR_KINDS}, got {self.kind!r}")
        probs = np.asarray(self.probs, dtype=np.float64)
        if probs.shape != (len(names),):
            raise ValueError(f"prior over {len(names)} classes got probabilities of shape {probs.shape}")
        probs = floor_probabilities(probs, names)
        probs.setflags(write=False)
        counts = None
        if self.counts is not None:
            counts = np.array(self.counts, dtype=np.float64)
            if counts.shape != (len(names),):
                raise ValueError(f"prior over {len(names)} classes got counts of shape {counts.shape}")
            counts.setflags(write=False)
        object.__setattr__(self, "classes", names)
        object.__setattr__(self, "probs", probs)
        object.__setattr__(self, "counts", counts)
        object.__setattr__(self, "provenance", dict(self.provenance))

    @classmethod
    def from_counts(cls, classes: ClassSet | Sequence[str], counts: Any, kind: PriorKind,
                    provenance: Mapping[str, Any] | None = None) -> ClassPrior:
        """Prior ∝ ``counts`` (K,) (pixel counts or image counts); zero counts are floored with a warning."""
        counts_array = np.asarray(counts, dtype=np.float64)
        return cls(class_names_of(classes), counts_array, kind, counts_array, dict(provenance or {}))

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def log_probs(self) -> np.ndarray:
        """(K,) float64 log π (finite: the probabilities are floored)."""
        return np.log(self.probs)

    @property
    def confidence_interval(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(lower, upper) per-class bounds from provenance["confidence_interval"], or None."""
        interval = self.provenance.get("confidence_interval")
        if not interval:
            return None
        return np.asarray(interval["lower"], dtype=np.float64), np.asarray(interval["upper"], dtype=np.float64)

    def with_provenance(self, **updates: Any) -> ClassPrior:
        """A copy whose provenance is updated with ``updates``."""
        return replace(self, provenance={**self.provenance, **updates})

    def describe(self) -> str:
        name = self.provenance.get("preset") or self.provenance.get("estimator") or "prior"
        return f"{name} ({self.kind}, {self.num_classes} classes)"

    def __repr__(self) -> str:
        values = ", ".join(f"{n}={p:.4f}" for n, p in zip(self.classes, self.probs))
        return f"ClassPrior[{self.describe()}]({values})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "classes": list(self.classes),
            "kind": self.kind,
            "probs": self.probs.tolist(),
            "counts": None if self.counts is None else self.counts.tolist(),
            "provenance": _jsonable(self.provenance),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ClassPrior:
        fmt = data.get("format", _FORMAT)
        if fmt != _FORMAT:
            raise ValueError(f"not a ClassPrior document: format {fmt!r} (expected {_FORMAT!r})")
        missing = [key for key in ("classes", "kind", "probs") if key not in data]
        if missing:
            raise ValueError(f"ClassPrior document lacks {missing}")
        return cls(tuple(data["classes"]), np.asarray(data["probs"], dtype=np.float64), data["kind"],
                   data.get("counts"), dict(data.get("provenance") or {}))

    def to_json(self, path: str | Path) -> Path:
        """Write atomically (temporary file + rename); returns the path."""
        return write_json_atomic(path, self.to_dict())

    @classmethod
    def from_json(cls, path: str | Path) -> ClassPrior:
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as error:
            raise PriorError(f"{path}: not valid JSON ({error})") from None
        try:
            return cls.from_dict(data)
        except ValueError as error:
            raise PriorError(f"{path}: {error}") from None


def check_compatible(a: ClassPrior, b: ClassPrior) -> None:
    """Raise ``ValueError`` unless ``a`` and ``b`` are over the same classes (same order) and of the same kind."""
    if a.classes != b.classes:
        only_a = [n for n in a.classes if n not in b.classes]
        only_b = [n for n in b.classes if n not in a.classes]
        detail = f"only in the first: {only_a}, only in the second: {only_b}" if only_a or only_b else \
            "same classes in a different order"
        raise ValueError(f"priors over different class sets: {a.describe()} vs {b.describe()} ({detail})")
    if a.kind != b.kind:
        raise ValueError(f"priors of different kinds cannot be combined: {a.describe()} is a {a.kind} prior, "
                         f"{b.describe()} is a {b.kind} prior; use two pixel priors or two image priors")


@dataclass(frozen=True)
class SourcePriors:
    """The source priors Inference Adjustment and CR pair a target prior with: ``pixel`` and ``image`` (the
    same kind as the target is used), and ``calibrated``, the prior under which the calibrated posteriors hold
    (IA in the calibrated space; None when no calibration was fitted)."""

    pixel: ClassPrior
    image: ClassPrior
    calibrated: ClassPrior | None = None

    @classmethod
    def single(cls, prior: ClassPrior) -> "SourcePriors":
        """One given prior used for both kinds (a preset or a file named by the user)."""
        return cls(prior, prior, None)

    def of_kind(self, kind: str) -> ClassPrior:
        """The source prior to pair with a target prior of ``kind`` (pixel | image)."""
        if kind not in PRIOR_KINDS:
            raise ValueError(f"prior kind must be one of {PRIOR_KINDS}, got {kind!r}")
        return self.pixel if kind == "pixel" else self.image


def _as_probability_pair(p: ClassPrior | Any, q: ClassPrior | Any) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(p, ClassPrior) and isinstance(q, ClassPrior):
        check_compatible(p, q)
    p_probs = p.probs if isinstance(p, ClassPrior) else floor_probabilities(p, warn=False)
    q_probs = q.probs if isinstance(q, ClassPrior) else floor_probabilities(q, warn=False)
    if p_probs.shape != q_probs.shape:
        raise ValueError(f"priors of different lengths: {p_probs.shape[0]} vs {q_probs.shape[0]}")
    return p_probs, q_probs


def prior_l1(a: ClassPrior | Any, b: ClassPrior | Any) -> float:
    """Σ_c |a_c − b_c| (0..2) between two priors (ClassPriors or (K,) weight vectors, normalised)."""
    a_probs, b_probs = _as_probability_pair(a, b)
    return float(np.abs(a_probs - b_probs).sum())


def prior_kl(p: ClassPrior | Any, q: ClassPrior | Any) -> float:
    """KL(p || q) = Σ_c p_c log(p_c / q_c), both floored at :data:`PRIOR_FLOOR`."""
    p_probs, q_probs = _as_probability_pair(p, q)
    return float(np.sum(p_probs * (np.log(p_probs) - np.log(q_probs))))


# ----------------------------------------------------------------------------------------- presets
@dataclass(frozen=True)
class _PresetSpec:
    json_key: str  # vector in reference-priors.json
    class_set: str  # "cityscapes19" | "synthia16"
    kind: PriorKind
    dataset: str
    split: str
    estimator: str
    num_images_key: str | None
    notes: str


_SOURCE_COUNTS_NOTE = "per-class image counts by the reference code's own presence rule; the source prior its IA/CR use"
_CONTAINING_NOTE = "number of source images containing each class, as published beside the source counts"
_PIXEL_NOTE = "true pixel fractions of the source labels; the thresholds of the reference estimation rule"
_ESTIMATE_NOTE = "Cityscapes train image counts estimated by the reference rule (test_trainlabelfre.py) with the {}"
_PRESETS: dict[str, _PresetSpec] = {
    "gta5_source_image_counts": _PresetSpec("gta5_source_image_counts_19", "cityscapes19", "image", "gta5",
                                            "train", "published", "gta5_num_images", _SOURCE_COUNTS_NOTE),
    "gta5_images_containing_class": _PresetSpec("gta5_images_containing_class_19", "cityscapes19", "image",
                                                "gta5", "train", "published", "gta5_num_images", _CONTAINING_NOTE),
    "gta5_pixel_frequency": _PresetSpec("gta5_pixel_frequency_19", "cityscapes19", "pixel", "gta5", "train",
                                        "published", None, _PIXEL_NOTE),
    "synthia_source_image_counts": _PresetSpec("synthia_source_image_counts_16", "synthia16", "image",
                                               "synthia", "train", "published", "synthia_num_images",
                                               _SOURCE_COUNTS_NOTE),
    "synthia_images_containing_class": _PresetSpec("synthia_images_containing_class_16", "synthia16", "image",
                                                   "synthia", "train", "published", "synthia_num_images",
                                                   _CONTAINING_NOTE),
    "synthia_pixel_frequency": _PresetSpec("synthia_pixel_frequency_16", "synthia16", "pixel", "synthia",
                                           "train", "published", None, _PIXEL_NOTE),
}
for _pair, _size in (("gta5", 19), ("synthia", 16)):
    for _head, _head_text in (("deeplabv2", "FADA DeepLabV2 (original ASPP) head"),
                              ("modified_aspp", "FADA modified-ASPP head")):
        _PRESETS[f"cityscapes_from_{_pair}_{_head}"] = _PresetSpec(
            f"cityscapes_estimated_counts_from_{_pair}_{_head}_{_size}",
            "cityscapes19" if _size == 19 else "synthia16", "image", "cityscapes", "train", "reference",
            "cityscapes_train_num_images", _ESTIMATE_NOTE.format(f"{_pair.upper()}-adapted {_head_text}"))


def preset_names() -> tuple[str, ...]:
    """Names of the published priors, e.g. ``gta5_source_image_counts``, ``cityscapes_from_gta5_deeplabv2``."""
    return tuple(sorted(_PRESETS))


def _check_published_class_order(class_set: ClassSet, stats: Mapping[str, Any]) -> None:
    short_names = stats[f"class_order_{class_set.num_classes}"]
    matches = len(short_names) == class_set.num_classes and all(
        full == short or full.endswith(" " + short) for full, short in zip(class_set.names, short_names))
    if not matches:
        raise ValueError(f"reference-priors.json class order {short_names} does not match {class_set.names}")


@functools.cache
def preset(name: str) -> ClassPrior:
    """The published prior ``name`` (see :func:`preset_names`), with its provenance."""
    try:
        spec = _PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown prior preset {name!r}; known: {list(preset_names())}") from None
    stats = reference_statistics()
    class_set = get_class_set(spec.class_set)
    _check_published_class_order(class_set, stats)
    values = np.asarray(stats[spec.json_key], dtype=np.float64)
    provenance: dict[str, Any] = {
        "preset": name, "estimator": spec.estimator, "dataset": spec.dataset, "split": spec.split,
        "source": REFERENCE_SOURCE, "reference_key": spec.json_key, "published_values": values.tolist(),
        "notes": spec.notes,
    }
    if spec.num_images_key:
        provenance["num_images"] = int(stats[spec.num_images_key])
    if spec.kind == "image":
        return ClassPrior.from_counts(class_set, values, "image", provenance)
    return ClassPrior(class_set.names, values, "pixel", None, provenance)


def load_prior(spec: str | Path | ClassPrior, class_set: ClassSet | Sequence[str] | str | None = None) -> ClassPrior:
    """A prior from a preset name, a JSON file path, or a ClassPrior; checked against ``class_set`` if given."""
    if isinstance(spec, ClassPrior):
        prior = spec
    elif isinstance(spec, str) and spec in _PRESETS:
        prior = preset(spec)
    elif Path(spec).is_file():
        prior = ClassPrior.from_json(spec)
    else:
        raise PriorError(f"prior {str(spec)!r} is neither a preset ({list(preset_names())}) "
                         f"nor an existing JSON file")
    if class_set is not None:
        expected = get_class_set(class_set).names if isinstance(class_set, str) else class_names_of(class_set)
        if prior.classes != expected:
            raise PriorError(f"prior {str(spec)!r} is over classes {list(prior.classes)}, "
                             f"expected {list(expected)}")
    return prior


# ------------------------------------------------------------------------------ label statistics
class LabelStatistics:
    """Streaming per-class pixel and image-presence counts of trainId label maps (mergeable).

    ``pixel_counts`` (K,) labelled pixels per class; ``image_counts`` (K,) images containing the class
    (at least ``min_pixels`` pixels); ``num_images``; ``num_pixels`` (valid) and ``num_ignored``.
    """

    def __init__(self, classes: ClassSet | Sequence[str], *, ignore_index: int = IGNORE_INDEX,
                 min_pixels: int = 1) -> None:
        self.class_names = class_names_of(classes)
        self.ignore_index = ignore_index
        self.min_pixels = min_pixels
        self.pixel_counts = np.zeros(len(self.class_names), dtype=np.int64)
        self.image_counts = np.zeros(len(self.class_names), dtype=np.int64)
        self.num_images = 0
        self.num_pixels = 0
        self.num_ignored = 0

    def update(self, labels: Any) -> None:
        """Add label maps: (H, W) or (B, H, W) integer trainIds (numpy or torch), ``ignore_index`` ignored."""
        array = labels.detach().cpu().numpy() if hasattr(labels, "detach") else np.asarray(labels)
        if array.ndim == 2:
            array = array[None]
        if array.ndim != 3 or not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"labels must be integer (H, W) or (B, H, W), got {array.dtype} {array.shape}")
        num_classes = len(self.class_names)
        flat = array.reshape(array.shape[0], -1).astype(np.int64)
        ignored = flat == self.ignore_index
        bad = (~ignored) & ((flat < 0) | (flat >= num_classes))
        if bad.any():
            raise ValueError(f"label values {np.unique(flat[bad])[:10].tolist()} are neither trainIds "
                             f"0..{num_classes - 1} nor the ignore index {self.ignore_index}")
        slots = np.where(ignored, num_classes, flat) + (num_classes + 1) * np.arange(flat.shape[0])[:, None]
        per_image = np.bincount(slots.ravel(), minlength=flat.shape[0] * (num_classes + 1))
        per_image = per_image.reshape(flat.shape[0], num_classes + 1)[:, :num_classes]
        self.pixel_counts += per_image.sum(axis=0)
        self.image_counts += (per_image >= self.min_pixels).sum(axis=0)
        self.num_images += flat.shape[0]
        self.num_ignored += int(ignored.sum())
        self.num_pixels += int(flat.size - ignored.sum())

    def merge(self, other: LabelStatistics) -> LabelStatistics:
        """Add ``other``'s counts into this accumulator (same classes); returns self."""
        if other.class_names != self.class_names or other.min_pixels != self.min_pixels:
            raise ValueError("cannot merge label statistics over different class sets or presence rules")
        self.pixel_counts += other.pixel_counts
        self.image_counts += other.image_counts
        self.num_images += other.num_images
        self.num_pixels += other.num_pixels
        self.num_ignored += other.num_ignored
        return self

    def _provenance(self, estimator: str, extra: Mapping[str, Any]) -> dict[str, Any]:
        return {"estimator": estimator, "num_images": self.num_images, "num_pixels": self.num_pixels,
                "num_ignored_pixels": self.num_ignored, **extra}

    def pixel_prior(self, **provenance: Any) -> ClassPrior:
        """Pixel prior (fraction of labelled pixels per class); ``provenance`` e.g. dataset=, split=."""
        return ClassPrior.from_counts(self.class_names, self.pixel_counts, "pixel",
                                      self._provenance("label_pixel_counts", provenance))

    def image_prior(self, **provenance: Any) -> ClassPrior:
        """Image prior (images containing each class, normalised over classes)."""
        extra = {"min_pixels": self.min_pixels, **provenance}
        return ClassPrior.from_counts(self.class_names, self.image_counts, "image",
                                      self._provenance("label_image_presence", extra))


def prior_from_label_counts(label_maps: Iterable[Any], classes: ClassSet | Sequence[str], *,
                            kind: PriorKind = "pixel", ignore_index: int = IGNORE_INDEX,
                            **provenance: Any) -> ClassPrior:
    """Exact prior of labelled data: feed each (H, W) / (B, H, W) trainId map through :class:`LabelStatistics`."""
    statistics = LabelStatistics(classes, ignore_index=ignore_index)
    for labels in label_maps:
        statistics.update(labels)
    if kind == "pixel":
        return statistics.pixel_prior(**provenance)
    if kind == "image":
        return statistics.image_prior(**provenance)
    raise ValueError(f"prior kind must be one of {PRIOR_KINDS}, got {kind!r}")
