"""Ray Train on a real local Ray instance: 2-worker loops, DDP equivalence, a killed worker resumes."""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from labelshift.pipeline import Pipeline  # noqa: E402
from labelshift.runners import LocalTrainRunner, RayTrainRunner  # noqa: E402
from labelshift.build import ensure_world  # noqa: E402
from labelshift.tracking import Tracker  # noqa: E402


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _make_world(cfg) -> None:
    ensure_world(cfg, log=lambda m: None)


def test_every_loop_runs_on_two_workers(local_ray, tiny_cfg, tmp_path):
    cfg = tiny_cfg("ray.num_workers=2", "ray.cpus_per_worker=1", out=tmp_path / "run")
    runner = RayTrainRunner(cfg.ray, tmp_path / "ray")
    summary = Pipeline(cfg, runner, Tracker(), log=lambda m: None).run()
    for stage in ("pretrain", "refine", "distill"):
        metrics = summary["stages"][stage]
        assert metrics["world_size"] == 2 and metrics["steps_run"] == 4, (stage, metrics)
        assert metrics["final_loss"] > 0
    assert summary["rows"][-1]["model"] == "+self-distillation"


def test_two_ddp_workers_give_the_losses_of_one_worker(local_ray, tiny_cfg, tmp_path):
    """Same global batch (4) and seed; frozen BatchNorm so that batch statistics cannot differ."""
    cfg = tiny_cfg("model.frozen_bn=true", "ray.num_workers=2", "ray.cpus_per_worker=1", "train.source.lr=0.05",
                   out=tmp_path / "run", iterations=6)
    _make_world(cfg)
    payload = {"stage": "source", "config": cfg.model_dump(mode="json")}
    two = RayTrainRunner(cfg.ray, tmp_path / "ray").fit(payload, "ddp2", tmp_path / "two.safetensors")
    one = LocalTrainRunner(tmp_path / "local").fit(payload, "one", tmp_path / "one.safetensors")
    assert two["world_size"] == 2 and one["world_size"] == 1
    steps = [s for s, _ in one["losses"]]
    assert steps == [s for s, _ in two["losses"]] == [1, 2, 3, 4, 5, 6]
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
    this module started, never another session's workers on the same machine."""
    me = os.getpid()
    while pid > 1:
        pid = _parent_of(pid)
        if pid == me:
            return True
    return False


def _train_worker_pids() -> list[int]:
    """Ray Train worker processes (titled ``ray::RayTrainWorker...``) of the Ray instance this test started."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if (entry.name.isdigit() and b"RayTrainWorker" in (entry / "cmdline").read_bytes()
                    and _descends_from_this_process(int(entry.name))):
                pids.append(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue
    return pids


def test_killed_worker_resumes_from_the_last_checkpoint(local_ray, tiny_cfg, tmp_path):
    iterations = 240
    cfg = tiny_cfg("ray.max_failures=1", "train.source.checkpoint_every=20", "train.source.log_every=20",
                   out=tmp_path / "run", iterations=iterations, world_size="[128,64]")
    _make_world(cfg)
    payload = {"stage": "source", "config": cfg.model_dump(mode="json")}
    storage = tmp_path / "ray"
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(
        RayTrainRunner(cfg.ray, storage).fit(payload, "killme", tmp_path / "model.safetensors")))
    thread.start()
    killed = []
    deadline = time.time() + 240
    while not killed and time.time() < deadline and thread.is_alive():
        if (storage / "killme" / "checkpoint_manager_snapshot.json").is_file():  # a checkpoint is registered
            for pid in _train_worker_pids():
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        time.sleep(0.05)
    thread.join(timeout=300)
    assert killed, "no worker was killed (training finished before the first checkpoint was seen?)"
    assert 0 < result["resumed_from"] < iterations, result
    assert result["resumed_from"] % 20 == 0
    assert result["steps_run"] == iterations - result["resumed_from"]
    assert result["losses"][-1][0] == iterations
    assert Path(tmp_path / "model.safetensors").stat().st_size > 0
