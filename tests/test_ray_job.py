"""The cluster path: `ray start --head` + `ray job submit --working-dir`, a job stopped mid-stage and re-submitted,
and a job that would write its results into the working-dir copy it runs from.

The head is started by this test (``ray start --head --block``) and stopped by its pid; never `ray stop`.
Ray 2.60 token authentication: ``ray start --head`` enables it only when a token exists (``RAY_AUTH_MODE=token``
with no token is an error), so the test makes its own token and hands it to the head and the ``ray`` CLI through
``RAY_AUTH_TOKEN``, and to ``JobSubmissionClient`` as an ``Authorization: Bearer`` header; nothing depends on
``~/.ray/auth_token``.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("ray")
# A `ray start --head` cluster started while this process holds a local `ray.init()` instance (the session's
# local_ray) never gets a job agent ("No available agent to submit job"): run these tests with the tests that
# start their own Ray, before the session instance exists (tests/conftest.py orders `own_ray` tests first).
pytestmark = pytest.mark.own_ray

from ray.job_submission import JobStatus, JobSubmissionClient  # noqa: E402

from conftest import PROJECT, tiny_overrides  # noqa: E402

BIN = Path(sys.executable).parent
TOKEN = secrets.token_hex(32)  # this test cluster's authentication token


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env() -> dict:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN,
           "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    env.pop("MLFLOW_TRACKING_URI", None)  # every job names its store, or (the in-copy job) uses the default
    return env


def _ray(*args: str, check: bool = True, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), *args], env=_env(), capture_output=True, text=True, timeout=timeout,
                          check=check)


@dataclass
class Head:
    address: str  # the dashboard's (Jobs API) address
    temp_dir: Path  # the head's --temp-dir: the working-dir copies of submitted jobs live under it
    jobs: JobSubmissionClient


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    dashboard = _free_port()
    log = open(tmp_path_factory.mktemp("head") / "head.log", "w")
    # a private temp dir: `ray start` records its address in <temp dir>/ray_current_cluster, and a head stopped
    # by pid leaves that file behind; in /tmp/ray it would point later local runs at a dead cluster
    temp_dir = tempfile.mkdtemp(prefix="ls-ray-")
    process = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(_free_port()),
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--num-cpus", "4",
         # its own agent ports: another Ray instance on this machine holds the default ones, and a head whose
         # dashboard agent cannot bind never accepts a job ("No available agent to submit job")
         "--dashboard-agent-listen-port", str(_free_port()), "--dashboard-agent-grpc-port", str(_free_port()),
         "--runtime-env-agent-port", str(_free_port()), "--metrics-export-port", str(_free_port()),
         "--temp-dir", temp_dir],
        env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.time() + 120
    while _ray("job", "list", "--address", address, check=False).returncode != 0:
        assert process.poll() is None and time.time() < deadline, "the Ray head did not come up"
        time.sleep(2)
    yield Head(address, Path(temp_dir), JobSubmissionClient(address, headers={"Authorization": f"Bearer {TOKEN}"}))
    process.send_signal(signal.SIGTERM)  # stop what we started, by its pid
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
    log.close()
    shutil.rmtree(temp_dir, ignore_errors=True)


def _submit(head: Head, job_id: str, overrides: list[str]) -> None:
    """`ray job submit --working-dir`; retried while the head's job agent is still starting (the REST API answers
    first)."""
    deadline = time.time() + 120
    while True:
        done = _ray("job", "submit", "--address", head.address, "--submission-id", job_id, "--working-dir",
                    str(PROJECT), "--no-wait", "--", "python", "ray_jobs/refine.py", "--config", "configs/demo.yaml",
                    *overrides, check=False)
        if done.returncode == 0:
            return
        assert time.time() < deadline, f"ray job submit failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
        time.sleep(3)


def _wait(head: Head, job_id: str, timeout: float = 600) -> JobStatus:
    """The job's final status."""
    deadline = time.time() + timeout
    while (status := head.jobs.get_job_status(job_id)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED,
                                                                 JobStatus.STOPPED):
        assert time.time() < deadline, f"job {job_id} still {status} after {timeout}s:\n{_logs(head, job_id)}"
        time.sleep(2)
    return status


def _logs(head: Head, job_id: str) -> str:
    return head.jobs.get_job_logs(job_id)[-4000:]


def _runs(tracking_uri: str):
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    return mlflow.search_runs(search_all_experiments=True, order_by=["attributes.start_time ASC"])


