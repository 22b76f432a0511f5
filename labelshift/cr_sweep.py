"""The library side of a Classifier Refinement sweep: a trial's training payload, and a training context that
adds the selection split's mIoU to every report that carries a checkpoint (what Ray Tune's ASHA compares).

Each CR trial trains the head exactly as the job's ``refine`` stage does (``labelshift.train.stages``, the
logit-adjusted loss with ``train.refine.tau``), checkpointing every ``report_every`` steps; rank 0 then loads
the checkpoint's weights into an evaluation copy of the model and scores the labelled ``data.target_select``
split. Ray glue: :mod:`labelshift.runners.tune`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from labelshift.build import amp_dtype_of, build_model, class_set_of, eval_loader
from labelshift.config import ExperimentConfig, config_from_dict
from labelshift.ia_sweep import EstimateOutputs
from labelshift.inference import evaluate
from labelshift.config.sweep import SELECT_METRIC, with_setting
from labelshift.train.context import CHECKPOINT_STATE, TrainContext

SELECT_SPLIT = "target_select"


def cr_payload(config_json: dict, setting: dict[str, Any], estimates: EstimateOutputs, adapted_model: str | Path,
               report_every: int) -> dict:
    """The refine stage's payload for one trial: the setting applied to the config, checkpoints (and reports)
    every ``report_every`` steps, the adapted model and the source/target priors the setting asks for."""
    raw = with_setting(config_json, {**setting, "train.refine.checkpoint_every": report_every,
                                     "train.refine.log_every": report_every})
    cfg = config_from_dict(raw, "<sweep setting>")
    target = estimates.target(cfg)
    source = estimates.source().of_kind(target.kind)
    return {"stage": "refine", "config": cfg.model_dump(mode="json"), "init_checkpoint": str(adapted_model),
            "source_prior": source.to_dict(), "target_prior": target.to_dict()}


def selection_miou(model: nn.Module, cfg: ExperimentConfig, device: torch.device, split: str = SELECT_SPLIT) -> float:
    """mIoU (percent) of ``model`` on a labelled split of ``cfg`` (the full evaluation path, no IA)."""
    matrix = evaluate(model, eval_loader(cfg, split), class_set_of(cfg).num_classes, device=device,
                      flip=cfg.eval.flip, scales=cfg.eval.scales, amp_dtype=amp_dtype_of(cfg, device))["none"]
    return 100.0 * matrix.miou()


class SelectionReporting(TrainContext):
    """Wraps a training context: a report that carries a checkpoint (rank 0's) also carries ``select_miou``, the
    mIoU of that checkpoint's weights on the selection split. Everything else is the wrapped context's."""

    def __init__(self, inner: TrainContext, score_state: Callable[[dict], float]) -> None:
        self.inner = inner
        self.score_state = score_state
        self.rank, self.world_size, self.device = inner.rank, inner.world_size, inner.device

    def wrap_model(self, model: nn.Module) -> nn.Module:
        return self.inner.wrap_model(model)

    def describe(self) -> dict:
        return self.inner.describe()

    def latest_checkpoint(self) -> Path | None:
        return self.inner.latest_checkpoint()

    def release_checkpoint(self) -> None:
        self.inner.release_checkpoint()

    def report(self, metrics: dict, checkpoint_dir: str | None = None) -> None:
        if checkpoint_dir is not None and self.is_main:
            state = torch.load(Path(checkpoint_dir) / CHECKPOINT_STATE, map_location="cpu", weights_only=True)
            metrics = {**metrics, SELECT_METRIC: self.score_state(state["model"])}
        self.inner.report(metrics, checkpoint_dir)


def checkpoint_scorer(payload: dict, device: torch.device) -> Callable[[dict], float]:
    """``score(state_dict) -> select mIoU``: an evaluation copy of the adapted model takes each state in turn."""
    cfg = config_from_dict(payload["config"])
    model = build_model(cfg, payload["init_checkpoint"]).to(device).eval()

    def score(state: dict) -> float:
        model.load_state_dict(state)
        return selection_miou(model, cfg, device)

    return score
