"""Ray Tune sweeps (Ray and MLflow imported lazily, inside the functions).

- IA (:func:`run_ia_trials`): a function trainable per setting scores the selection split's logit cache
  (:func:`labelshift.ia_sweep.score_setting`) and reports once with ``tune.report``; the inputs go to the object
  store once (``tune.with_parameters``). Grid, random or Optuna search; no scheduler (a trial has one step).
- CR (:func:`run_cr_trials`): each trial runs the refine stage as a ``TorchTrainer`` whose reports reach Tune
  through ``TuneReportCallback``, with the selection mIoU every ``report_every`` steps; ASHA stops weak trials.

With a :class:`TrackingLink`, ``MLflowLoggerCallback`` logs one MLflow run per trial, nested under the sweep's
parent run (``mlflow.parentRunId``). :func:`run_sweep` is the whole sweep of ``ray_jobs/sweep.py``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from labelshift.config import ExperimentConfig, RayConfig
from labelshift.config.sweep import SELECT_METRIC, SpaceConfig

CR_TRIAL_CPUS = 0.25  # the trial itself only waits for its TorchTrainer, whose workers hold the real CPUs


@dataclass(frozen=True)
class TrackingLink:
    """Where trial runs go: an MLflow store, experiment and the sweep's parent run."""

    tracking_uri: str
    experiment: str
    parent_run_id: str

    def callbacks(self, space_name: str) -> list:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        return [MLflowLoggerCallback(tracking_uri=self.tracking_uri, experiment_name=self.experiment,
                                     tags={"mlflow.parentRunId": self.parent_run_id, "labelshift.sweep": space_name},
                                     save_artifact=False)]


def param_space(space: SpaceConfig) -> dict[str, Any]:
    """Tune's search space, keyed by config path: grid search over values, or choice / (log)uniform."""
    from ray import tune

    params = {}
    for path, spec in space.parameters.items():
        if spec.values is not None:
            params[path] = tune.grid_search(spec.values) if space.search == "grid" else tune.choice(spec.values)
        else:
            params[path] = (tune.loguniform if spec.log else tune.uniform)(spec.low, spec.high)
    return params


