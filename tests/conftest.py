"""One Ray cluster per test session: a head node (CPUs only) and a worker node that declares
two GPUs it does not have, so GPU placement logic is testable on a CPU machine."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def ray_cluster():
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    gpu_node = cluster.add_node(num_cpus=2, num_gpus=2, resources={"gpu_node": 1})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
    yield {"cluster": cluster, "gpu_node_id": gpu_node.node_id}
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture
def run_dir(tmp_path):
    return str(tmp_path / "runs")


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
