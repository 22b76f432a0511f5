"""The model bundle: one directory holding everything needed to serve a segmenter, written by the main job's
``export`` stage and read by the HTTP server (``serve/``).

Layout of a bundle directory::

    bundle.json         format, model file + sha256, class names, model input size and normalisation, whether
                        the model is already prior-corrected (CR / self-distilled) or not (adapted), the name of
                        the default target prior, the IA settings (``adjust``)
    model.safetensors   the weights (a hard link to the stage's model when the filesystem allows, else a copy)
    priors/             the source priors and every target estimate, with the estimate stage's index priors.json
    calibration.json    the calibration fitted on source val (the space of the EM estimates)
    config.json         the resolved experiment configuration

:func:`apply_overrides_file` applies the overrides file a Tune sweep exports (``adjust.*``, ``prior.method``):
the IA settings and which estimate is the target prior; settings that would need a new estimate or new weights
are refused with the keys named.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping

import torch
import yaml
from torch import nn

from labelshift.artifacts import (CALIBRATION_FILE, SOURCE_CALIBRATED, TARGET, estimate_name, read_priors,
                                  source_prior_name, source_priors_from, write_priors)
from labelshift.atomic import write_json_atomic
from labelshift.calibrate import Calibration
from labelshift.config import (AdjustConfig, ConfigError, ExperimentConfig, apply_overrides, config_from_dict,
                               dump_config)
from labelshift.models import checkpoint_sha256
from labelshift.priors import ClassPrior, SourcePriors

BUNDLE_FILE = "bundle.json"
BUNDLE_FORMAT = "labelshift.bundle/1"
MODEL_FILE = "model.safetensors"
PRIORS_DIR = "priors"
CONFIG_FILE = "config.json"
SERVABLE_OVERRIDES = ("adjust.", "prior.method")  # what a bundle can honour without new weights or estimates


class BundleError(ValueError):
    """A bundle directory that is missing, malformed, or whose weights do not match their recorded sha256."""


def _bundle_priors(priors: Mapping[str, ClassPrior]) -> dict[str, ClassPrior]:
    """The priors a bundle carries: source priors, the target and every estimate (no oracle: target labels)."""
    wanted = (source_prior_name("pixel"), source_prior_name("image"), SOURCE_CALIBRATED, TARGET)
    return {name: prior for name, prior in priors.items()
            if name in wanted or name.startswith(estimate_name(""))}


def _link_or_copy(source: Path, destination: Path) -> None:
    try:
        os.link(source, destination)
    except OSError:  # another filesystem, or links not allowed
        shutil.copyfile(source, destination)


def export_bundle(directory: str | Path, *, model_path: str | Path, cfg: ExperimentConfig,
                  priors: Mapping[str, ClassPrior], calibration: Calibration, prior_corrected: bool,
                  model_stage: str, model_sha256: str | None = None) -> list[str]:
    """Write a bundle into ``directory`` (created; written inside a stage's partial directory, so the stage's
    commit makes it appear at once). ``priors``: the estimate stage's priors by name (``TARGET`` among them).
    Returns the files written, relative to ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if TARGET not in priors:
        raise BundleError(f"the priors to bundle lack the target prior {TARGET!r}: {sorted(priors)}")
    _link_or_copy(Path(model_path), directory / MODEL_FILE)
    prior_files = write_priors(directory / PRIORS_DIR, _bundle_priors(priors))
    write_json_atomic(directory / CALIBRATION_FILE, calibration.to_dict())
    write_json_atomic(directory / CONFIG_FILE, dump_config(cfg))
    transform = cfg.data.target_transform
    write_json_atomic(directory / BUNDLE_FILE, {
        "format": BUNDLE_FORMAT,
        "model": {"file": MODEL_FILE, "sha256": model_sha256 or checkpoint_sha256(model_path),
                  "name": cfg.model.name, "stage": model_stage},
        "classes": list(priors[TARGET].classes), "class_set": cfg.data.class_set,
        "input_size": list(transform.size), "mean": list(cfg.data.mean), "std": list(cfg.data.std),
        "prior_corrected": prior_corrected, "target_prior": TARGET, "adjust": cfg.adjust.model_dump(mode="json"),
        "priors": f"{PRIORS_DIR}/", "calibration": CALIBRATION_FILE, "config": CONFIG_FILE})
    return [MODEL_FILE, *[f"{PRIORS_DIR}/{name}" for name in prior_files], CALIBRATION_FILE, CONFIG_FILE,
            BUNDLE_FILE]


