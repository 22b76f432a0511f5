"""Streaming, mergeable estimators of the target class prior π_t (no target labels needed), and the estimate
pass that feeds them batch by batch.

Every estimator has ``update(probs)``, ``merge(other)`` and ``result() -> ClassPrior`` (``base``). Methods
(``make_estimator(method, classes, **kw)``, the registry): ``reference`` (the reference code's rule,
bit-exact), ``count`` / ``soft_count`` (pixel priors), ``presence`` (image prior) (``rules``), ``em`` (Saerens
et al. 2002, on a bounded uniform pixel sample; ``em``) and ``bbse`` (Lipton et al. 2018 with a soft confusion
matrix and a ridge; ``bbse``). The pass (``passes``): ``make_estimators`` / ``update_estimators`` /
``merge_estimators`` / ``estimator_results``. Ensembles (``ensemble``) combine other methods' results.
"""
from labelshift.estimate.base import EstimatorInputs, PriorEstimator
from labelshift.estimate.bbse import BBSEEstimator, bbse_solve
from labelshift.estimate.em import EMEstimator, em_label_shift
from labelshift.estimate.passes import (calibrated_source_prior, estimator_results, feed_source_sample,
                                        label_statistics, label_statistics_of,
                                        make_estimators, merge_estimators, needs_source_validation, prior_errors,
                                        update_estimators)
from labelshift.estimate.ensemble import ENSEMBLES, ensemble_prior
from labelshift.estimate.registry import (ESTIMATORS, IMAGE_METHODS, METHODS, PIXEL_METHODS, estimate_prior,
                                          estimator_class, make_estimator, method_kind)
from labelshift.estimate.rules import CountEstimator, PresenceEstimator, ReferenceEstimator, SoftCountEstimator

__all__ = [
    "BBSEEstimator", "CountEstimator", "EMEstimator", "ENSEMBLES", "ESTIMATORS", "EstimatorInputs", "IMAGE_METHODS", "METHODS",
    "PIXEL_METHODS", "PresenceEstimator", "PriorEstimator", "ReferenceEstimator", "SoftCountEstimator",
    "bbse_solve", "calibrated_source_prior", "em_label_shift", "ensemble_prior", "estimate_prior", "estimator_class",
    "estimator_results", "feed_source_sample", "label_statistics", "label_statistics_of",
    "make_estimator", "make_estimators", "method_kind", "merge_estimators", "needs_source_validation", "prior_errors",
    "update_estimators",
]