def concurrent_trials(space: SpaceConfig, trial_cpus: float, cluster_cpus: float) -> int:
    """``space.max_concurrent_trials``, or (unset) as many trials of ``trial_cpus`` as ``cluster_cpus`` hold, ≥ 1."""
    if space.max_concurrent_trials is not None:
        return space.max_concurrent_trials
    return max(1, int(cluster_cpus // trial_cpus))


def _search_algorithm(space: SpaceConfig, seed: int, max_concurrent: int):
    """Optuna (a ``Searcher``: Tune wraps it in a ``ConcurrencyLimiter`` of ``max_concurrent_trials``), or grid /
    random variants, whose generator takes the limit itself (Tune ignores ``max_concurrent_trials`` for one)."""
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if space.search == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch
            import optuna  # noqa: F401
        except ImportError:
            raise RuntimeError("search: optuna needs Optuna: pip install 'labelshift-seg[tune]'") from None
        return OptunaSearch(metric=SELECT_METRIC, mode="max", seed=seed)
    return BasicVariantGenerator(random_state=seed, max_concurrent=max_concurrent)


def _run_tuner(trainable, space: SpaceConfig, *, trial_cpus: float, storage_path: str, name: str, seed: int,
               tracking: TrackingLink | None, space_name: str, scheduler=None, reuse_actors: bool = False
               ) -> list[dict]:
    import ray
    from ray import tune

    max_concurrent = concurrent_trials(space, trial_cpus, ray.cluster_resources().get("CPU", 1.0))
    search = _search_algorithm(space, seed, max_concurrent)
    limit = max_concurrent if isinstance(search, tune.search.Searcher) else None
    tuner = tune.Tuner(
        trainable, param_space=param_space(space),
        tune_config=tune.TuneConfig(metric=SELECT_METRIC, mode="max", num_samples=space.num_samples,
                                    max_concurrent_trials=limit, scheduler=scheduler, search_alg=search,
                                    reuse_actors=reuse_actors),
        run_config=tune.RunConfig(name=name, storage_path=storage_path,
                                  callbacks=tracking.callbacks(space_name) if tracking else []))
    results = tuner.fit()
    records = []
    for result in results:
        if result.error is not None:
            raise RuntimeError(f"sweep trial {result.path} failed: {result.error}") from result.error
        setting = {path: result.config[path] for path in space.parameters}
        records.append({"trial": Path(result.path).name, "setting": setting, "metrics": dict(result.metrics)})
    return records


def _ia_trial(config: dict, inputs) -> None:
    from ray import tune

    from labelshift.ia_sweep import score_setting

    torch.set_num_threads(1)
    tune.report(score_setting(inputs, dict(config)))


def run_ia_trials(inputs, space: SpaceConfig, *, storage_path: str, name: str, seed: int = 0,
                  tracking: TrackingLink | None = None) -> list[dict]:
    """One trial per setting over the cached logits; returns ``{"trial", "setting", "metrics"}`` per trial. Trials
    reuse their actors (a fresh actor per trial would import torch and the library again: seconds per trial)."""
    from ray import tune

    trainable = tune.with_resources(tune.with_parameters(_ia_trial, inputs=inputs), {"cpu": space.cpus_per_trial})
    return _run_tuner(trainable, space, trial_cpus=space.cpus_per_trial, storage_path=storage_path, name=name,
                      seed=seed, tracking=tracking, space_name="ia", reuse_actors=True)


def _cr_worker(payload: dict) -> None:
    """``train_loop_per_worker`` of a CR trial: the refine stage with selection-split reports."""
    from labelshift.cr_sweep import SelectionReporting, checkpoint_scorer
    from labelshift.train.context import RayTrainContext
    from labelshift.train.stages import run_stage

    inner = RayTrainContext()
    run_stage(payload, SelectionReporting(inner, checkpoint_scorer(payload, inner.device)))


def _cr_trial(config: dict, make_payload: Callable[[dict], dict], ray_cfg: RayConfig, storage_path: str) -> None:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    resources = {"CPU": ray_cfg.cpus_per_worker, **({"GPU": 1} if ray_cfg.use_gpu else {})}
    trial_name = "cr-" + "-".join(f"{value}" for value in config.values()).replace("/", "_")
    TorchTrainer(_cr_worker, train_loop_config=make_payload(dict(config)),
                 scaling_config=ScalingConfig(num_workers=ray_cfg.num_workers, use_gpu=ray_cfg.use_gpu,
                                              resources_per_worker=resources),
                 run_config=RunConfig(name=f"{trial_name}-{time.time_ns()}", storage_path=storage_path,
                                      callbacks=[TuneReportCallback()])).fit()


def run_cr_trials(make_payload: Callable[[dict], dict], space: SpaceConfig, ray_cfg: RayConfig, *,
                  storage_path: str, name: str, seed: int = 0, tracking: TrackingLink | None = None) -> list[dict]:
    """One ``TorchTrainer`` run per setting, ASHA over its selection-mIoU reports (``training_iteration`` counts
    reports); records carry the last report's ``checkpoint_path`` (the trial's final model when it finished)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    trainable = tune.with_resources(
        tune.with_parameters(_cr_trial, make_payload=make_payload, ray_cfg=ray_cfg,
                             storage_path=f"{storage_path}/{name}-train"), {"cpu": CR_TRIAL_CPUS})
    scheduler = ASHAScheduler(time_attr="training_iteration", grace_period=space.grace_period,
                              reduction_factor=space.reduction_factor)
    trial_cpus = CR_TRIAL_CPUS + ray_cfg.num_workers * ray_cfg.cpus_per_worker  # the trial and its Train workers
    return _run_tuner(trainable, space, trial_cpus=trial_cpus, storage_path=storage_path, name=name, seed=seed,
                      tracking=tracking, space_name="cr", scheduler=scheduler)


def sweep_storage(cfg: ExperimentConfig) -> str:
    """Where Tune keeps the sweep's trials: ``sweep.storage_path`` or ``<output_dir>/sweeps/ray``."""
    return str(Path(cfg.sweep.storage_path or Path(cfg.output_dir) / "sweeps" / "ray").resolve())
