"""MLflow tracking without Ray: artifacts next to the sqlite store, the working-dir-copy guard, the config as
params and ``config.json``, and the training loss streamed to the stage's run while it trains."""
from __future__ import annotations

import importlib.util
import json
import pickle
from pathlib import Path

import pytest

mlflow = pytest.importorskip("mlflow")

from conftest import PROJECT  # noqa: E402
from labelshift.build import ensure_world  # noqa: E402
from labelshift.config import ConfigError  # noqa: E402
from labelshift.runners import LocalTrainRunner  # noqa: E402
from labelshift.tracking import (  # noqa: E402
    MlflowMetricSink, MlflowTracker, absolute_tracking_uri, artifact_location_for, check_outside_working_dir_copy,
    local_store_path, working_dir_copy)


def _working_dir_copy(root: Path) -> Path:
    """A directory laid out like the copy `ray job submit --working-dir` runs a job from."""
    copy = root / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123abcd"
    copy.mkdir(parents=True)
    return copy


def test_store_paths_and_artifact_locations(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert local_store_path("sqlite:///rel/mlflow.db") == tmp_path / "rel" / "mlflow.db"
    assert local_store_path("sqlite:////abs/mlflow.db?timeout=30") == Path("/abs/mlflow.db")
    assert local_store_path("sqlite://") is None and local_store_path("http://127.0.0.1:5000") is None
    assert local_store_path("file:///abs/mlruns") == Path("/abs/mlruns") == local_store_path("/abs/mlruns")
    assert absolute_tracking_uri("sqlite:///rel/mlflow.db?timeout=30") == f"sqlite:///{tmp_path}/rel/mlflow.db?timeout=30"
    assert absolute_tracking_uri("https://mlflow.example") == "https://mlflow.example"
    assert artifact_location_for("sqlite:////abs/db/mlflow.db") == "file:///abs/db/mlartifacts"
    assert artifact_location_for("https://mlflow.example") is None and artifact_location_for("/abs/mlruns") is None
    copy = _working_dir_copy(tmp_path)
    assert working_dir_copy(copy / "ray_jobs") == copy and working_dir_copy(tmp_path) is None


def test_artifacts_go_next_to_the_sqlite_store_not_to_the_working_directory(tiny_cfg, tmp_path, monkeypatch):
    """The parent run holds the config (params through MLflow's own batching, and config.json); every artifact
    lands under <dir of the database>/mlartifacts, nothing in the working directory."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    store = tmp_path / "store"
    cfg = tiny_cfg(f"tracking.tracking_uri=sqlite:///{store}/mlflow.db", out=tmp_path / "run")
    tracker = MlflowTracker(cfg.tracking.tracking_uri, "artifact-location")
    (tmp_path / "note.txt").write_text("hello")
    with tracker.job(cfg):
        with tracker.stage("estimate"):
            tracker.log_artifact(tmp_path / "note.txt", artifact_path="estimate")
    client = mlflow.MlflowClient(tracker.tracking_uri)
    experiment = client.get_experiment(tracker.experiment_id)
    assert experiment.artifact_location == (store / "mlartifacts").as_uri()
    runs = client.search_runs([tracker.experiment_id])
    assert len(runs) == 2
    for run in runs:
        assert run.info.artifact_uri == f"{experiment.artifact_location}/{run.info.run_id}/artifacts"
    parent = client.get_run(tracker.parent_run_id)
    parent_dir = store / "mlartifacts" / parent.info.run_id / "artifacts"
    assert json.loads((parent_dir / "config.json").read_text()) == cfg.model_dump(mode="json")
    assert len(parent.data.params) > 100  # more than one of MLflow's batches of 100
    assert parent.data.params["train.refine.iterations"] == "4" and parent.data.params["name"] == cfg.name
    stage = next(run for run in runs if run.info.run_id != parent.info.run_id)
    assert (store / "mlartifacts" / stage.info.run_id / "artifacts" / "estimate" / "note.txt").read_text() == "hello"
    assert list(cwd.iterdir()) == []


def test_a_job_running_from_a_working_dir_copy_must_write_outside_it(tiny_cfg, tmp_path, monkeypatch, capsys):
    copy = _working_dir_copy(tmp_path)
    monkeypatch.chdir(copy)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    relative = tiny_cfg("tracking.tracking_uri=null", out=Path("outputs/demo"))  # the default sqlite:///<cwd>/mlflow.db
    with pytest.raises(ConfigError) as caught:
        check_outside_working_dir_copy(relative)
    message = str(caught.value)
    assert f"this job runs from {copy}, the temporary copy of the code made by `ray job submit --working-dir`" in message
    assert f"output_dir -> {copy}/outputs/demo" in message
    assert f"the MLflow store of tracking URI sqlite:///{copy}/mlflow.db -> {copy}/mlflow.db" in message
    assert "Pass absolute locations outside it, e.g. output_dir=/shared/outputs/demo" in message
    outside = tiny_cfg(out=tmp_path / "results")  # absolute output_dir and tracking URI
    check_outside_working_dir_copy(outside)

    refine = importlib.util.spec_from_file_location("refine_job", PROJECT / "ray_jobs" / "refine.py")
    job = importlib.util.module_from_spec(refine)
    refine.loader.exec_module(job)
    assert job.main(["--config", str(PROJECT / "configs" / "demo.yaml"), "output_dir=outputs/demo"]) == 2
    assert capsys.readouterr().err.startswith(f"refine.py: error: this job runs from {copy}, the temporary copy")
    assert list(copy.iterdir()) == []  # stopped before it wrote anything: no database, no outputs


def test_an_experiment_whose_artifacts_are_in_a_working_dir_copy_is_reported(tmp_path):
    tracking_uri = f"sqlite:///{tmp_path}/mlflow.db"
    stale = (_working_dir_copy(tmp_path) / "mlruns" / "1").as_uri()
    mlflow.MlflowClient(tracking_uri).create_experiment("made-by-an-old-job", artifact_location=stale)
    with pytest.raises(ConfigError, match=f"MLflow experiment 'made-by-an-old-job' keeps its artifacts in {stale}, "
                                          "inside a temporary copy `ray job submit --working-dir` made"):
        MlflowTracker(tracking_uri, "made-by-an-old-job")


def test_the_training_loss_reaches_the_run_while_training_and_a_resume_adds_only_its_own_steps(tiny_cfg, tmp_path):
    """Attempt 1 is killed after reporting step 3 (checkpoints at steps 2 and 4): its run keeps steps 1-3. Attempt 2
    resumes from step 2 and logs steps 3 and 4 only, in its own run."""
    cfg = tiny_cfg()
    ensure_world(cfg, log=lambda m: None)
    tracking_uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.MlflowClient(tracking_uri)
    experiment_id = client.create_experiment("curves", artifact_location=artifact_location_for(tracking_uri))

    class KilledAfterStep3(MlflowMetricSink):
        def log_metrics(self, metrics: dict[str, float], step: int) -> None:
            super().log_metrics(metrics, step)
            if step == 3:
                raise KeyboardInterrupt("attempt killed")

    payload = {"stage": "source", "config": cfg.model_dump(mode="json")}
    runner = LocalTrainRunner(tmp_path / "train")
    first, second = (client.create_run(experiment_id).info.run_id for _ in range(2))
    with pytest.raises(KeyboardInterrupt):
        runner.fit(payload, "source", tmp_path / "model.safetensors", metric_sink=KilledAfterStep3(tracking_uri, first))
    sink = pickle.loads(pickle.dumps(MlflowMetricSink(tracking_uri, second)))  # what a Ray Train controller gets
    summary = runner.fit(payload, "source", tmp_path / "model.safetensors", metric_sink=sink)
    assert summary["resumed_from"] == 2
    curve = {run: [(m.step, m.value) for m in client.get_metric_history(run, "train_loss")] for run in (first, second)}
    assert [step for step, _ in curve[first]] == [1, 2, 3]
    assert curve[second] == [(step, pytest.approx(loss)) for step, loss in summary["losses"]]
    assert [step for step, _ in curve[second]] == [3, 4]
