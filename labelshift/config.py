"""Typed experiment configuration: pydantic v2 models (unknown keys rejected), YAML files, overrides.

``load_config(path, overrides=["train.source.iterations=100"])`` returns an :class:`ExperimentConfig`.
Only builders read configs; library constructors take explicit arguments.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False, validate_assignment=True)


class WorldConfig(_Strict):
    """The embedded synthetic world (``labelshift.data.world.generate_world``; knobs in docs/world.md).

    Knobs left unset (None) take the generator's defaults (``WorldKnobs``, docs/world.md).
    """

    seed: int = 0
    size: tuple[int, int] | None = None  # (width, height)
    num_source: int | None = None
    num_target_train: int | None = None
    num_target_val: int | None = None
    source_val_fraction: float | None = Field(None, gt=0.0, lt=1.0)
    presence_floor: float | None = None
    label_shift: float | None = None
    class_separation: float | None = None
    instance_color_std: float | None = None
    pixel_noise_std: float | None = None
    target_instance_color_std: float | None = None
    target_color_cast: float | None = None
    target_blur_sigma: float | None = None
    target_extra_noise_std: float | None = None


class DatasetConfig(_Strict):
    """One dataset on disk in its real layout."""

    kind: Literal["gta5", "synthia", "cityscapes"]
    root: str
    split: str | None = None  # cityscapes: train|val; gta5/synthia: optional list file of stems
    list_file: str | None = None


class TransformConfig(_Strict):
    """Images are resized to ``size``; training adds random scale, crop, flip and colour jitter."""

    size: tuple[int, int]  # (width, height) the model sees
    crop_size: tuple[int, int] | None = None  # (width, height) random crop for training
    scale_range: tuple[float, float] = (1.0, 1.0)
    flip: bool = True
    color_jitter: float = 0.0


class DataConfig(_Strict):
    source: DatasetConfig
    target: DatasetConfig
    source_val: DatasetConfig | None = None  # labelled source split for calibration / BBSE / model selection
    target_val: DatasetConfig
    world: WorldConfig | None = None  # set: generate the embedded world under ``source.root``'s parent
    class_set: Literal["cityscapes19", "synthia16"] = "cityscapes19"
    source_transform: TransformConfig | None = None  # default: resize to 1280x720 (GTA5 in the reference)
    target_transform: TransformConfig | None = None  # default: resize to 1024x512 (Cityscapes in the reference)
    num_workers: int = 0
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    @model_validator(mode="after")
    def _default_transforms(self) -> "DataConfig":
        if self.source_transform is None:
            self.source_transform = TransformConfig(size=(1280, 720))
        if self.target_transform is None:
            self.target_transform = TransformConfig(size=(1024, 512))
        return self


class ModelConfig(_Strict):
    name: str = "small"
    frozen_bn: bool = False
    pretrained: str | None = None  # None | "imagenet" (torchvision weights) | path to a backbone file
    checkpoint: str | None = None  # adapted model to start from (reference/FADA format or ours)
    width: int = 32  # small model only


class OptimConfig(_Strict):
    optimizer: Literal["sgd", "adam"] = "sgd"  # the reference recipe is SGD; adam trains the small CPU model faster
    iterations: int = 1000
    batch_size: int = 8  # global batch, split across workers
    lr: float = 2.5e-4  # backbone LR; the head trains at ``head_lr_mult`` times it (reference: 10)
    head_lr_mult: float = 10.0
    momentum: float = 0.9  # SGD only
    weight_decay: float = 5e-4
    poly_power: float = 0.9
    checkpoint_every: int = 200
    log_every: int = 50
    seed: int = 0
    amp_bf16: bool = True  # bf16 autocast + channels_last when training on CUDA


class DistillConfig(OptimConfig):
    init: Literal["fresh", "adapted"] = "fresh"
    confidence_threshold: float = Field(0.0, ge=0.0, lt=1.0)
    sync_bn: bool = False


class TrainConfig(_Strict):
    source: OptimConfig = OptimConfig()
    refine: OptimConfig = OptimConfig(iterations=40000, lr=2.5e-4)
    distill: DistillConfig = DistillConfig(iterations=20000, lr=5e-4)


class AdjustConfig(_Strict):
    """Inference Adjustment: z' = z / T − τ_s·log π_s + τ_t·log π_t.

    ``space``: ``raw`` adjusts the raw logits against the exact source prior of the target prior's kind (the
    paper's IA); ``calibrated`` adjusts pixel priors in the calibration's space, z/T + b − log π_cal + log π_t
    (exact under pure label shift, but the calibration is fitted on source val and need not transfer across an
    appearance shift).
    """

    space: Literal["raw", "calibrated"] = "raw"
    temperature: float = Field(1.0, gt=0)
    tau_source: float = 1.0
    tau_target: float = 1.0


class PriorConfig(_Strict):
    method: Literal["reference", "count", "soft_count", "presence", "em", "bbse"] = "em"
    kind: Literal["pixel", "image"] = "pixel"
    calibration: Literal["none", "temperature", "bcts"] = "bcts"
    source_prior: str | None = None  # preset name or JSON path; None: exact statistics of the source split
    target_prior: str | None = None  # preset name or JSON path; None: estimate
    em_sample_pixels: int = 200_000
    presence_threshold: float = 0.001
    bootstrap: int = 100
    oracle: bool = True  # measure estimates against target-train labels when they exist (never used to train)
    max_images: int | None = None


class RayConfig(_Strict):
    address: str | None = None  # None: local ray.init() (or RAY_ADDRESS inside a job)
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 1
    storage_path: str | None = None  # default: <output_dir>/ray


class TrackingConfig(_Strict):
    tracking_uri: str | None = None  # default: MLFLOW_TRACKING_URI or sqlite:///<project>/mlflow.db
    experiment: str = "labelshift"
    enabled: bool = True


class EvalConfig(_Strict):
    batch_size: int = 4
    flip: bool = False
    scales: tuple[float, ...] = (1.0,)
    subset: tuple[str, ...] | None = None  # e.g. the 13 classes of mIoU* for SYNTHIA


class ExperimentConfig(_Strict):
    name: str
    output_dir: str = "outputs/${name}"
    data: DataConfig
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    prior: PriorConfig = PriorConfig()
    adjust: AdjustConfig = AdjustConfig()
    eval: EvalConfig = EvalConfig()
    ray: RayConfig = RayConfig()
    tracking: TrackingConfig = TrackingConfig()
    stages: tuple[str, ...] = ("pretrain", "estimate", "evaluate_adapted", "refine", "evaluate_refined",
                               "pseudo", "distill", "evaluate_distilled")

    @model_validator(mode="after")
    def _expand_output_dir(self) -> "ExperimentConfig":
        if "${name}" in self.output_dir:
            self.output_dir = self.output_dir.replace("${name}", self.name)
        return self


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key, the file and the expectation."""


