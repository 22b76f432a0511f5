"""Ray Train on the session's local Ray instance: the pipeline's training stages on 2 workers, DDP equivalence,
a killed worker resumes and its loss curve in MLflow is whole."""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
mlflow = pytest.importorskip("mlflow")

from conftest import DEMO_CONFIG, SHARED_STAGES, tiny_overrides  # noqa: E402
from labelshift.artifacts import TRAIN_LOSS  # noqa: E402
from labelshift.build import ensure_world  # noqa: E402
from labelshift.config import load_config  # noqa: E402
from labelshift.pipeline import Pipeline  # noqa: E402
from labelshift.pipeline.job import ALL_STAGES  # noqa: E402
from labelshift.runners import LocalTrainRunner, RayTrainRunner  # noqa: E402
from labelshift.tracking import MlflowMetricSink, Tracker, artifact_location_for  # noqa: E402

RAY_STAGES = ("refine", "distill")  # the training stages after the shared pretrain (its loop: the DDP test)


@pytest.fixture(scope="module")
def two_worker_pipeline(local_ray, tiny_trained, tmp_path_factory):
    """The demo pipeline after the shared pretrain/estimate stages, its training stages on 2 Ray Train workers
    (1 CPU each); and the same pipeline with local (1-process) training, for comparison."""
    runs = {}
    for name in ("ray", "local"):
        out = tiny_trained.copy_stages(tmp_path_factory.mktemp(f"pipeline_{name}") / "run")
        cfg = load_config(DEMO_CONFIG, [*tiny_overrides(out, world=tiny_trained.world), "ray.num_workers=2",
                                        "ray.cpus_per_worker=1"])
        runner = RayTrainRunner(cfg.ray, out / "ray") if name == "ray" else LocalTrainRunner(out / "train")
        logs: list[str] = []
        summary = Pipeline(cfg, runner, Tracker(), log=logs.append).run()
        runs[name] = {"out": out, "summary": summary, "logs": logs}
    return runs


def test_the_pipeline_trains_refine_and_distill_on_two_workers(two_worker_pipeline):
    metrics = two_worker_pipeline["ray"]["summary"]["stages"]
    for stage in RAY_STAGES:
        assert (metrics[stage]["world_size"], metrics[stage]["steps_run"], metrics[stage]["resumed_from"]) == (2, 4, 0)
    assert metrics["pretrain"]["world_size"] == 1  # the shared, local pretrain stage: skipped, not re-trained


def test_the_pipeline_on_ray_skips_the_shared_stages_and_runs_every_other(two_worker_pipeline):
    logs = two_worker_pipeline["ray"]["logs"]
    skipped = [line.split("]")[0][1:] for line in logs if line.endswith("skipped")]
    ran = [line.split("]")[0][1:] for line in logs if line.endswith("] running")]
    assert skipped == list(SHARED_STAGES)
    assert ran == [name for name in ALL_STAGES if name not in SHARED_STAGES]
    rows = two_worker_pipeline["ray"]["summary"]["rows"]
    assert [row["model"] for row in rows] == ["source-only (adapted model)", "+IA (estimated prior)",
                                              "+IA (oracle prior)", "+CR (classifier refinement)",
                                              "+self-distillation"]


def test_the_training_stages_record_their_ray_train_runs(two_worker_pipeline):
    out = two_worker_pipeline["ray"]["out"]
    for stage in RAY_STAGES:
        info = json.loads((out / "stages" / stage / "checkpoint.json").read_text())
        location = Path(info["training_run"]["location"])
        assert location.parent == (out / "ray").resolve() and location.name == info["training_run"]["name"]
        assert (location / "checkpoint_manager_snapshot.json").is_file()


def test_refine_on_two_workers_gives_the_losses_of_one_worker(two_worker_pipeline):
    """CR trains the head only (the backbone, BatchNorm included, is fixed): with the same global batch, 2 workers
    give the loss of 1 (to the tolerance of the DDP test below); the evaluation before it is the same."""
    ray_run, local = (two_worker_pipeline[name]["summary"]["stages"] for name in ("ray", "local"))
    assert ray_run["evaluate_adapted"] == {**local["evaluate_adapted"],
                                           "seconds": ray_run["evaluate_adapted"]["seconds"]}
    assert ray_run["refine"]["final_loss"] == pytest.approx(local["refine"]["final_loss"], rel=2e-3)