@dataclass(frozen=True)
class ModelBundle:
    """A loaded bundle. ``priors`` by name (``target_prior_name`` is the default target); ``adjust`` the IA
    settings; ``input_size`` (width, height) the model input; ``prior_corrected``: the raw logits already
    answer for a target prior (CR / self-distillation), so IA on top would correct twice."""

    directory: Path
    classes: tuple[str, ...]
    class_set: str
    model_name: str
    model_stage: str
    model_sha256: str
    input_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    prior_corrected: bool
    priors: dict[str, ClassPrior]
    target_prior_name: str
    calibration: Calibration
    adjust: AdjustConfig
    config: ExperimentConfig

    @property
    def model_path(self) -> Path:
        return self.directory / MODEL_FILE

    @property
    def source(self) -> SourcePriors:
        """The source priors IA pairs a target prior with."""
        return source_priors_from(self.priors)

    @property
    def target_prior(self) -> ClassPrior:
        return self.priors[self.target_prior_name]

    def build_model(self, device: torch.device | str = "cpu") -> nn.Module:
        """The model with the bundle's weights (sha256 checked first), in eval mode on ``device``."""
        from labelshift.build import build_model

        actual = checkpoint_sha256(self.model_path)
        if actual != self.model_sha256:
            raise BundleError(f"{self.model_path}: sha256 {actual} differs from the bundle's {self.model_sha256}")
        return build_model(self.config, self.model_path).to(device).eval()


def load_bundle(directory: str | Path) -> ModelBundle:
    """Read a bundle directory written by :func:`export_bundle`; errors name the file and what is wrong."""
    directory = Path(directory)
    index_path = directory / BUNDLE_FILE
    if not index_path.is_file():
        raise BundleError(f"{directory} is not a model bundle: {BUNDLE_FILE} is missing (the main job's export "
                          "stage writes bundles under <output_dir>/stages/export/)")
    try:
        index = json.loads(index_path.read_text())
        if index.get("format") != BUNDLE_FORMAT:
            raise BundleError(f"{index_path}: format {index.get('format')!r}, expected {BUNDLE_FORMAT!r}")
        priors = read_priors(directory / index["priors"])
        calibration = Calibration.from_dict(json.loads((directory / index["calibration"]).read_text()))
        config = config_from_dict(json.loads((directory / index["config"]).read_text()), str(directory / CONFIG_FILE))
        model = index["model"]
        bundle = ModelBundle(
            directory, tuple(index["classes"]), index["class_set"], model["name"], model["stage"], model["sha256"],
            tuple(index["input_size"]), tuple(index["mean"]), tuple(index["std"]), bool(index["prior_corrected"]),
            priors, index["target_prior"], calibration, AdjustConfig.model_validate(index["adjust"]), config)
    except (OSError, KeyError, TypeError, ValueError) as error:
        if isinstance(error, BundleError):
            raise
        raise BundleError(f"{directory}: unreadable bundle ({type(error).__name__}: {error})") from None
    if bundle.target_prior_name not in priors or bundle.target_prior.classes != bundle.classes:
        raise BundleError(f"{index_path}: target prior {bundle.target_prior_name!r} missing or over other classes")
    return bundle


def read_overrides_file(path: str | Path) -> list[str]:
    """``section.key=value`` strings from a YAML overrides file: a list of such strings, or a mapping (nested
    sections or dotted keys) of values."""
    path = Path(path)
    if not path.is_file():
        raise BundleError(f"overrides file {path} does not exist")
    raw = yaml.safe_load(path.read_text())
    if isinstance(raw, list) and all(isinstance(item, str) for item in raw):
        return raw
    if not isinstance(raw, dict):
        raise BundleError(f"overrides file {path}: expected a list of 'key=value' strings or a mapping")

    def flat(node: Mapping, prefix: str) -> list[str]:
        items = []
        for key, value in node.items():
            items += flat(value, f"{prefix}{key}.") if isinstance(value, Mapping) else \
                [f"{prefix}{key}={json.dumps(value)}"]
        return items

    return flat(raw, "")


def apply_overrides_file(bundle: ModelBundle, path: str | Path) -> ModelBundle:
    """The bundle with a sweep's exported overrides applied: ``adjust.*`` (IA settings) and ``prior.method``
    (the estimate ``estimate_<method>`` becomes the default target prior). Other keys raise
    :class:`BundleError` naming them (they need a new estimate or new weights: re-run the job)."""
    overrides = read_overrides_file(path)
    refused = [item for item in overrides if not item.split("=", 1)[0].strip().startswith(SERVABLE_OVERRIDES)]
    if refused:
        raise BundleError(f"overrides file {path}: a bundle can only take {list(SERVABLE_OVERRIDES)} settings; "
                          f"{refused} need a new estimate or new weights (re-run the job with them)")
    raw = dump_config(bundle.config)
    try:
        config = config_from_dict(apply_overrides(raw, overrides, str(path)), str(path), overrides)
    except ConfigError as error:
        raise BundleError(str(error)) from None
    target_name = bundle.target_prior_name
    if any(item.startswith("prior.method") for item in overrides):
        target_name = estimate_name(config.prior.method)
        if target_name not in bundle.priors:
            raise BundleError(f"overrides file {path}: the bundle holds no {target_name!r} prior "
                              f"(it holds {sorted(bundle.priors)})")
    return replace(bundle, config=config, adjust=config.adjust, target_prior_name=target_name)