def _refine_run_of(tracking_uri: str, status: str) -> str:
    runs = _runs(tracking_uri)
    return runs[(runs["tags.mlflow.runName"] == "refine") & (runs["status"] == status)]["run_id"].iloc[-1]


def _loss_steps(client, run_id: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, "train_loss"))


def test_job_submit_stop_mid_stage_and_resubmit(head, tmp_path):
    """Stopped mid-CR and re-submitted: completed stages are skipped, CR resumes from its Ray Train checkpoint,
    both attempts keep their loss curves, and every MLflow artifact lies under the store's artifact root, never in
    the working-dir copy the jobs ran from."""
    import mlflow

    out = tmp_path / "run"
    tracking_uri = f"sqlite:///{out}/mlflow.db"
    overrides = tiny_overrides(out) + ["train.refine.iterations=2000", "train.refine.checkpoint_every=50",
                                       "train.refine.log_every=50", "ray.cpus_per_worker=1"]
    _submit(head, "first", overrides)
    deadline = time.time() + 400
    while not list((out / "ray").glob("demo-refine-*/checkpoint_manager_snapshot.json")):
        assert head.jobs.get_job_status("first") in (JobStatus.PENDING, JobStatus.RUNNING), _logs(head, "first")
        assert time.time() < deadline, _logs(head, "first")
        time.sleep(0.5)
    assert (out / "stages" / "refine.partial").is_dir()
    client = mlflow.MlflowClient(tracking_uri)
    first_refine = _refine_run_of(tracking_uri, "RUNNING")
    while not _loss_steps(client, first_refine):  # the loss reaches MLflow while CR trains
        assert head.jobs.get_job_status("first") == JobStatus.RUNNING, _logs(head, "first")
        assert time.time() < deadline, _logs(head, "first")
        time.sleep(0.5)
    _ray("job", "stop", "--address", head.address, "first")
    assert _wait(head, "first") == JobStatus.STOPPED
    runs = _runs(tracking_uri)
    assert "RUNNING" not in set(runs["status"])
    killed = runs[runs["tags.mlflow.runName"].isin(["demo", "refine"])]
    assert set(killed["status"]) <= {"KILLED", "FAILED"} and len(killed) == 2
    assert not (out / "stages" / "refine").exists()

    _submit(head, "second", overrides)  # the same command again
    assert _wait(head, "second") == JobStatus.SUCCEEDED, _logs(head, "second")
    logs = head.jobs.get_job_logs("second")
    for stage in ("pretrain", "estimate", "evaluate_adapted"):
        assert f"[{stage}] complete (manifest valid): skipped" in logs
    assert "[refine] running" in logs
    summary = json.loads((out / "summary.json").read_text())
    assert [row["model"] for row in summary["rows"]][-1] == "+self-distillation"
    refine = summary["stages"]["refine"]  # Ray Train resumed the interrupted run from its last checkpoint
    resumed = refine["resumed_from"]
    assert resumed > 0 and resumed % 50 == 0 and resumed + refine["steps_run"] == 2000
    assert not list((out / "stages").glob("*.partial"))
    # The stopped attempt's curve: every log_every-th step it ran, none missing, up to the checkpoint the second
    # attempt resumed from (whose loss is logged right after Ray Train registers the checkpoint, so the attempt
    # may have been stopped in between); the second attempt's curve holds only the steps it ran.
    first_steps = _loss_steps(client, first_refine)
    assert first_steps == list(range(50, first_steps[-1] + 1, 50)) and first_steps[-1] in (resumed - 50, resumed)
    _check_mlflow(tracking_uri, out, resumed)
    copies = _working_dir_copies(head)
    assert copies and _results_in(copies) == []


def test_a_job_that_would_write_into_its_working_dir_copy_stops(head):
    """A relative output_dir and the default tracking store (sqlite:///<cwd>/mlflow.db) resolve inside the copy
    `ray job submit --working-dir` runs the job from: the job fails before it writes anything, naming both."""
    _submit(head, "in-copy", ["output_dir=outputs/in-copy"])
    assert _wait(head, "in-copy") == JobStatus.FAILED
    logs = head.jobs.get_job_logs("in-copy")
    copy = Path(logs.split("refine.py: error: this job runs from ", 1)[1].split(", the temporary copy", 1)[0])
    assert f"output_dir -> {copy}/outputs/in-copy" in logs and f"{copy}/mlflow.db -> {copy}/mlflow.db" in logs
    assert copy in _working_dir_copies(head) and _results_in([copy]) == []


