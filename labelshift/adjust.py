"""The one home of the label-shift maths: ``z' = z / T − τ_s·log π_s + τ_t·log π_t``.

Inference Adjustment (IA) at evaluation, pseudo-labelling, Tune trials, the HTTP server and the loss of
Classifier Refinement (CR) all call :func:`adjust_logits`; nothing else writes ``log π_t − log π_s``.

Priors are :class:`~labelshift.priors.ClassPrior` objects or 1-D weight vectors (torch tensors, numpy
arrays, sequences; normalised and floored at :data:`~labelshift.priors.PRIOR_FLOOR`). The log-prior
vector is computed in float64 and cast to the logits' dtype and device.
"""
from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from labelshift.classes import IGNORE_INDEX
from labelshift.priors import ClassPrior, SourcePriors, check_compatible, floor_probabilities

if TYPE_CHECKING:
    from labelshift.calibrate import Calibration
    from labelshift.estimate.per_image import ImagePriors

PriorLike = Union[ClassPrior, torch.Tensor, np.ndarray, Sequence[float]]


def log_prior(prior: PriorLike, num_classes: int | None = None, *, role: str = "prior",
              per_image: bool = False) -> torch.Tensor:
    """(K,) float64 CPU tensor of log π for a ClassPrior or a 1-D weight vector (normalised, floored).

    ``num_classes``: the expected K; a prior of another length raises ``ValueError``. ``per_image``: also take
    an (N, K) array of per-image priors (rows normalised and floored) and return (N, K).
    """
    if isinstance(prior, ClassPrior):
        probs = prior.probs
    else:
        weights = prior.detach().to("cpu", torch.float64).numpy() if torch.is_tensor(prior) else prior
        weights = np.asarray(weights, dtype=np.float64)
        if weights.ndim != 1 and not (per_image and weights.ndim == 2):
            raise ValueError(f"{role} must be a 1-D vector over classes, got shape {weights.shape}")
        probs = floor_probabilities(weights, warn=weights.ndim == 1)  # per-image rows: floored silently
    if num_classes is not None and probs.shape[-1] != num_classes:
        raise ValueError(f"{role} has {probs.shape[-1]} classes but the logits have {num_classes}")
    return torch.from_numpy(np.log(probs))


def log_prior_ratio(source_prior: PriorLike, target_prior: PriorLike, *, tau_source: float = 1.0,
                    tau_target: float = 1.0, num_classes: int | None = None) -> torch.Tensor:
    """(K,) float64 CPU tensor ``τ_t·log π_t − τ_s·log π_s``; ClassPrior pairs must be compatible. An (N, K)
    ``target_prior`` (one prior per image, ``adjust.mode: local``) gives (N, K)."""
    if isinstance(source_prior, ClassPrior) and isinstance(target_prior, ClassPrior):
        check_compatible(source_prior, target_prior)
    log_source = log_prior(source_prior, num_classes, role="source prior")
    log_target = log_prior(target_prior, num_classes, role="target prior", per_image=True)
    if log_source.shape[-1] != log_target.shape[-1]:
        raise ValueError(f"source prior has {log_source.shape[-1]} classes, target prior {log_target.shape[-1]}")
    return tau_target * log_target - tau_source * log_source


def _class_axis(dim: int, ndim: int) -> int:
    if not -ndim <= dim < ndim:
        raise ValueError(f"dim {dim} is out of range for logits with {ndim} dimensions")
    return dim % ndim


