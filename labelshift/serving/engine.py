"""The segmentation engine a server replica holds: a bundle's model, its priors and IA settings, batched
prediction of decoded images of any size, and (opt-in) online prior tracking.

The mask of an image is exactly what the library computes offline: the evaluation transform of the bundle's
input size (:func:`labelshift.data.build_transforms`), :func:`labelshift.inference.predict` at the image's own
size, the IA transform of :func:`labelshift.adjust.ia_transform` (``adjust=local``: its per-image
:class:`~labelshift.adjust.LocalIA`), argmax.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from labelshift.adjust import LocalIA, ia_transform
from labelshift.bundle import ModelBundle
from labelshift.classes import get_class_set
from labelshift.config import AdjustConfig
from labelshift.data import build_transforms
from labelshift.inference import predict
from labelshift.priors import ClassPrior, check_compatible
from labelshift.serving.online import OnlinePriorTracker
from labelshift.serving.settings import (AdjustMode, OnlineSettings, ParameterError, PriorUserConfig,
                                         SegmentOptions)

HEALTH_PROBE_SIZE = (8, 8)  # (height, width) of the image check_health runs through the model


@dataclass(frozen=True)
class Segmentation:
    """One image's answer: the trainId mask (H, W) uint8 at the image's size, the adjustment applied, the
    name of the target prior used (None without adjustment) and, for ``adjust=local``, the image's own prior
    (``ImagePriors.record``: ``prior`` [K], ``iterations``, ``fallback``, ``floored_classes``)."""

    mask: np.ndarray
    adjust: AdjustMode
    prior: str | None
    image_prior: dict[str, Any] | None = None

    def info(self) -> dict[str, Any]:
        info = {"adjust": self.adjust, "prior": self.prior}
        return info if self.image_prior is None else {**info, "image_prior": self.image_prior}


class SegmentationEngine:
    """Model + priors of a bundle. ``segment`` is called from one inference thread; ``set_target_prior`` /
    ``reconfigure`` from the server's event loop (a batch uses the prior it started with)."""

    def __init__(self, bundle: ModelBundle, *, device: str = "cpu", default_adjust: AdjustMode | None = None,
                 online: OnlineSettings = OnlineSettings()) -> None:
        self.bundle = bundle
        self.device = torch.device(device)
        self.model = bundle.build_model(self.device)
        self.class_names = bundle.classes
        self.palette = get_class_set(bundle.class_set).palette
        self.transform = build_transforms(train=False, size=bundle.input_size, mean=bundle.mean, std=bundle.std)
        self.default_adjust: AdjustMode = default_adjust or ("none" if bundle.prior_corrected else "ia")
        if bundle.prior_corrected and self.default_adjust != "none":
            raise ParameterError(f"the bundle's model is already prior-corrected ({bundle.model_stage}): "
                                 f"default_adjust must be 'none', not {self.default_adjust!r}")
        self.adjust = bundle.adjust
        self.target_name, self.target_prior = bundle.target_prior_name, bundle.target_prior
        self.version = 0
        self.tracker = None
        if online.enabled:
            if bundle.prior_corrected:
                raise ParameterError("online tracking needs an adapted (not prior-corrected) model's posteriors")
            self.tracker = OnlinePriorTracker(self.class_names, bundle.source, bundle.calibration,
                                              window_images=online.window_images,
                                              pixels_per_image=online.pixels_per_image,
                                              update_every=online.update_every, min_images=online.min_images,
                                              seed=online.seed)
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------- priors
    def _named_prior(self, prior: ClassPrior | str) -> tuple[str, ClassPrior]:
        """(name, prior) of a ClassPrior or of the name of one of the bundle's priors; ``ValueError`` for a name the
        bundle lacks or a prior over other classes."""
        if isinstance(prior, str):
            if prior not in self.bundle.priors:
                raise ValueError(f"the bundle holds no prior {prior!r}; it holds {sorted(self.bundle.priors)}")
            name, prior = prior, self.bundle.priors[prior]
        else:
            name = f"custom: {prior.describe()}"
        check_compatible(prior, self.bundle.source.of_kind(prior.kind))
        return name, prior

    def set_target_prior(self, prior: ClassPrior | str) -> None:
        """Use ``prior`` (a ClassPrior, or the name of one of the bundle's priors) for ``adjust=ia`` from the next
        batch on. A prior over other classes raises ``ValueError``."""
        named = self._named_prior(prior)
        with self._lock:
            self.target_name, self.target_prior = named
            self.version += 1

    def reconfigure(self, user_config: dict[str, Any] | None) -> None:
        """Serve's ``user_config`` (:class:`PriorUserConfig`), laid over the bundle's own settings (the sweep
        overrides included): a key it leaves out serves the bundle's value. So an empty ``user_config`` serves the
        bundle and its overrides as they are, and a key removed from it undoes that key's swap. It replaces a
        prior set by ``PUT /v1/priors``. One new :attr:`version` per call."""
        update = PriorUserConfig.model_validate(user_config or {})
        target = update.target_prior if update.target_prior is not None else self.bundle.target_prior_name
        named = self._named_prior(target if isinstance(target, str) else ClassPrior.from_dict(target))
        changes = {} if update.adjust is None else update.adjust.model_dump(exclude_none=True)
        adjust = AdjustConfig.model_validate({**self.bundle.adjust.model_dump(), **changes})
        with self._lock:
            (self.target_name, self.target_prior), self.adjust = named, adjust
            self.version += 1

    def priors_document(self) -> dict[str, Any]:
        """What ``GET /v1/priors`` answers."""
        with self._lock:
            document = {"version": self.version, "target_name": self.target_name,
                        "target": self.target_prior.to_dict(), "adjust": self.adjust.model_dump(mode="json")}
        source = self.bundle.source
        return {**document, "prior_corrected": self.bundle.prior_corrected, "default_adjust": self.default_adjust,
                "source": {"pixel": source.pixel.to_dict(), "image": source.image.to_dict()},
                "available": sorted(self.bundle.priors),
                "online": None if self.tracker is None else self.tracker.state().to_dict()}

    # ------------------------------------------------------------------------------------- requests
    def check_options(self, options: SegmentOptions) -> None:
        """Raise :class:`ParameterError` (HTTP 422) for settings this model cannot honour."""
        if options.adjust != "none" and self.bundle.prior_corrected:
            raise ParameterError(f"adjust={options.adjust} would correct twice: the model "
                                 f"({self.bundle.model_stage}) is already prior-corrected; use adjust=none")
        if options.adjust == "online" and self.tracker is None:
            raise ParameterError("adjust=online needs online prior tracking (online.enabled in the server settings)")
        local = options.adjust == "local" or (options.adjust != "none" and self.adjust.mode == "local")
        if local and self.target_prior.kind != "pixel":
            raise ParameterError(f"adjust=local (or adjust.mode: local) shrinks each image's prior toward a pixel "
                                 f"prior; the target prior {self.target_name!r} is an {self.target_prior.kind} prior")
        calibration = self.bundle.calibration
        if local and self.adjust.local.presence and (calibration is None or calibration.presence is None):
            from labelshift.image_presence import MISSING_MODEL

            raise ParameterError(f"adjust=local: {MISSING_MODEL}")

    def _transform(self, options: SegmentOptions, adjust: AdjustConfig, target: tuple[str, ClassPrior]
                   ) -> tuple[Callable[[torch.Tensor], torch.Tensor] | None, str | None]:
        if options.adjust == "none":
            return None, None
        name, prior = target
        if options.adjust == "online":
            tracked = self.tracker.prior if self.tracker is not None else None
            name, prior = (f"{name} (online warming up)", prior) if tracked is None else ("online", tracked)
        changes = {key: value for key in ("temperature", "tau_source", "tau_target")
                   if (value := getattr(options, key)) is not None}
        if options.adjust == "local":  # the bundle's (or the sweep overrides') adjust.local settings
            changes["mode"] = "local"
        settings = adjust.model_copy(update=changes) if changes else adjust
        if settings.mode == "local":  # adjust=local, or ia/online under a sweep's adjust.mode: local
            name = f"local, toward {name}"
        return ia_transform(settings, self.bundle.source, prior, self.bundle.calibration), name

    def image_tensor(self, image: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 RGB -> (3, h, w) float32 at the model input, normalised (the evaluation transform)."""
        return self.transform(image, None, None)[0]

    def segment(self, images: list[np.ndarray], options: list[SegmentOptions]) -> list[Segmentation]:
        """Masks of ``images`` ((H, W, 3) uint8 RGB, any sizes) in one forward pass: the images are resized to
        the model input, the logits upsampled back to each image's own size."""
        for option in options:
            self.check_options(option)
        with self._lock:
            adjust, target = self.adjust, (self.target_name, self.target_prior)
        sizes = [tuple(image.shape[:2]) for image in images]
        output_size = (max(h for h, _ in sizes), max(w for _, w in sizes))
        batch = torch.stack([self.image_tensor(image) for image in images])
        logits = predict(self.model, batch, output_size, device=self.device,
                         row_sizes=sizes if len(set(sizes)) > 1 else None)
        answers = []
        for row, ((height, width), option) in enumerate(zip(sizes, options)):
            row_logits = logits[row:row + 1, :, :height, :width]
            transform, prior_name = self._transform(option, adjust, target)
            image_prior = None
            if isinstance(transform, LocalIA):  # estimate the image's prior once, report it with the mask
                priors = transform.image_priors(row_logits)
                adjusted, image_prior = transform.apply(row_logits, priors), priors.record(0)
            else:
                adjusted = row_logits if transform is None else transform(row_logits)
            answers.append(Segmentation(adjusted.argmax(1)[0].to(torch.uint8).cpu().numpy(), option.adjust,
                                        prior_name, image_prior))
        if self.tracker is not None:
            for row, (height, width) in enumerate(sizes):
                self.tracker.observe(logits[row:row + 1, :, :height, :width])
        return answers

    def check_health(self) -> None:
        """Run the model on a tiny image; raises when the model does not answer with finite logits."""
        probe = np.zeros((*HEALTH_PROBE_SIZE, 3), dtype=np.uint8)
        logits = predict(self.model, self.image_tensor(probe)[None], HEALTH_PROBE_SIZE, device=self.device)
        if logits.shape != (1, len(self.class_names), *HEALTH_PROBE_SIZE) or not torch.isfinite(logits).all():
            raise RuntimeError(f"the model answered logits of shape {tuple(logits.shape)} (finite: "
                               f"{bool(torch.isfinite(logits).all())})")
