"""A whole sweep, as ``ray_jobs/sweep.py`` runs it after the estimate stage: trials on Ray Tune, the labelled
choice on ``data.target_select``, its target-val mIoU evaluated once, the label-free choices and their regret,
and the exported files (:mod:`labelshift.sweep_report`). Ray is imported lazily (through
:mod:`labelshift.runners.tune`).
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from labelshift.build import amp_dtype_of, build_model, class_set_of, eval_loader
from labelshift.config import ConfigError, ExperimentConfig
from labelshift.ia_sweep import (LABEL_FREE_PREFIX, REFERENCE_SETTING, EstimateOutputs, build_inputs, choose_setting,
                                 record_index_of, score_setting)
from labelshift.logit_cache import LogitCache, build_logit_cache
from labelshift.runners.tune import TrackingLink, run_cr_trials, run_ia_trials, sweep_storage
from labelshift.selection import best_index, regret_table
from labelshift.sweep_report import write_sweep_outputs
from labelshift.config.sweep import LABEL_FREE_OBJECTIVES, SELECT_METRIC, SweepConfig

SELECT_SPLIT, EVAL_SPLIT = "target_select", "target_val"
VAL_METRIC = "target_val_miou"


@dataclass
class SweepOutcome:
    records: list[dict]
    summary: dict
    files: list[Path]


def cache_of(cfg: ExperimentConfig, model: torch.nn.Module, split: str, device: torch.device) -> LogitCache:
    """The logit cache of a labelled split of ``cfg``."""
    return build_logit_cache(model, eval_loader(cfg, split), class_set_of(cfg).num_classes, device=device,
                             flip=cfg.eval.flip, scales=cfg.eval.scales, amp_dtype=amp_dtype_of(cfg, device))


def _check_selection_split(cfg: ExperimentConfig) -> None:
    if cfg.data.target_select is None:
        raise ConfigError("a sweep selects on data.target_select (a labelled held-out subset of target train; "
                          "configs/sweep_ia.yaml shows the embedded world's): set it")
    select, val = cfg.data.target_select, cfg.data.target_val
    if (select.root, select.split or "train", select.list_file) == (val.root, val.split or "train", val.list_file):
        raise ConfigError("data.target_select is the evaluation split data.target_val: sweeps never select on it")


def _run_name(cfg: ExperimentConfig, space: str) -> str:
    return f"{cfg.name}-{space}-{time.strftime('%Y%m%d-%H%M%S')}"


def run_ia_sweep(cfg: ExperimentConfig, model_path: str | Path, estimate_dir: str | Path, *,
                 device: torch.device = torch.device("cpu"), tracking: TrackingLink | None = None,
                 log: Callable[[str], None] = print) -> SweepOutcome:
    """The IA sweep: cache the selection split, run the trials, choose, evaluate the choices on target val once
    each (from a target-val logit cache), write the outputs under ``<output_dir>/sweeps/ia``."""
    _check_selection_split(cfg)
    estimates = EstimateOutputs.read(estimate_dir)
    model = build_model(cfg, model_path).to(device).eval()
    began = time.perf_counter()
    inputs = build_inputs(cfg, estimates, cache_of(cfg, model, SELECT_SPLIT, device))
    log(f"[sweep ia] cached {len(inputs.cache)} selection images ({inputs.cache.nbytes() / 2**20:.1f} MiB) in "
        f"{time.perf_counter() - began:.1f}s; {cfg.sweep.ia.grid_size()} trials")
    records = run_ia_trials(inputs, cfg.sweep.ia, storage_path=sweep_storage(cfg), name=_run_name(cfg, "ia"),
                            seed=cfg.sweep.seed, tracking=tracking)
    summary = ia_summary(inputs, records, cache_of(cfg, model, EVAL_SPLIT, device), cfg.sweep)
    files = write_sweep_outputs(Path(cfg.output_dir) / "sweeps" / "ia", cfg, records, summary)
    return SweepOutcome(records, summary, files)


def ia_summary(inputs, records: list[dict], val_cache: LogitCache, sweep: SweepConfig) -> dict:
    """The choice (``sweep.selection``: the top trial, guarded against the fallback setting), the top trial, the
    label-free choice of each objective with its regret against the choice, the reference setting (T = τ = 1,
    ``reference`` estimator); target-val mIoU of each of these settings, computed once each."""
    val_of: dict[str, float] = {}

    def val_miou(setting: dict) -> float:
        key = repr(sorted(setting.items()))
        if key not in val_of:
            val_of[key] = score_setting(inputs, setting, cache=val_cache, label_free=False)[SELECT_METRIC]
        return val_of[key]

    choice = choose_setting(inputs, records, sweep.selection, sweep.label_free_objective, sweep.seed)
    rows = [{SELECT_METRIC: r["metrics"][SELECT_METRIC], VAL_METRIC: float("nan"),
             **{name: r["metrics"].get(LABEL_FREE_PREFIX + name, float("nan")) for name in LABEL_FREE_OBJECTIVES}}
            for r in records]
    for name in LABEL_FREE_OBJECTIVES:
        pick = best_index([row[name] for row in rows])
        rows[pick][VAL_METRIC] = val_miou(records[pick]["setting"])
    chosen_index = record_index_of(inputs, records, choice["setting"])
    if chosen_index is None:  # a fallback no trial ran: a row of its own, never a label-free pick
        chosen_index = len(rows)
        rows.append(dict.fromkeys((SELECT_METRIC, *LABEL_FREE_OBJECTIVES), float("nan")))
    rows[chosen_index][VAL_METRIC] = val_miou(choice["setting"])
    label_free = regret_table(rows, SELECT_METRIC, LABEL_FREE_OBJECTIVES, VAL_METRIC, chosen=chosen_index)
    for name, row in label_free.items():
        row.update(setting=records[row["trial"]]["setting"], trial=records[row["trial"]]["trial"])
    reference = {**REFERENCE_SETTING, **{k: v for k, v in choice["setting"].items() if k not in REFERENCE_SETTING}}
    return {
        "space": "ia", "trials": len(records), "selection_split": SELECT_SPLIT, "uses_target_labels": True,
        "evaluation_split": EVAL_SPLIT, "label_free_objective": sweep.label_free_objective,
        "chosen": {"setting": choice["setting"], "select_miou": choice["select_miou"],
                   VAL_METRIC: rows[chosen_index][VAL_METRIC], "guard": choice["guard"]},
        "top": {**choice["top"], VAL_METRIC: val_miou(choice["top"]["setting"])},
        "reference": {"setting": reference, "select_miou": score_setting(inputs, reference, label_free=False)[
            SELECT_METRIC], VAL_METRIC: val_miou(reference)},
        "label_free": label_free,
    }


def run_cr_sweep(cfg: ExperimentConfig, model_path: str | Path, estimate_dir: str | Path, *,
                 device: torch.device = torch.device("cpu"), tracking: TrackingLink | None = None,
                 log: Callable[[str], None] = print) -> SweepOutcome:
    """The CR sweep on Ray Train: trials with ASHA, the chosen trial's final model evaluated on target val once."""
    from labelshift.cr_sweep import cr_payload, selection_miou
    from labelshift.train.loop import FINAL_MODEL

    _check_selection_split(cfg)
    space = cfg.sweep.cr
    make_payload = functools.partial(cr_payload, cfg.model_dump(mode="json"),
                                     estimates=EstimateOutputs.read(estimate_dir), adapted_model=str(model_path),
                                     report_every=space.report_every)
    log(f"[sweep cr] {space.grid_size()} trials on Ray Train, ASHA over the selection mIoU every "
        f"{space.report_every} steps")
    records = run_cr_trials(make_payload, space, cfg.ray, storage_path=sweep_storage(cfg),
                            name=_run_name(cfg, "cr"), seed=cfg.sweep.seed, tracking=tracking)
    chosen = records[best_index([r["metrics"].get(SELECT_METRIC, float("nan")) for r in records])]
    final_model = Path(chosen["metrics"]["checkpoint_path"]) / FINAL_MODEL
    val = None
    if final_model.is_file():  # a trial ASHA stopped has no final model
        val = selection_miou(build_model(cfg, final_model).to(device).eval(), cfg, device, EVAL_SPLIT)
    summary = {"space": "cr", "trials": len(records), "selection_split": SELECT_SPLIT, "uses_target_labels": True,
               "evaluation_split": EVAL_SPLIT,
               "chosen": {"trial": chosen["trial"], "setting": chosen["setting"], "model": str(final_model),
                          "steps": chosen["metrics"].get("step"), "select_miou": chosen["metrics"][SELECT_METRIC],
                          VAL_METRIC: val}}
    files = write_sweep_outputs(Path(cfg.output_dir) / "sweeps" / "cr", cfg, records, summary)
    return SweepOutcome(records, summary, files)
