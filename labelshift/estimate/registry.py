"""The registry: the one list of estimator names and kinds. Config values, CLI choices, the pixel/image method
lists and the per-method arguments all derive from it."""
from __future__ import annotations

from itertools import chain
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from labelshift.classes import ClassSet
from labelshift.estimate.base import PriorEstimator
from labelshift.estimate.bbse import BBSEEstimator
from labelshift.estimate.em import EMEstimator, EMRawEstimator
from labelshift.estimate.ensemble import ENSEMBLES
from labelshift.estimate.rules import CountEstimator, PresenceEstimator, ReferenceEstimator, SoftCountEstimator
from labelshift.priors import ClassPrior

ESTIMATORS: dict[str, type[PriorEstimator]] = {
    estimator.method: estimator for estimator in (
        ReferenceEstimator, CountEstimator, SoftCountEstimator, PresenceEstimator, EMEstimator, BBSEEstimator,
        EMRawEstimator)
}
METHODS: tuple[str, ...] = (*ESTIMATORS, *ENSEMBLES)  # an ensemble combines estimators' results: a pixel prior
PIXEL_METHODS: tuple[str, ...] = (*(name for name, cls in ESTIMATORS.items() if cls.kind == "pixel"), *ENSEMBLES)
IMAGE_METHODS: tuple[str, ...] = tuple(name for name, cls in ESTIMATORS.items() if cls.kind == "image")


def estimator_class(method: str) -> type[PriorEstimator]:
    """The registered estimator class of ``method``; an unknown name raises ``ValueError`` listing the known."""
    try:
        return ESTIMATORS[method]
    except KeyError:
        if method in ENSEMBLES:
            raise ValueError(f"{method!r} combines the results of {list(ENSEMBLES[method])}: run those in an "
                             "estimate pass (make_estimators / estimator_results)") from None
        raise ValueError(f"unknown prior estimator {method!r}; known: {list(METHODS)}") from None


def method_kind(method: str) -> str:
    """The kind of prior ``method`` gives (pixel | image); an ensemble gives a pixel prior."""
    return "pixel" if method in ENSEMBLES else estimator_class(method).kind


def make_estimator(method: str, classes: ClassSet | Sequence[str], **kwargs: Any) -> PriorEstimator:
    """A fresh estimator: ``method`` in :data:`ESTIMATORS`; ``kwargs`` its settings (and bootstrap, seed, ...)."""
    return estimator_class(method)(classes, **kwargs)


def _batches(data: Any) -> Iterator[Any]:
    if torch.is_tensor(data) or isinstance(data, np.ndarray):
        return iter([data])
    return iter(data)


def estimate_prior(probs: Any, method: str = "em", *, classes: ClassSet | Sequence[str] | None = None,
                   source_prior: ClassPrior | Any = None, source_probs: Any = None, source_labels: Any = None,
                   **kwargs: Any) -> ClassPrior:
    """One call: feed ``probs`` (an array/tensor, or an iterable of batches) to a fresh estimator.

    ``source_prior`` goes to the method's ``source_prior_argument`` (``em``'s source prior, the ``reference``
    rule's thresholds; ignored by the others); ``source_probs``/``source_labels`` (arrays or iterables of
    batches) feed a method that needs a labelled source split (``bbse``'s confusion). ``classes`` default to
    the source prior's classes.
    """
    cls = estimator_class(method)
    batches = _batches(probs)
    first = next(batches)
    if classes is None:
        classes = source_prior.classes if isinstance(source_prior, ClassPrior) else \
            tuple(f"class{c}" for c in range(first.shape[1]))
    if cls.source_prior_argument is not None:
        kwargs.setdefault(cls.source_prior_argument, source_prior)
    estimator = cls(classes, **kwargs)
    if cls.needs_source_labels:
        if source_probs is None or source_labels is None:
            raise ValueError(f"{method} needs source_probs= and source_labels= (a labelled source split)")
        for source_batch, label_batch in zip(_batches(source_probs), _batches(source_labels), strict=True):
            estimator.update_source(source_batch, label_batch)
    for batch in chain([first], batches):
        estimator.update(batch)
    return estimator.result()
