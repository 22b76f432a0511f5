"""Typed experiment configuration: pydantic v2 sections (unknown keys rejected, ``sections``), loading YAML files
with overrides (``loading``), sweep settings (``sweep``).

``load_config(path, overrides=["train.source.iterations=100"])`` returns an :class:`ExperimentConfig`.
Only builders read configs; library constructors take explicit arguments.
"""
from labelshift.config.base import ConfigError, PositiveFloat, PositiveInt, StrictModel
from labelshift.config.loading import (EXTENDS_KEY, MOVED_KEYS, absolute_paths, apply_overrides, config_from_dict,
                                       dump_config, flatten, load_config, read_config_file)
from labelshift.config.sections import (PIPELINE_STAGES, AdjustConfig, DataConfig, DatasetConfig, DistillConfig,
                                        EvalConfig, ExperimentConfig, ModelConfig, OptimConfig, PipelineStage,
                                        PriorConfig, PseudoConfig, RayConfig, RefineConfig, RuntimeConfig,
                                        TrackingConfig, TrainConfig, TransformConfig, WorldConfig)

__all__ = [
    "AdjustConfig", "ConfigError", "DataConfig", "DatasetConfig", "DistillConfig", "EXTENDS_KEY", "EvalConfig",
    "ExperimentConfig", "MOVED_KEYS", "ModelConfig", "OptimConfig", "PIPELINE_STAGES", "PipelineStage",
    "PositiveFloat", "PositiveInt", "PriorConfig", "PseudoConfig", "RayConfig", "RefineConfig", "RuntimeConfig",
    "StrictModel", "TrackingConfig", "TrainConfig", "TransformConfig", "WorldConfig", "absolute_paths",
    "apply_overrides", "config_from_dict", "dump_config", "flatten", "load_config", "read_config_file",
]
