"""Settings of the segmentation server (the ``args`` of ``serve/config.yaml``) and of one request.

Unknown keys are rejected, as in experiment configs. The target prior and the IA defaults are not here: they
come from the bundle (and a sweep's overrides file) and change at run time through Serve's ``user_config``
(:class:`PriorUserConfig`, laid over them) or ``PUT /v1/priors``; weights never change without a redeploy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, model_validator

from labelshift.config.base import StrictModel

from labelshift.data.decode import ImageLimits

AdjustMode = Literal["none", "ia", "online", "local"]
ADJUST_MODES: tuple[AdjustMode, ...] = ("none", "ia", "online", "local")
OutputFormat = Literal["png", "json", "overlay"]
TEMPERATURE_RANGE = (0.05, 20.0)  # IA logit temperature a request may ask for (inclusive)
TAU_RANGE = (0.0, 4.0)  # strengths of the prior terms a request may ask for (inclusive)
TOKEN_ENV = "LABELSHIFT_SERVE_TOKEN"
REJECTION_HEADROOM = 32  # requests a replica takes beyond its admission limit, to answer them the JSON 503


class OnlineSettings(StrictModel):
    """Opt-in online prior tracking (:class:`labelshift.serving.online.OnlinePriorTracker`)."""

    enabled: bool = False
    window_images: int = Field(32, ge=1)
    pixels_per_image: int = Field(1000, ge=1)
    update_every: int = Field(4, ge=1)
    min_images: int = Field(4, ge=1)
    seed: int = 0


class ServeSettings(StrictModel):
    """The server: which bundle (and sweep overrides file), input limits, batching and back-pressure.

    Back-pressure is the replica's own admission (:class:`labelshift.serving.admission.Admission`), so that
    overload answers the JSON 503 (Serve's own 503 is plain text): a replica works on at most
    ``max_ongoing_requests`` segment requests at once (reading, decoding, batching; at least ``max_batch_size``,
    or batches never fill), holds at most ``max_queued_requests`` more waiting (-1: unbounded), and answers the
    next one 503 at once, before reading its body. Serve's own limits (:meth:`serve_options`) sit above these
    (``REJECTION_HEADROOM``), so rejected requests reach the replica; Serve's queue is only a backstop.
    ``default_adjust`` None: ``ia`` for an adapted model, ``none`` for a prior-corrected one.
    """

    bundle: str
    overrides: str | None = None  # a Tune sweep's exported overrides file (adjust.*, prior.method)
    device: str = "cpu"
    torch_threads: int | None = Field(None, ge=1)  # None: the bundle's runtime.torch_threads
    max_bytes: int = Field(ImageLimits.max_bytes, ge=1)
    max_pixels: int = Field(ImageLimits.max_pixels, ge=1)
    max_batch_size: int = Field(4, ge=1)
    batch_wait_timeout_s: float = Field(0.01, ge=0.0)
    max_ongoing_requests: int = Field(8, ge=1)
    max_queued_requests: int = Field(32, ge=-1)
    num_cpus: float = Field(1.0, gt=0)  # logical CPUs per replica
    health_check_period_s: float = Field(10.0, gt=0)
    default_adjust: AdjustMode | None = None
    online: OnlineSettings = OnlineSettings()
    token: str | None = None  # bearer token for PUT /v1/priors; default: the LABELSHIFT_SERVE_TOKEN variable

    @model_validator(mode="after")
    def _batches_can_fill(self) -> "ServeSettings":
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(f"max_ongoing_requests ({self.max_ongoing_requests}) must be at least max_batch_size "
                             f"({self.max_batch_size}): a replica never batches more requests than it holds")
        if self.max_queued_requests == 0:
            raise ValueError("max_queued_requests must be -1 (no limit) or a positive integer (Serve's rule)")
        if self.online.min_images > self.online.window_images:
            raise ValueError("online.min_images must not exceed online.window_images")
        return self

    @property
    def limits(self) -> ImageLimits:
        return ImageLimits(self.max_bytes, self.max_pixels)

    @property
    def admission_limit(self) -> int | None:
        """Segment requests a replica holds (working + waiting) before it answers 503; None: no limit."""
        return None if self.max_queued_requests == -1 else self.max_ongoing_requests + self.max_queued_requests

    def serve_options(self) -> dict[str, int]:
        """Serve's ``max_ongoing_requests`` / ``max_queued_requests`` for the deployment: above the replica's
        admission limit, so requests beyond it reach the replica and get the JSON 503. (Serve's router counts a
        request as queued until it picks a replica, so a burst of concurrent requests passes a small Serve queue
        limit even while the replicas have room: its plain-text 503 then.)"""
        if self.admission_limit is None:
            return {"max_ongoing_requests": self.max_ongoing_requests + REJECTION_HEADROOM, "max_queued_requests": -1}
        backstop = self.admission_limit + REJECTION_HEADROOM
        return {"max_ongoing_requests": backstop, "max_queued_requests": backstop}


class AdjustUpdate(StrictModel):
    """IA settings a running server may change (``None``: the bundle's value, with the sweep overrides)."""

    space: Literal["raw", "calibrated"] | None = None
    temperature: float | None = Field(None, ge=TEMPERATURE_RANGE[0], le=TEMPERATURE_RANGE[1])
    tau_source: float | None = Field(None, ge=TAU_RANGE[0], le=TAU_RANGE[1])
    tau_target: float | None = Field(None, ge=TAU_RANGE[0], le=TAU_RANGE[1])


class PriorUserConfig(StrictModel):
    """Serve's ``user_config``: hot-swapped by ``reconfigure()`` without restarting replicas, laid over the bundle's
    settings and the sweep overrides (a key left out, or ``None``, serves theirs). ``target_prior``: the name of a
    prior in the bundle (e.g. ``estimate_em``) or a ClassPrior document; ``adjust``: IA settings."""

    target_prior: str | dict[str, Any] | None = None
    adjust: AdjustUpdate | None = None


class ParameterError(ValueError):
    """Request parameters the server cannot honour (HTTP 422); the message says why."""


@dataclass(frozen=True)
class SegmentOptions:
    """One request's settings: the adjustment (``local``: a prior per image, shrunk toward the target prior; no
    state) and, for IA, optional overrides of the bundle's IA settings."""

    adjust: AdjustMode
    temperature: float | None = None
    tau_source: float | None = None
    tau_target: float | None = None

    def __post_init__(self) -> None:
        for name, (low, high) in (("temperature", TEMPERATURE_RANGE), ("tau_source", TAU_RANGE),
                                  ("tau_target", TAU_RANGE)):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and low <= value <= high):
                raise ParameterError(f"{name} must be in [{low}, {high}], got {value}")
        if self.adjust not in ADJUST_MODES:
            raise ParameterError(f"adjust must be one of {', '.join(ADJUST_MODES)}; got {self.adjust!r}")