def adjust_logits(logits: torch.Tensor, source_prior: PriorLike, target_prior: PriorLike, *,
                  temperature: float = 1.0, tau_source: float = 1.0, tau_target: float = 1.0,
                  dim: int = 1) -> torch.Tensor:
    """Inference Adjustment: ``logits / temperature − τ_s·log π_s + τ_t·log π_t`` along the class ``dim``.

    logits: any floating tensor with K classes along ``dim`` — (N, K, H, W), (N, K) with ``dim=1``,
    (K,) or (..., K) with ``dim=-1``; any device and dtype (the result has the same).
    source_prior, target_prior: ClassPrior (a compatible pair) or (K,) weights; ``target_prior`` may also be
    (N, K) per-image priors (``dim=1``: row n adjusts image n).
    Returns a tensor of the logits' shape, dtype and device.
    """
    if not torch.is_tensor(logits) or not logits.is_floating_point():
        raise TypeError(f"logits must be a floating-point torch tensor, got {type(logits).__name__}"
                        + (f" of {logits.dtype}" if torch.is_tensor(logits) else ""))
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    axis = _class_axis(dim, logits.ndim)
    num_classes = logits.shape[axis]
    shift = log_prior_ratio(source_prior, target_prior, tau_source=tau_source, tau_target=tau_target,
                            num_classes=num_classes)
    view = [1] * logits.ndim
    view[axis] = num_classes
    if shift.ndim == 2:  # per-image priors: row n shifts image n
        if axis != 1 or shift.shape[0] != logits.shape[0]:
            raise ValueError(f"per-image priors {tuple(shift.shape)} need logits (N, K, ...) with N = "
                             f"{shift.shape[0]} and dim=1, got {tuple(logits.shape)} with dim={dim}")
        view[0] = shift.shape[0]
    shift = shift.to(device=logits.device, dtype=logits.dtype).view(view)
    scaled = logits if temperature == 1.0 else logits / temperature
    return scaled + shift


def logit_adjusted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, source_prior: PriorLike,
                                 target_prior: PriorLike, *, tau: float = 1.0,
                                 ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The CR loss: cross-entropy of ``logits + τ·(log π_s − log π_t)``, averaged over valid pixels only.

    logits: (N, K, H, W) or (N, K); labels: (N, H, W) or (N,) int64, ``ignore_index`` ignored.
    Training this loss on source labels makes the raw logits approximate the target posterior.
    Unlike the reference (which averaged over all pixels, ignored ones included), the mean is over
    valid pixels; with no valid pixel the loss is 0 and still carries a (zero) gradient.
    Returns a scalar tensor.
    """
    adjusted = adjust_logits(logits, target_prior, source_prior, tau_source=tau, tau_target=tau, dim=1)
    loss_sum = F.cross_entropy(adjusted, labels, ignore_index=ignore_index, reduction="sum")
    num_valid = (labels != ignore_index).sum().clamp_min(1)  # stays on the device: no host sync
    return loss_sum.to(torch.promote_types(loss_sum.dtype, torch.float32)) / num_valid


def adjusted_probabilities(logits: torch.Tensor, source_prior: PriorLike, target_prior: PriorLike,
                           **adjust_kwargs: Any) -> torch.Tensor:
    """``softmax(adjust_logits(...))`` along the class dim (``dim`` in ``adjust_kwargs``, default 1)."""
    dim = adjust_kwargs.get("dim", 1)
    return torch.softmax(adjust_logits(logits, source_prior, target_prior, **adjust_kwargs), dim=dim)


class AdjustSettings(Protocol):
    """What :func:`ia_transform` reads of an adjustment config (``labelshift.config.AdjustConfig``)."""

    space: str
    temperature: float
    tau_source: float
    tau_target: float


def ia_transform(adjust: AdjustSettings, source_prior: SourcePriors | ClassPrior, target_prior: ClassPrior,
                 calibration: Calibration | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The one factory of Inference Adjustment: logits (N, K, ...) -> adjusted logits, deciding once which
    source prior, which space and which temperature apply.

    ``adjust.space == "raw"`` (or an image-kind target): ``z/T − τ_s·log π_s + τ_t·log π_t`` with π_s the source
    prior of the target's kind and T = ``adjust.temperature``. ``"calibrated"`` with a pixel target: IA in the
    calibration's space, ``z/T_cal + b − log π_cal + log π_t`` written as ``z/T_cal − log(π_cal·e^(−b)) +
    log π_t``, where π_cal (``source_prior.calibrated``) is the prior the calibrated posteriors hold under.
    ``source_prior``: :class:`SourcePriors`, or one ClassPrior used whatever the target's kind (in the
    calibrated space: the prior of the calibrated posteriors). ``adjust.mode == "local"``: a :class:`LocalIA`
    (a prior per image, shrunk toward ``target_prior``; ``adjust.local`` settings).
    """
    if adjust.space not in ("raw", "calibrated"):
        raise ValueError(f"adjust.space must be 'raw' or 'calibrated', got {adjust.space!r}")
    temperature = adjust.temperature
    if adjust.space == "calibrated" and target_prior.kind == "pixel":
        if calibration is None:
            raise ValueError("IA in the calibrated space needs the calibration (adjust.space: calibrated)")
        calibrated = source_prior.calibrated if isinstance(source_prior, SourcePriors) else source_prior
        if calibrated is None:
            raise ValueError("IA in the calibrated space needs the prior of the calibrated posteriors")
        source = calibration.effective_source_prior(calibrated)
        temperature = calibration.temperature
    else:
        source = source_prior.of_kind(target_prior.kind) if isinstance(source_prior, SourcePriors) else source_prior
    global_ia = functools.partial(adjust_logits, source_prior=source, target_prior=target_prior,
                                  temperature=temperature, tau_source=adjust.tau_source, tau_target=adjust.tau_target)
    if getattr(adjust, "mode", "global") == "local":
        return LocalIA(adjust, global_ia, source_prior, target_prior, calibration)
    return global_ia


