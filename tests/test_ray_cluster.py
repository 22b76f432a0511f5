"""Two Ray nodes on one machine (ray.cluster_utils.Cluster): the 2 training workers land on both nodes.

This test starts its own Ray (``own_ray``): it runs before every other test of the run, while the session's
shared ``local_ray`` instance is not up yet (tests/conftest.py).
"""
from __future__ import annotations

import pytest

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

from labelshift.runners import RayTrainRunner  # noqa: E402

pytestmark = pytest.mark.own_ray


@pytest.fixture
def two_node_cluster(ray_not_started):
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_two_workers_are_placed_on_both_nodes(two_node_cluster, shared_cfg, tmp_path):
    cfg = shared_cfg("ray.num_workers=2", "ray.cpus_per_worker=1", iterations=2)
    payload = {"stage": "source", "config": cfg.model_dump(mode="json")}
    summary = RayTrainRunner(cfg.ray, tmp_path / "ray").fit(payload, "two-nodes", tmp_path / "model.safetensors")
    nodes = {node["NodeID"] for node in ray.nodes() if node["Alive"]}
    assert len(nodes) == 2
    placed = {worker["node_id"] for worker in summary["workers"]}
    assert placed == nodes, summary["workers"]
    assert sorted(worker["rank"] for worker in summary["workers"]) == [0, 1]
    assert (summary["world_size"], summary["steps_run"]) == (2, 2)
