"""MLflow tracking for the pipeline (mlflow is imported lazily, only when tracking is enabled).

One parent run per job (resolved config as params, the summary table as an artifact) and one nested run
per stage (metrics, artifacts). Runs end FINISHED or FAILED; on SIGTERM/SIGINT they end KILLED. Runs of the
same output directory left RUNNING by a job that was SIGKILLed are closed as KILLED when the job restarts.
"""
from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path
from typing import Any, Iterator

from labelshift.config import ExperimentConfig, dump_config, flatten

OUTPUT_TAG = "labelshift.output_dir"


def default_tracking_uri(cfg: ExperimentConfig | None = None) -> str:
    """Config, then ``MLFLOW_TRACKING_URI``, then an absolute sqlite store in the working directory."""
    if cfg is not None and cfg.tracking.tracking_uri:
        return cfg.tracking.tracking_uri
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


class JobTerminated(BaseException):
    """Raised in the main thread on SIGTERM so that runs end KILLED and temporary files are cleaned up."""


@contextlib.contextmanager
def terminate_on_sigterm() -> Iterator[None]:
    def handler(signum, frame):
        raise JobTerminated(f"received signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class Tracker:
    """Nothing is logged (tracking disabled); the interface the pipeline uses."""

    parent_run_id: str | None = None

    @contextlib.contextmanager
    def job(self, cfg: ExperimentConfig) -> Iterator["Tracker"]:
        yield self

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator["Tracker"]:
        yield self

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...

    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...

    def set_tags(self, tags: dict[str, str]) -> None: ...


def _status_of(exc: BaseException | None) -> str:
    if exc is None:
        return "FINISHED"
    return "KILLED" if isinstance(exc, (JobTerminated, KeyboardInterrupt)) else "FAILED"


class MlflowTracker(Tracker):
    def __init__(self, tracking_uri: str, experiment: str) -> None:
        import mlflow

        self._mlflow = mlflow
        self.tracking_uri = tracking_uri
        mlflow.set_tracking_uri(tracking_uri)
        self.experiment_id = mlflow.set_experiment(experiment).experiment_id

    def _close_orphans(self, output_dir: str) -> None:
        client = self._mlflow.MlflowClient()
        stale = client.search_runs([self.experiment_id], filter_string=f"tags.`{OUTPUT_TAG}` = '{output_dir}' "
                                   "and attributes.status = 'RUNNING'")
        for run in stale:
            client.set_terminated(run.info.run_id, status="KILLED")

    @contextlib.contextmanager
    def _run(self, **kwargs) -> Iterator[Any]:
        run = self._mlflow.start_run(**kwargs)
        try:
            yield run
        except BaseException as exc:
            self._mlflow.end_run(status=_status_of(exc))
            raise
        self._mlflow.end_run(status="FINISHED")

    @contextlib.contextmanager
    def job(self, cfg: ExperimentConfig) -> Iterator["MlflowTracker"]:
        output_dir = str(Path(cfg.output_dir).resolve())
        self._close_orphans(output_dir)
        with self._run(run_name=cfg.name, experiment_id=self.experiment_id, tags={OUTPUT_TAG: output_dir}) as run:
            self.parent_run_id = run.info.run_id
            self.log_params(flatten(dump_config(cfg)))
            yield self

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator["MlflowTracker"]:
        output_tag = self._mlflow.get_run(self.parent_run_id).data.tags.get(OUTPUT_TAG, "")
        with self._run(run_name=name, nested=True, experiment_id=self.experiment_id,
                       tags={OUTPUT_TAG: output_tag, "labelshift.stage": name}):
            yield self

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        clean = {k: float(v) for k, v in metrics.items() if v is not None and v == v}
        if clean:
            self._mlflow.log_metrics(clean, step=step)

    def log_params(self, params: dict[str, Any]) -> None:
        items = [(k, str(v)[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self._mlflow.log_params(dict(items[start:start + 100]))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        self._mlflow.set_tags(tags)


def build_tracker(cfg: ExperimentConfig) -> Tracker:
    if not cfg.tracking.enabled:
        return Tracker()
    return MlflowTracker(default_tracking_uri(cfg), cfg.tracking.experiment)