class LocalIA:
    """IA with a prior per image (``adjust.mode: local``): logits (N, K, ...) -> logits adjusted toward each
    image's own prior, estimated from that image alone (:mod:`labelshift.estimate.per_image`, settings
    ``adjust.local``) and shrunk toward the dataset prior (the target prior). The same source prior, space and
    temperature as global IA (``global_ia``, the partial of :func:`adjust_logits` :func:`ia_transform` built);
    stateless: an image's output depends on that image only.

    ``transform(logits)`` adjusts; ``image_priors(logits)`` returns the priors (:class:`ImagePriors`: (N, K) probs
    and the safety counts) and ``apply(logits, priors)`` adjusts with given ones, so that a caller records the
    priors it used, or estimates them once at one resolution and applies them at another.
    """

    def __init__(self, adjust: AdjustSettings, global_ia: functools.partial, source_prior: SourcePriors | ClassPrior,
                 target_prior: ClassPrior, calibration: Calibration | None) -> None:
        from labelshift.estimate.per_image import LocalSettings

        if target_prior.kind != "pixel":
            raise ValueError(f"adjust.mode local needs a pixel target prior, got {target_prior.describe()}")
        self.settings = LocalSettings.of(adjust.local)
        self.global_ia, self.target_prior, self.calibration = global_ia, target_prior, calibration
        pixel_source = source_prior.pixel if isinstance(source_prior, SourcePriors) else source_prior
        if self.settings.reads_calibrated:
            if calibration is None:
                raise ValueError("adjust.mode local on calibrated posteriors needs the calibration "
                                 "(or adjust.local.posteriors: raw)")
            calibrated = source_prior.calibrated if isinstance(source_prior, SourcePriors) else source_prior
            self.posterior_prior = calibrated if calibrated is not None else pixel_source
        else:
            self.posterior_prior = pixel_source
        self.presence_model = calibration.presence if calibration is not None else None
        if self.settings.presence and self.presence_model is None:
            from labelshift.image_presence import MISSING_MODEL

            raise ValueError(MISSING_MODEL)
        # the presence model was fitted on raw logits under the source prior: read it after raw IA toward the
        # dataset prior at T = τ = 1, whatever this transform's space, temperature and τ
        self.presence_source = pixel_source

    def image_priors(self, logits: torch.Tensor) -> ImagePriors:
        """Raw logits (N, K, H, W), any resolution -> the per-image priors (N, K) with their diagnostics."""
        from labelshift.estimate.per_image import estimate_image_priors

        return estimate_image_priors(logits, self.settings, dataset_prior=self.target_prior,
                                     posterior_prior=self.posterior_prior,
                                     calibrate=self.calibration.apply if self.calibration is not None else None,
                                     adjust_toward=self._adjust_toward, presence_model=self.presence_model,
                                     presence_view=self._presence_view)

    def _presence_view(self, grid: torch.Tensor) -> torch.Tensor:
        """Raw grid logits (N, K, M) -> raw IA toward the dataset prior (T = τ = 1): the presence model's space."""
        return adjust_logits(grid, self.presence_source, self.target_prior)

    def _adjust_toward(self, logits: torch.Tensor, image_priors: torch.Tensor) -> torch.Tensor:
        """logits (N, K, ...) adjusted toward per-image priors (N, K) (the maths of :func:`adjust_logits`)."""
        return adjust_logits(logits, **{**self.global_ia.keywords, "target_prior": image_priors})

    def apply(self, logits: torch.Tensor, priors: ImagePriors) -> torch.Tensor:
        """logits (N, K, ...) adjusted toward ``priors.probs`` (N, K), row by row (:func:`adjust_logits`)."""
        return self._adjust_toward(logits, priors.probs)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return self.apply(logits, self.image_priors(logits))