def test_two_ddp_workers_give_the_losses_of_one_worker(local_ray, shared_cfg, tmp_path):
    """Same global batch (4) and seed; frozen BatchNorm so that batch statistics cannot differ."""
    cfg = shared_cfg("model.frozen_bn=true", "ray.num_workers=2", "ray.cpus_per_worker=1", "train.source.lr=0.05",
                     iterations=6)
    payload = {"stage": "source", "config": cfg.model_dump(mode="json")}
    two = RayTrainRunner(cfg.ray, tmp_path / "ray").fit(payload, "ddp2", tmp_path / "two.safetensors")
    one = LocalTrainRunner(tmp_path / "local").fit(payload, "one", tmp_path / "one.safetensors")
    assert (two["world_size"], one["world_size"]) == (2, 1)
    assert [s for s, _ in one["losses"]] == [s for s, _ in two["losses"]] == [1, 2, 3, 4, 5, 6]
    # Tolerance: each worker averages its loss over its own valid pixels and DDP averages the two means, while one
    # worker averages over all valid pixels at once; with (almost) no ignored pixels the two agree to float error.
    for (_, loss_one), (_, loss_two) in zip(one["losses"], two["losses"]):
        assert loss_two == pytest.approx(loss_one, rel=2e-3)
    assert one["losses"][0][1] != pytest.approx(one["losses"][-1][1], rel=1e-3)  # training moved


