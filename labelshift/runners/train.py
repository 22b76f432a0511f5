"""Who runs a training stage: this process (:class:`LocalTrainRunner`) or Ray Train (:class:`RayTrainRunner`).

Both take the same JSON payload (see ``labelshift.train.stages``) and return the final model file and rank 0's
summary. Given a metric sink (``Tracker.metric_sink()``), both send it the training loss as ``train_loss`` at its
step while training runs, so a killed attempt keeps its curve. Only steps an attempt runs are sent: a resumed
attempt starts after its checkpoint. Steps re-run after a Ray Train worker restart (within one ``fit``) are sent
again, so the run holds two points for them, the later one from the workers that carried on.

Given a progress factory (``labelshift.progress.step_progress``), both show rank 0's steps and loss in this
process while it trains, with or without a metric sink: the local runner feeds the display every report; under
Ray Train the controller writes each report to a :class:`~labelshift.progress.ProgressFile` that this process
polls while it waits for ``fit``. Ray is imported only inside :class:`RayTrainRunner`.
"""
from __future__ import annotations

import shutil
import tempfile
import threading
from pathlib import Path
from typing import Callable, TypeVar

import torch

from labelshift.artifacts import TRAIN_LOSS
from labelshift.config import RayConfig
from labelshift.progress import NoProgress, ProgressFactory, ProgressFile, StepProgress, training_description
from labelshift.tracking import MetricSink
from labelshift.train.context import LocalContext
from labelshift.train.loop import FINAL_MODEL
from labelshift.train.stages import run_stage, train_worker


T = TypeVar("T")


def run_interruptibly(fn: Callable[[], T], poll_seconds: float = 0.5,
                      on_poll: Callable[[], None] | None = None) -> T:
    """Run ``fn`` in a daemon thread while the main thread keeps executing Python (``on_poll()`` every
    ``poll_seconds`` and once at the end, e.g. to draw progress).

    A blocking Ray call holds the main thread in C++, where Python signal handlers never run; waiting on a
    thread instead lets the job's SIGTERM handler fire at once (so MLflow runs end KILLED, not RUNNING).
    """
    outcome: dict = {}

    def target() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # re-raised in the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=target, name="labelshift-train", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(poll_seconds)
        if on_poll is not None:
            on_poll()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _log_train_loss(metric_sink: MetricSink, report: dict) -> None:
    """Send a training loop's report (``{"step", "loss", "lr"}``) to ``metric_sink`` as ``train_loss`` at its step;
    a report without a loss (a final checkpoint reported again after a resume) sends nothing."""
    if "loss" in report:
        metric_sink.log_metrics({TRAIN_LOSS: float(report["loss"])}, step=int(report["step"]))


def _reports_to_driver_callback(metric_sink: MetricSink | None, progress_file: ProgressFile):
    """A Ray Train ``UserCallback`` that runs on the controller: after every report it logs rank 0's loss to
    ``metric_sink`` and writes the report to ``progress_file`` for the driver (the controller runs on the
    driver's node: Ray Train places it there)."""
    from ray.train import UserCallback

    class ReportsToDriver(UserCallback):
        def __init__(self, sink: MetricSink | None, progress: ProgressFile) -> None:
            self.sink = sink
            self.progress = progress

        def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
            if self.sink is not None:
                _log_train_loss(self.sink, metrics[0])
            self.progress.write(metrics[0])

    return ReportsToDriver(metric_sink, progress_file)


def _progress_of(progress: ProgressFactory | None, payload: dict) -> StepProgress:
    return NoProgress() if progress is None else progress(*training_description(payload))


class _PolledProgress:
    """Feeds a :class:`StepProgress` from a :class:`ProgressFile`, once per new step."""

    def __init__(self, source: ProgressFile, display: StepProgress) -> None:
        self.source = source
        self.display = display
        self.last_step: int | None = None

    def __call__(self) -> None:
        report = self.source.read()
        if report is not None and report["step"] != self.last_step:
            self.last_step = report["step"]
            self.display.update(report)


class LocalTrainRunner:
    """Runs a stage in this process; re-running with the same ``run_name`` resumes from its newest checkpoint."""

    def __init__(self, work_root: str | Path, device: str | torch.device = "cpu",
                 progress: ProgressFactory | None = None) -> None:
        self.work_root = Path(work_root)
        self.device = torch.device(device)
        self.progress = progress

    def run_location(self, run_name: str) -> str:
        """Where the run's resumable checkpoints live."""
        return str(self.work_root / run_name)

    def fit(self, payload: dict, run_name: str, model_out: Path, metric_sink: MetricSink | None = None) -> dict:
        """Train in this process (resuming ``work_root/run_name``); writes the final model to ``model_out``."""
        display = _progress_of(self.progress, payload)

        def on_report(report: dict) -> None:
            if metric_sink is not None:
                _log_train_loss(metric_sink, report)
            display.update(report)

        ctx = LocalContext(self.work_root / run_name, self.device, on_report=on_report)
        try:
            summary = run_stage(payload, ctx)
        finally:
            display.close()
        shutil.copyfile(ctx.latest_checkpoint() / FINAL_MODEL, model_out)
        return summary


class RayTrainRunner:
    """``TorchTrainer`` with ``ScalingConfig(num_workers, use_gpu)``; gloo on CPU, nccl on GPU.

    Re-running with the same ``run_name`` and storage path resumes from the latest reported checkpoint
    (Ray Train's job-level restoration); ``FailureConfig(max_failures)`` restarts killed workers.
    """

    def __init__(self, ray_cfg: RayConfig, storage_path: str | Path, progress: ProgressFactory | None = None) -> None:
        self.ray_cfg = ray_cfg
        self.storage_path = str(Path(storage_path).resolve())
        self.progress = progress

    def run_location(self, run_name: str) -> str:
        """Where Ray Train keeps the run (its checkpoints and state): ``<storage_path>/<run_name>``."""
        return f"{self.storage_path}/{run_name}"

    def fit(self, payload: dict, run_name: str, model_out: Path, metric_sink: MetricSink | None = None) -> dict:
        """Train on Ray Train; copies the final checkpoint's model to ``model_out``. The losses reach
        ``metric_sink``, and the steps this runner's progress display, from Ray Train's controller as the
        workers report them."""
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        cfg = self.ray_cfg
        resources = {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})}
        display = _progress_of(self.progress, payload)
        with tempfile.TemporaryDirectory(prefix="labelshift_progress_") as progress_dir:
            progress_file = ProgressFile(Path(progress_dir) / "progress.json")
            trainer = TorchTrainer(
                train_worker,
                train_loop_config=payload,
                scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                             resources_per_worker=resources),
                run_config=RunConfig(name=run_name, storage_path=self.storage_path,
                                     failure_config=FailureConfig(max_failures=cfg.max_failures),
                                     checkpoint_config=CheckpointConfig(num_to_keep=2),
                                     callbacks=[_reports_to_driver_callback(metric_sink, progress_file)]),
            )
            try:
                result = run_interruptibly(trainer.fit, on_poll=_PolledProgress(progress_file, display))
            finally:
                display.close()
        if result.checkpoint is None:
            raise RuntimeError(f"Ray Train run {run_name} finished without a checkpoint")
        with result.checkpoint.as_directory() as checkpoint_dir:
            shutil.copyfile(Path(checkpoint_dir) / FINAL_MODEL, model_out)
        return result.return_value or {}
