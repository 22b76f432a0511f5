"""MLflow tracking for the pipeline (mlflow is imported lazily, only when tracking is enabled).

One parent run per job (the resolved config as flat params and as a ``config.json`` artifact, the process's
runtime environment as ``environment.json`` and a few ``labelshift.*`` tags, the summary table as artifacts and its
rows as ``results/<row>.<column>`` metrics) and one nested run per stage (metrics, artifacts, charts under
``plots/``, and the training loss while it trains, through a :class:`MlflowMetricSink`). Runs end FINISHED or
FAILED; on SIGTERM/SIGINT they end KILLED. Runs of the same output directory left RUNNING by a job that was
SIGKILLed are closed as KILLED when the job restarts.

Artifacts live next to the tracking store, never in the temporary copy of the code that ``ray job submit
--working-dir`` runs a job from (Ray deletes it): experiments of a sqlite store are created with
``<directory of the database>/mlartifacts`` as their artifact location (a file store keeps artifacts inside
itself, a tracking server where it is configured to), and :func:`check_outside_working_dir_copy` and
:class:`MlflowTracker` stop with a :class:`ConfigError` when results would land in such a copy.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Iterator, Protocol

from labelshift.artifacts import TRAIN_LOSS
from labelshift.config import ConfigError, ExperimentConfig, dump_config, flatten
from labelshift.runtime import runtime_environment

OUTPUT_TAG = "labelshift.output_dir"
CONFIG_ARTIFACT = "config.json"
ENVIRONMENT_ARTIFACT = "environment.json"  # labelshift.runtime.runtime_environment() of the job's driver
ARTIFACTS_DIR = "mlartifacts"  # next to a sqlite database: the artifact location of the experiments it creates
WORKING_DIR_COPIES = "working_dir_files"  # Ray copies a job's working dir to .../working_dir_files/_ray_pkg_<hash>

logger = logging.getLogger(__name__)


def default_tracking_uri(cfg: ExperimentConfig | None = None) -> str:
    """Config, then ``MLFLOW_TRACKING_URI``, then an absolute sqlite store in the working directory."""
    if cfg is not None and cfg.tracking.tracking_uri:
        return cfg.tracking.tracking_uri
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


# ---------------------------------------------------------------------------------------- where things are stored
def working_dir_copy(cwd: Path | None = None) -> Path | None:
    """The temporary copy of the code that ``ray job submit --working-dir`` runs a job from
    (``.../runtime_resources/working_dir_files/_ray_pkg_<hash>``), or None when ``cwd`` (default: the working
    directory) is not inside one."""
    parts = (cwd or Path.cwd()).resolve().parts
    if WORKING_DIR_COPIES not in parts[:-1]:
        return None
    return Path(*parts[:parts.index(WORKING_DIR_COPIES) + 2])


def _local_path_of(location: str) -> Path | None:
    """The filesystem path of a local location (a path or a file URI), None for anything else (a server)."""
    parsed = urllib.parse.urlparse(location)
    return Path(urllib.request.url2pathname(parsed.path)) if parsed.scheme in ("", "file") else None


def local_store_path(tracking_uri: str) -> Path | None:
    """The absolute path of a local tracking store (a sqlite database file, a file store directory; relative
    paths resolve against the working directory), or None for a server or an in-memory database."""
    if tracking_uri.startswith("sqlite:"):  # sqlite:///relative.db, sqlite:////absolute.db, sqlite:// (memory)
        database = tracking_uri.partition("?")[0].removeprefix("sqlite:").removeprefix("///")
        return (Path.cwd() / database).resolve() if database.strip("/") else None
    path = _local_path_of(tracking_uri)
    return None if path is None else (Path.cwd() / path).resolve()


def absolute_tracking_uri(tracking_uri: str) -> str:
    """``tracking_uri`` with a local store's path made absolute, so that every process (a Ray Train controller
    included, whatever its working directory) opens the same store."""
    store = local_store_path(tracking_uri)
    if store is None:
        return tracking_uri
    if tracking_uri.startswith("sqlite:"):
        query = tracking_uri.partition("?")[2]
        return f"sqlite:///{store}" + (f"?{query}" if query else "")
    return store.as_uri()


def artifact_location_for(tracking_uri: str) -> str | None:
    """The artifact location of experiments created in this store: ``<directory of the database>/mlartifacts``
    (a file URI) for a sqlite store; None (the store's own choice) for a file store, which keeps artifacts inside
    itself, and for a tracking server, which keeps them where its operator configured."""
    store = local_store_path(tracking_uri) if tracking_uri.startswith("sqlite:") else None
    return None if store is None else (store.parent / ARTIFACTS_DIR).as_uri()


def check_outside_working_dir_copy(cfg: ExperimentConfig) -> None:
    """Stop a job that runs from the temporary copy ``ray job submit --working-dir`` made of the code and would
    write its results into that copy: raise :class:`ConfigError` naming each of ``output_dir``,
    ``ray.storage_path`` and the MLflow store (the default ``sqlite:///<cwd>/mlflow.db`` is one) that resolves
    inside it. A no-op when the job does not run from such a copy."""
    copy = working_dir_copy()
    if copy is None:
        return
    places = {"output_dir": Path(cfg.output_dir)}
    if cfg.ray.storage_path:
        places["ray.storage_path"] = Path(cfg.ray.storage_path)
    if cfg.tracking.enabled:
        tracking_uri = default_tracking_uri(cfg)
        places[f"the MLflow store of tracking URI {tracking_uri}"] = local_store_path(tracking_uri)
    inside = [f"{name} -> {path.resolve()}" for name, path in places.items()
              if path is not None and path.resolve().is_relative_to(copy)]
    if inside:
        raise ConfigError(
            f"this job runs from {copy}, the temporary copy of the code made by `ray job submit --working-dir`, "
            f"which Ray deletes, and would write its results there: {'; '.join(inside)}. Pass absolute locations "
            f"outside it, e.g. output_dir=/shared/outputs/{cfg.name} tracking.tracking_uri=sqlite:////shared/"
            "mlflow.db (or an MLflow server: tracking.tracking_uri=http://HOST:5000, or MLFLOW_TRACKING_URI)")


# ---------------------------------------------------------------------------------------------- signals
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


# ---------------------------------------------------------------------------------------------- metric sinks
class MetricSink(Protocol):
    """Where a training loop's metrics go while it runs (any process: it must pickle)."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...


class MlflowMetricSink:
    """Logs metrics to one MLflow run, named by its id, from any process (a Ray Train controller, a worker): it
    holds only the tracking URI and the run id, uses no global mlflow state, and pickles.

    A point that cannot be logged (e.g. the store is unreachable for a moment) is reported as a warning and
    dropped: losing one point of a loss curve must not stop a training run.
    """

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        self.tracking_uri = tracking_uri
        self.run_id = run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000)
        points = [Metric(key, float(value), timestamp, step) for key, value in metrics.items()]
        try:
            MlflowClient(self.tracking_uri).log_batch(self.run_id, metrics=points)
        except Exception as exc:  # noqa: BLE001 - see the class docstring
            logger.warning("metrics %s at step %d not logged to MLflow run %s: %s", sorted(metrics), step,
                           self.run_id, exc)


# ---------------------------------------------------------------------------------------------- trackers
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

    def log_stage_plots(self, stage_dir: Path, metrics: dict, artifact_path: str) -> None:
        """Charts of a finished stage (``labelshift.plots.stage_plots``) as artifacts of the active run."""

    def active_run_id(self) -> str | None:
        """The id of the run being logged to (a stage's nested run inside ``stage()``), or None."""
        return None

    def metric_sink(self) -> MetricSink | None:
        """A sink for the current run that training processes can log to while they run; None: nothing to log."""
        return None


def environment_tags(environment: dict[str, Any]) -> dict[str, str]:
    """The tags of a job's parent run that say where its numbers came from (``runtime_environment()``): CPU and
    GPU model, torch's thread count, deterministic algorithms, and the versions of torch, ray and mlflow."""
    packages = environment["packages"]
    return {"labelshift.cpu": environment["cpu"], "labelshift.gpu": ", ".join(environment["gpu"]) or "none",
            "labelshift.torch_threads": str(environment["torch_threads"]),
            "labelshift.deterministic": str(environment["deterministic_algorithms"]).lower(),
            **{f"labelshift.version.{name}": str(packages.get(name)) for name in ("torch", "ray", "mlflow")}}


def _status_of(exc: BaseException | None) -> str:
    if exc is None:
        return "FINISHED"
    return "KILLED" if isinstance(exc, (JobTerminated, KeyboardInterrupt)) else "FAILED"


def _experiment(client, name: str, artifact_location: str | None):
    """The experiment ``name``, created with ``artifact_location`` when it does not exist yet. Raises
    :class:`ConfigError` when it is deleted, or when its artifacts go to a working-dir copy of a Ray job (an
    experiment created by a job that ran from one with MLflow's default, cwd-relative ``./mlruns``)."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            client.create_experiment(name, artifact_location=artifact_location)
        except MlflowException as exc:  # another job created it in between
            if exc.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                raise
        experiment = client.get_experiment_by_name(name)
    if experiment.lifecycle_stage == "deleted":
        raise ConfigError(f"MLflow experiment {name!r} is deleted: restore it (`mlflow experiments restore "
                          f"--experiment-id {experiment.experiment_id}`) or choose another tracking.experiment")
    location = _local_path_of(experiment.artifact_location)
    if location is not None and WORKING_DIR_COPIES in location.parts:
        raise ConfigError(
            f"MLflow experiment {name!r} keeps its artifacts in {experiment.artifact_location}, inside a temporary "
            "copy `ray job submit --working-dir` made of a job's code, which Ray deletes: its runs' artifacts would "
            "be lost. Choose another tracking.experiment (a new experiment of a sqlite store keeps its artifacts in "
            f"<directory of the database>/{ARTIFACTS_DIR}), or move that experiment's artifacts")
    return experiment


class MlflowTracker(Tracker):
    """Logs to the MLflow store at ``tracking_uri``, experiment ``experiment`` (created on first use with its
    artifacts next to the store: see :func:`artifact_location_for`)."""

    def __init__(self, tracking_uri: str, experiment: str) -> None:
        import mlflow

        self._mlflow = mlflow
        self.tracking_uri = absolute_tracking_uri(tracking_uri)
        mlflow.set_tracking_uri(self.tracking_uri)
        found = _experiment(mlflow.MlflowClient(self.tracking_uri), experiment,
                            artifact_location_for(self.tracking_uri))
        self.experiment_id = found.experiment_id

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
        """The job's parent run: the resolved config as ``config.json`` and as flat params; this process's runtime
        environment (versions, CPU/GPU, threads: apply the runtime settings first) as ``environment.json`` and
        tags."""
        output_dir = str(Path(cfg.output_dir).resolve())
        self._close_orphans(output_dir)
        environment = runtime_environment()
        with self._run(run_name=cfg.name, experiment_id=self.experiment_id,
                       tags={OUTPUT_TAG: output_dir, **environment_tags(environment)}) as run:
            self.parent_run_id = run.info.run_id
            config = dump_config(cfg)
            self._mlflow.log_dict(config, CONFIG_ARTIFACT)
            self._mlflow.log_dict(environment, ENVIRONMENT_ARTIFACT)
            self.log_params(flatten(config))
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
        """All params in one call (MLflow batches them; values over its length limit are truncated by it)."""
        self._mlflow.log_params(params)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        self._mlflow.set_tags(tags)

    def log_stage_plots(self, stage_dir: Path, metrics: dict, artifact_path: str) -> None:
        """The stage's charts (its loss curve from the ``train_loss`` the run received while training) under
        ``artifact_path``. A chart that cannot be drawn is a warning: it must not fail a finished stage."""
        import tempfile

        from labelshift.plots import stage_plots

        run_id = self.active_run_id()
        history = self._mlflow.MlflowClient().get_metric_history(run_id, TRAIN_LOSS) if run_id else []
        with tempfile.TemporaryDirectory(prefix="labelshift-plots-") as scratch:
            try:
                plots = stage_plots(stage_dir, metrics, Path(scratch), [(m.step, m.value) for m in history])
            except Exception as exc:  # noqa: BLE001 - see the docstring
                logger.warning("charts of stage %s not drawn: %s", Path(stage_dir).name, exc)
                return
            for plot in plots:
                self.log_artifact(plot, artifact_path=artifact_path)

    def active_run_id(self) -> str | None:
        run = self._mlflow.active_run()
        return run.info.run_id if run is not None else None

    def metric_sink(self) -> MlflowMetricSink:
        """A sink for the active (innermost) run, e.g. a training stage's run."""
        run = self._mlflow.active_run()
        if run is None:
            raise RuntimeError("metric_sink() logs to the active run: call it inside tracker.job() or tracker.stage()")
        return MlflowMetricSink(self.tracking_uri, run.info.run_id)


def build_tracker(cfg: ExperimentConfig) -> Tracker:
    if not cfg.tracking.enabled:
        return Tracker()
    return MlflowTracker(default_tracking_uri(cfg), cfg.tracking.experiment)