def _parent_of(pid: int) -> int:
    stat = (Path("/proc") / str(pid) / "stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])  # the field after the state letter


def _descends_from_this_process(pid: int) -> bool:
    """Whether ``pid`` was started (through any chain of parents) by this test process: the local Ray instance
    this test session started, never another session's workers on the same machine."""
    me = os.getpid()
    while pid > 1:
        pid = _parent_of(pid)
        if pid == me:
            return True
    return False


def _train_worker_pids() -> list[int]:
    """Ray Train worker processes (titled ``ray::RayTrainWorker...``) of the Ray instance this session started."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if (entry.name.isdigit() and b"RayTrainWorker" in (entry / "cmdline").read_bytes()
                    and _descends_from_this_process(int(entry.name))):
                pids.append(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue
    return pids


def _latest_checkpoint_step(snapshot: Path) -> int | None:
    """The step of the newest checkpoint Ray Train registered (its checkpoint manager snapshot), None if none
    yet (the snapshot is written in place: a half-written one reads as none)."""
    try:
        latest = json.loads(snapshot.read_text())["latest_checkpoint_result"]
    except (OSError, json.JSONDecodeError, KeyError):
        return None
    return None if latest is None else int(latest["metrics"]["step"])


KILL_ITERATIONS, KILL_EVERY = 100, 20


@pytest.fixture(scope="module")
def killed_run(local_ray, tmp_path_factory):
    """A 1-worker source run (its own 128x64 world: slower steps, so that the kill lands between two
    checkpoints) whose worker is SIGKILLed as soon as its first checkpoint is registered; Ray Train restarts it
    (max_failures=1). The loss goes to an MLflow run (a sqlite store) from Ray Train's controller. Returns the
    fit's summary, the checkpoint step registered when the worker was killed, the killed pids, the run's storage
    and the MLflow store and run."""
    tmp = tmp_path_factory.mktemp("killed")
    cfg = load_config(DEMO_CONFIG, [*tiny_overrides(tmp / "run", iterations=KILL_ITERATIONS, world_size="[128,64]"),
                                    "ray.max_failures=1", f"train.source.checkpoint_every={KILL_EVERY}",
                                    f"train.source.log_every={KILL_EVERY}"])
    ensure_world(cfg, log=lambda m: None)
    payload = {"stage": "source", "config": cfg.model_dump(mode="json")}
    storage = tmp / "ray"
    tracking_uri = f"sqlite:///{tmp}/mlflow.db"
    client = mlflow.MlflowClient(tracking_uri)
    experiment_id = client.create_experiment("killed", artifact_location=artifact_location_for(tracking_uri))
    mlflow_run_id = client.create_run(experiment_id).info.run_id
    sink = MlflowMetricSink(tracking_uri, mlflow_run_id)
    result: dict = {}
    errors: list[BaseException] = []

    def fit() -> None:
        try:
            result.update(RayTrainRunner(cfg.ray, storage).fit(payload, "killme", tmp / "model.safetensors",
                                                                metric_sink=sink))
        except BaseException as exc:  # re-raised below, in the test's thread
            errors.append(exc)

    thread = threading.Thread(target=fit)
    thread.start()
    killed, seen = [], None
    deadline = time.time() + 240
    while not killed and time.time() < deadline and thread.is_alive():
        seen = _latest_checkpoint_step(storage / "killme" / "checkpoint_manager_snapshot.json")
        if seen is not None:
            for pid in _train_worker_pids():
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        time.sleep(0.05)
    thread.join(timeout=300)
    assert not thread.is_alive(), "the killed run did not finish within 300 s of the kill"
    if errors:
        raise errors[0]
    assert killed, "no worker was killed (training finished before the first checkpoint was seen?)"
    return {"result": result, "seen": seen, "killed": killed, "run": storage / "killme",
            "model": tmp / "model.safetensors", "tracking_uri": tracking_uri, "mlflow_run_id": mlflow_run_id}


def test_a_killed_worker_resumes_from_the_checkpoint_registered_before_the_kill(killed_run):
    """Exactly from the checkpoint Ray Train had registered when the worker was killed (normally the first, step
    20: the worker is killed within ~50 ms of it, 20 steps before the next)."""
    result, seen = killed_run["result"], killed_run["seen"]
    assert (result["resumed_from"], result["steps_run"]) == (seen, KILL_ITERATIONS - seen)
    assert [step for step, _ in result["losses"]] == list(range(seen + KILL_EVERY, KILL_ITERATIONS + 1, KILL_EVERY))


def test_a_killed_attempts_loss_points_are_in_mlflow_and_the_resumed_attempts_follow_them(killed_run):
    """The points the killed worker reported (every 20 steps up to its checkpoint) reached the run through the
    controller; the restarted worker's points follow, later in time, each step once."""
    result, seen = killed_run["result"], killed_run["seen"]
    history = mlflow.MlflowClient(killed_run["tracking_uri"]).get_metric_history(killed_run["mlflow_run_id"],
                                                                                 TRAIN_LOSS)
    curve = sorted(history, key=lambda point: point.step)
    assert [point.step for point in curve] == list(range(KILL_EVERY, KILL_ITERATIONS + 1, KILL_EVERY))
    assert [point.step for point in curve if point.step <= seen] == list(range(KILL_EVERY, seen + 1, KILL_EVERY))
    resumed = [(point.step, point.value) for point in curve if point.step > seen]
    assert resumed == [(step, pytest.approx(loss)) for step, loss in result["losses"]]
    assert [point.timestamp for point in curve] == sorted(point.timestamp for point in curve)


def test_the_restarted_worker_is_a_new_process(killed_run):
    workers = killed_run["result"]["workers"]
    assert len(workers) == 1 and workers[0]["pid"] not in killed_run["killed"]


def test_a_killed_run_keeps_its_last_two_checkpoints_and_writes_the_final_model(killed_run):
    run = killed_run["run"]
    snapshot = json.loads((run / "checkpoint_manager_snapshot.json").read_text())
    kept = snapshot["checkpoint_results"]
    assert [entry["metrics"]["step"] for entry in kept] == [KILL_ITERATIONS - KILL_EVERY, KILL_ITERATIONS]
    # Registered checkpoints beyond the last two are deleted; a checkpoint the killed worker had already written
    # but Ray Train had not registered yet stays on disk (seen once under heavy load), so: a subset.
    on_disk = {p.name for p in run.glob("checkpoint_*") if p.is_dir()}
    assert {entry["checkpoint_dir_name"] for entry in kept} <= on_disk
    final = run / kept[-1]["checkpoint_dir_name"] / "model.safetensors"
    assert killed_run["model"].read_bytes() == final.read_bytes()