def _parse_value(text: str) -> Any:
    return yaml.safe_load(text) if text != "" else ""


def apply_overrides(raw: dict, overrides: list[str] | tuple[str, ...], source: str) -> dict:
    """Apply ``section.key=value`` overrides (values parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} (for {source}): expected 'section.key=value'")
        dotted, value = item.split("=", 1)
        keys = dotted.strip().split(".")
        node = raw
        for key in keys[:-1]:
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r} (for {source}): {key!r} is a value, not a section")
            node = child
        node[keys[-1]] = _parse_value(value)
    return raw


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key (not a field of this section)")
        else:
            lines.append(f"  {key}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def config_from_dict(raw: dict, source: str = "<dict>") -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Read a YAML experiment file, apply ``section.key=value`` overrides and validate it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level, got {type(raw).__name__}")
    apply_overrides(raw, overrides, str(path))
    return absolute_paths(config_from_dict(raw, str(path)))


def absolute_paths(cfg: ExperimentConfig, base: Path | None = None) -> ExperimentConfig:
    """Relative filesystem paths resolved against ``base`` (default: the working directory), so that Ray
    workers, whose working directory differs, read and write the same files. List files stay relative to
    their dataset root; preset names and "imagenet" are not paths."""
    base = Path.cwd() if base is None else base
    absolute = lambda value: None if value is None else str((base / value).resolve())  # noqa: E731
    cfg.output_dir = absolute(cfg.output_dir)
    for split in ("source", "source_val", "target", "target_val"):
        dataset = getattr(cfg.data, split)
        if dataset is not None:
            dataset.root = absolute(dataset.root)
    cfg.model.checkpoint = absolute(cfg.model.checkpoint)
    if cfg.model.pretrained not in (None, "imagenet"):
        cfg.model.pretrained = absolute(cfg.model.pretrained)
    cfg.ray.storage_path = absolute(cfg.ray.storage_path)
    return cfg


def dump_config(cfg: ExperimentConfig) -> dict:
    """The resolved configuration as plain JSON-able data."""
    return cfg.model_dump(mode="json")


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a.b": 1}`` (for MLflow params)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat
