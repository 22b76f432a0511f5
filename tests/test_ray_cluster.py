"""Two Ray nodes on one machine (ray.cluster_utils.Cluster): the 2 training workers land on both nodes."""
from __future__ import annotations

import pytest

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

from labelshift.pipeline import Pipeline  # noqa: E402
from labelshift.runners import LocalTrainRunner, RayTrainRunner  # noqa: E402
from labelshift.build import ensure_world  # noqa: E402
from labelshift.tracking import Tracker  # noqa: E402


@pytest.fixture
def two_node_cluster():
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_two_workers_are_placed_on_both_nodes(two_node_cluster, tiny_cfg, tmp_path):
    cfg = tiny_cfg("ray.num_workers=2", "ray.cpus_per_worker=1", out=tmp_path / "run", iterations=2)
    ensure_world(cfg, log=lambda m: None)
    payload = {"stage": "source", "config": cfg.model_dump(mode="json")}
    summary = RayTrainRunner(cfg.ray, tmp_path / "ray").fit(payload, "two-nodes", tmp_path / "model.safetensors")
    nodes = {node["NodeID"] for node in ray.nodes() if node["Alive"]}
    assert len(nodes) == 2
    placed = {worker["node_id"] for worker in summary["workers"]}
    assert placed == nodes, summary["workers"]
    assert sorted(worker["rank"] for worker in summary["workers"]) == [0, 1]
