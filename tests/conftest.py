"""Shared fixtures: a tiny embedded world and the overrides that make the demo config tiny."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

PROJECT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = PROJECT / "configs" / "demo.yaml"


def tiny_overrides(out: Path, *, iterations: int = 4, world_size: str = "[64,32]", batch: int = 4) -> list[str]:
    """Overrides of configs/demo.yaml: a world of a few 64x32 images under ``out`` and a few training steps."""
    world = out / "world"
    steps = []
    for stage in ("source", "refine", "distill"):
        steps += [f"train.{stage}.iterations={iterations}", f"train.{stage}.batch_size={batch}",
                  f"train.{stage}.checkpoint_every=2", f"train.{stage}.log_every=1"]
    return [f"output_dir={out}", f"data.source.root={world}/gta5", f"data.source_val.root={world}/gta5",
            f"data.target.root={world}/cityscapes", f"data.target_val.root={world}/cityscapes",
            "data.world.num_source=40", "data.world.num_target_train=16", "data.world.num_target_val=8",
            f"data.world.size={world_size}", f"data.source_transform.size={world_size}",
            f"data.target_transform.size={world_size}", "prior.bootstrap=3", "prior.em_sample_pixels=2000",
            f"tracking.tracking_uri=sqlite:///{out}/mlflow.db", "pseudo.confidence_threshold=0.0", *steps]


@pytest.fixture(autouse=True)
def _seeded_global_rngs():
    """Every test starts from the same global torch/numpy random state: no test passes or fails by luck."""
    import numpy as np
    import torch

    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture
def tiny_cfg(tmp_path):
    from labelshift.config import load_config

    def make(*extra: str, out: Path | None = None, **kwargs):
        return load_config(DEMO_CONFIG, tiny_overrides(out or tmp_path / "run", **kwargs) + list(extra))

    return make
