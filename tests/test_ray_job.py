"""The cluster path: `ray start --head` + `ray job submit`, a job stopped mid-stage and re-submitted.

The head is started by this test (``ray start --head --block``) and stopped by its pid; never `ray stop`.
Ray 2.60 token authentication: ``ray start --head`` enables it only when a token exists (``RAY_AUTH_MODE=token``
with no token is an error), so the test makes its own token and hands it to the head and every client through
``RAY_AUTH_TOKEN``; nothing depends on ``~/.ray/auth_token``.
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
from pathlib import Path

import pytest

pytest.importorskip("ray")

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
    return env


def _ray(*args: str, check: bool = True, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), *args], env=_env(), capture_output=True, text=True, timeout=timeout,
                          check=check)


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
         "--temp-dir", temp_dir],
        env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.time() + 120
    while _ray("job", "list", "--address", address, check=False).returncode != 0:
        assert process.poll() is None and time.time() < deadline, "the Ray head did not come up"
        time.sleep(2)
    yield address
    process.send_signal(signal.SIGTERM)  # stop what we started, by its pid
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
    log.close()
    shutil.rmtree(temp_dir, ignore_errors=True)


def _submit(address: str, job_id: str, overrides: list[str]) -> None:
    """`ray job submit`; retried while the head's job agent is still starting (the REST API answers first)."""
    deadline = time.time() + 120
    while True:
        done = _ray("job", "submit", "--address", address, "--submission-id", job_id, "--working-dir",
                    str(PROJECT), "--no-wait", "--", "python", "ray_jobs/refine.py", "--config", "configs/demo.yaml",
                    *overrides, check=False)
        if done.returncode == 0:
            return
        assert time.time() < deadline, f"ray job submit failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
        time.sleep(3)


def _get(address: str, path: str) -> dict:
    """The Jobs REST API, authenticated with the cluster's token (``Authorization: Bearer``)."""
    import httpx

    response = httpx.get(f"{address}{path}", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    response.raise_for_status()
    return response.json()


def _status(address: str, job_id: str) -> str:
    return _get(address, f"/api/jobs/{job_id}")["status"]


def _wait(address: str, job_id: str, until: tuple[str, ...], timeout: float = 600) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = _status(address, job_id)
        if status in until:
            return status
        time.sleep(2)
    raise AssertionError(f"job {job_id} still {status} after {timeout}s:\n{_logs(address, job_id)[-3000:]}")


def _logs(address: str, job_id: str) -> str:
    return _get(address, f"/api/jobs/{job_id}/logs")["logs"]


def _runs(tracking_uri: str):
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    return mlflow.search_runs(search_all_experiments=True, order_by=["attributes.start_time ASC"])


def test_job_submit_stop_mid_stage_and_resubmit(head, tmp_path):
    out = tmp_path / "run"
    overrides = tiny_overrides(out) + ["train.refine.iterations=2000", "train.refine.checkpoint_every=50",
                                       "train.refine.log_every=50", "ray.cpus_per_worker=1"]
    _submit(head, "first", overrides)
    refine_storage = out / "ray"
    deadline = time.time() + 400
    while not list(refine_storage.glob("demo-refine-*/checkpoint_manager_snapshot.json")):
        assert _status(head, "first") in ("PENDING", "RUNNING"), _logs(head, "first")[-3000:]
        assert time.time() < deadline, _logs(head, "first")[-3000:]
        time.sleep(0.5)
    assert (out / "stages" / "refine.partial").is_dir()
    _ray("job", "stop", "--address", head, "first")
    assert _wait(head, "first", ("STOPPED", "FAILED", "SUCCEEDED")) == "STOPPED"
    runs = _runs(f"sqlite:///{out}/mlflow.db")
    assert "RUNNING" not in set(runs["status"])
    killed = runs[runs["tags.mlflow.runName"].isin(["demo", "refine"])]
    assert set(killed["status"]) <= {"KILLED", "FAILED"} and len(killed) == 2
    assert not (out / "stages" / "refine").exists()

    _submit(head, "second", overrides)  # the same command again
    assert _wait(head, "second", ("SUCCEEDED", "FAILED", "STOPPED")) == "SUCCEEDED", _logs(head, "second")[-4000:]
    logs = _logs(head, "second")
    for stage in ("pretrain", "estimate", "evaluate_adapted"):
        assert f"[{stage}] complete (manifest valid): skipped" in logs
    assert "[refine] running" in logs
    summary = json.loads((out / "summary.json").read_text())
    assert [row["model"] for row in summary["rows"]][-1] == "+self-distillation"
    refine = summary["stages"]["refine"]  # Ray Train resumed the interrupted run from its last checkpoint
    assert refine["resumed_from"] > 0 and refine["resumed_from"] % 50 == 0
    assert refine["resumed_from"] + refine["steps_run"] == 2000
    assert not list((out / "stages").glob("*.partial"))
    _check_mlflow(f"sqlite:///{out}/mlflow.db", out)


def _check_mlflow(tracking_uri: str, out: Path) -> None:
    """Statuses, the parent/nested structure, params, metrics and artifacts of the two jobs' runs."""
    import mlflow

    runs = _runs(tracking_uri)
    assert set(runs["status"]) <= {"KILLED", "FAILED", "FINISHED"}
    parents = runs[runs["tags.mlflow.runName"] == "demo"]
    assert list(parents["status"])[-1] == "FINISHED" and parents["status"].iloc[0] in ("KILLED", "FAILED")
    parent = parents.iloc[-1]
    assert parent["params.train.refine.iterations"] == "2000" and parent["params.prior.method"] == "em"
    stages = runs[runs["tags.mlflow.parentRunId"] == parent["run_id"]].set_index("tags.mlflow.runName")
    assert set(stages.index) == {"refine", "evaluate_refined", "pseudo", "distill", "evaluate_distilled"}
    assert (stages["status"] == "FINISHED").all()
    assert 0 <= stages.loc["evaluate_refined", "metrics.target_val/none.miou"] <= 100
    assert "metrics.target_val/none.per_class_iou.road" in stages.columns
    first_estimate = runs[(runs["tags.mlflow.runName"] == "estimate")
                          & (runs["tags.mlflow.parentRunId"] == parents.iloc[0]["run_id"])].iloc[0]
    assert first_estimate["status"] == "FINISHED" and 0 <= first_estimate["metrics.em_l1"] <= 2
    client = mlflow.MlflowClient(tracking_uri)
    assert {a.path for a in client.list_artifacts(parent["run_id"])} >= {"summary.json", "summary.md"}
    refine_id = stages.loc["refine", "run_id"]
    assert [a.path for a in client.list_artifacts(refine_id, "refine")] == ["refine/checkpoint.json"]
    info = json.loads((out / "stages" / "refine" / "checkpoint.json").read_text())
    assert len(info["sha256"]) == 64 and info["training_run"]["location"].startswith(str(out / "ray"))
    curve = client.get_metric_history(refine_id, "train_loss")
    assert [m.step for m in curve][-1] == 2000 and all(m.value > 0 for m in curve)
    estimate_artifacts = {a.path for a in client.list_artifacts(first_estimate["run_id"], "estimate")}
    assert {"estimate/target.json", "estimate/calibration.json", "estimate/estimate_em.json"} <= estimate_artifacts