def _working_dir_copies(head: Head) -> list[Path]:
    """The copies of the code `ray job submit --working-dir` made for this head's jobs."""
    return [path for path in head.temp_dir.glob("session_*/runtime_resources/working_dir_files/_ray_pkg_*")
            if path.is_dir()]


def _results_in(copies: list[Path]) -> list[Path]:
    """Job results (outputs, MLflow stores and artifacts) found at the top of the working-dir copies."""
    return [path for copy in copies for path in copy.iterdir()
            if path.name in ("outputs", "mlflow.db", "mlruns", "mlartifacts")]


def _artifact_files(client, run_id: str, path: str | None = None) -> list[str]:
    """Every artifact file of the run, listed recursively through MLflow."""
    files = []
    for entry in client.list_artifacts(run_id, path):
        files += _artifact_files(client, run_id, entry.path) if entry.is_dir else [entry.path]
    return files


def _manifest(out: Path, stage: str) -> dict:
    return json.loads((out / "stages" / stage / "manifest.json").read_text())


def _check_mlflow(tracking_uri: str, out: Path, resumed: int) -> None:
    """Statuses, the parent/nested structure, params, metrics and artifacts of the two jobs' runs."""
    import mlflow

    runs = _runs(tracking_uri)
    assert set(runs["status"]) <= {"KILLED", "FAILED", "FINISHED"}
    parents = runs[runs["tags.mlflow.runName"] == "demo"]
    assert list(parents["status"])[-1] == "FINISHED" and parents["status"].iloc[0] in ("KILLED", "FAILED")
    parent = parents.iloc[-1]
    assert parent["params.train.refine.iterations"] == "2000" and parent["params.prior.method"] == "ensemble"
    stages = runs[runs["tags.mlflow.parentRunId"] == parent["run_id"]].set_index("tags.mlflow.runName")
    assert set(stages.index) == {"refine", "evaluate_refined", "pseudo", "distill", "evaluate_distilled", "export"}
    assert (stages["status"] == "FINISHED").all()
    refined = _manifest(out, "evaluate_refined")  # the stage run logged the numbers its manifest holds
    evaluation = refined["metrics"]["target_val/none"]
    assert refined["mlflow_run_id"] == stages.loc["evaluate_refined", "run_id"]
    assert stages.loc["evaluate_refined", "metrics.target_val/none.miou"] == evaluation["miou"]
    assert stages.loc["evaluate_refined", "metrics.target_val/none.per_class_iou.road"] == \
        evaluation["per_class_iou"]["road"]
    first_estimate = runs[(runs["tags.mlflow.runName"] == "estimate")
                          & (runs["tags.mlflow.parentRunId"] == parents.iloc[0]["run_id"])].iloc[0]
    estimate = _manifest(out, "estimate")  # written by the stopped job, skipped by the second
    assert first_estimate["status"] == "FINISHED" and estimate["mlflow_run_id"] == first_estimate["run_id"]
    assert first_estimate["metrics.em_l1"] == estimate["metrics"]["em_l1"]
    client = mlflow.MlflowClient(tracking_uri)
    assert {"config.json", "summary.json", "summary.md"} <= set(_artifact_files(client, parent["run_id"]))
    config = json.loads((out / "mlartifacts" / parent["run_id"] / "artifacts" / "config.json").read_text())
    assert config["train"]["refine"]["iterations"] == 2000 and config["output_dir"] == str(out)
    refine_id = stages.loc["refine", "run_id"]
    assert [a.path for a in client.list_artifacts(refine_id, "refine")] == ["refine/checkpoint.json"]
    info = json.loads((out / "stages" / "refine" / "checkpoint.json").read_text())
    assert len(info["sha256"]) == 64 and info["training_run"]["location"].startswith(str(out / "ray"))
    curve = client.get_metric_history(refine_id, "train_loss")
    assert sorted(m.step for m in curve) == list(range(resumed + 50, 2001, 50)) and all(m.value > 0 for m in curve)
    estimate_artifacts = {a.path for a in client.list_artifacts(first_estimate["run_id"], "estimate")}
    assert {"estimate/target.json", "estimate/calibration.json", "estimate/estimate_em.json"} <= estimate_artifacts
    # every artifact of every run lies under the store's artifact root, <dir of mlflow.db>/mlartifacts
    for run_id, artifact_uri in zip(runs["run_id"], runs["artifact_uri"]):
        assert artifact_uri == f"{(out / 'mlartifacts').as_uri()}/{run_id}/artifacts"
        for path in _artifact_files(client, run_id):
            assert (out / "mlartifacts" / run_id / "artifacts" / path).is_file(), (run_id, path)
