"""The Ray backend: same numbers as the local backend, and actors land where their resources are."""

import json

import pytest
import ray

from sfl_ray.config_base import ConfigError
from sfl_ray.metrics.evaluate import Evaluator
from sfl_ray.metrics.writer import RunWriter
from sfl_ray.run import prepare
from sfl_ray.runtime.coordinator import Coordinator
from sfl_ray.runtime.launch import make_blueprint, run_experiment
from tests.helpers import small_config, without_timing


pytestmark = pytest.mark.slow  # starts Ray clusters

def _rows(cfg):
    with open(f"{cfg.run_dir()}/metrics.jsonl") as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("algo, extra", [
    ("splitfed_v2", []),
    ("splitfed_v1", ["cluster.num_servers=2"]),
    ("fedavg", ["train.clients_per_round=3"]),
])
def test_ray_and_local_give_identical_metrics(ray_cluster, run_dir, algo, extra):
    rows = {}
    for backend in ("local", "ray"):
        cfg = small_config(run_dir, f"algorithm.name={algo}", f"cluster.backend={backend}",
                           f"output.name={algo}-{backend}", "cluster.num_pools=2", *extra)
        algorithm_cls, data, shards, _ = prepare(cfg)
        run_experiment(algorithm_cls, cfg, data, shards)
        rows[backend] = _rows(cfg)
    assert len(rows["ray"]) == 2
    assert without_timing(rows["ray"]) == without_timing(rows["local"])
    assert rows["ray"][1]["train_loss"] < rows["ray"][0]["train_loss"]  # it did learn something


def test_pools_take_fractional_gpus_and_servers_whole_ones(ray_cluster, run_dir):
    from sfl_ray.runtime.ray_backend import start_actors

    cfg = small_config(run_dir, "algorithm.name=splitfed_v2", "cluster.num_pools=2", "cluster.client_gpus=0.5",
                       "cluster.server_gpus=1", "cluster.pool_cpus=0.5", "cluster.server_cpus=0.5",
                       "train.num_clients=4", "stop.rounds=1", "output.name=gpu")
    algorithm_cls, data, shards, _ = prepare(cfg)
    bp = make_blueprint(cfg, data)
    ex = start_actors(algorithm_cls, bp, data.train_x, data.train_y, shards, cfg.cluster)
    try:
        where = ex.placement()
        gpu_node = ray_cluster["gpu_node_id"]
        assert [p["node_id"] for p in where["pools"] + where["servers"]] == [gpu_node] * 3
        (server,) = where["servers"]
        assert len(server["gpu_ids"]) == 1
        pool_gpus = {g for p in where["pools"] for g in p["gpu_ids"]}
        assert all(len(p["gpu_ids"]) == 1 for p in where["pools"])
        assert server["gpu_ids"][0] not in pool_gpus  # a server's GPU is its own
        assert sorted(c for p in where["pools"] for c in p["clients"]) == [0, 1, 2, 3]
        # and a round runs on that topology (torch on the CPU here)
        coord = Coordinator(algorithm_cls(bp), ex, Evaluator(bp.build_parts(), data.test_x, data.test_y, 500),
                            RunWriter(cfg.run_dir()), num_clients=4, clients_per_round=4, stop=cfg.stop,
                            cost_model=cfg.cost_model, seed=cfg.seed)
        summary = coord.run()
        assert summary["rounds"] == 1 and summary["totals"]["bytes"] > 0
    finally:
        ex.shutdown()


def test_back_to_back_runs_on_a_full_gpu_node_each_find_a_whole_gpu_for_the_server(ray_cluster, run_dir):
    """Two pools of 0.5 GPU and a server block of 1 GPU fill the 2-GPU node. When the next run
    was placed while the last one's GPUs were still being released, its pools could land on both
    GPUs and its server block waited forever (a CI failure): shutdown returns only when the
    cluster has every CPU and GPU back."""
    import ray

    from sfl_ray.runtime.ray_backend import start_actors

    cfg = small_config(run_dir, "algorithm.name=splitfed_v2", "cluster.num_pools=2", "cluster.client_gpus=0.5",
                       "cluster.server_gpus=1", "cluster.pool_cpus=0.5", "cluster.server_cpus=0.5",
                       "cluster.task_timeout_s=60", "train.num_clients=4")
    algorithm_cls, data, shards, _ = prepare(cfg)
    bp = make_blueprint(cfg, data)
    idle = ray.available_resources()
    for _ in range(3):
        ex = start_actors(algorithm_cls, bp, data.train_x, data.train_y, shards, cfg.cluster)
        assert ex.held_resources() == {"CPU": 1.5, "GPU": 2.0}
        assert ray.available_resources().get("GPU", 0.0) == pytest.approx(idle["GPU"] - 2.0)
        ex.shutdown()
        back = ray.available_resources()
        assert (back["CPU"], back["GPU"]) == (pytest.approx(idle["CPU"]), pytest.approx(idle["GPU"]))


def test_a_request_the_cluster_cannot_hold_is_refused_before_any_actor(ray_cluster):
    from sfl_ray.config import ClusterConfig
    from sfl_ray.runtime.ray_backend import plan_topology

    with pytest.raises(ConfigError, match="cluster.client_gpus"):
        plan_topology(ClusterConfig(num_pools=4, client_gpus=0.5, server_gpus=1, pool_cpus=0.1, server_cpus=0.1),
                      num_clients=8, needs_server=True)
    with pytest.raises(ConfigError, match="cluster.server_gpus"):
        plan_topology(ClusterConfig(num_servers=3, server_gpus=1), num_clients=8, needs_server=True)
    assert plan_topology(ClusterConfig(client_gpus=0.25, server_gpus=1, pool_cpus=0.5, server_cpus=1),
                         num_clients=8, needs_server=True) == (4, 1)


def test_ampere_server_phase_on_ray_train_matches_the_actor_phase_on_the_link(ray_cluster, run_dir):
    """Ampere's server phase as a Ray Train TorchTrainer (DDP over 2 workers, Ray Data input):
    the same bytes cross the link as with the server actor, and the server block learns. The
    pool and the Train workers hold all 4 CPUs of the test cluster: the fit must not wait for a
    CPU for Ray Data (it once did, forever). The transfer reaches the Train workers by reference:
    the coordinator hands the fit handles, never the activations."""
    from sfl_ray.runtime.bulk import Bulk
    from tests.helpers import ray_coordinator

    assert ray.cluster_resources()["CPU"] == 4
    rows, requests = {}, []
    for trainer in ("actor", "ray_train"):
        cfg = small_config(run_dir, "algorithm.name=ampere", f"algorithm.server_trainer={trainer}",
                           "algorithm.server_epochs=3", "stop.rounds=1", "cluster.backend=ray",
                           "cluster.num_pools=1", "cluster.pool_cpus=2", "cluster.num_servers=2",
                           "cluster.server_cpus=1", f"output.name=ampere-{trainer}", "algorithm.server_lr=0.1",
                           "cluster.task_timeout_s=300", *(["cluster.num_servers=1"] if trainer == "actor" else []))
        if trainer == "actor":
            algorithm_cls, data, shards, _ = prepare(cfg)
            run_experiment(algorithm_cls, cfg, data, shards)
            rows[trainer] = _rows(cfg)
            continue
        coord, ex = ray_coordinator(cfg)
        real_fit = ex.fit_server
        ex.fit_server = lambda request: (requests.append(request), real_fit(request))[1]
        try:
            coord.run()
        finally:
            ex.shutdown()
        rows[trainer] = coord.writer.rows
    (request,) = requests
    handles = [v for z, y, _ in request.parts for v in (z, y)]
    assert len(request.parts) == cfg.train.num_clients and all(isinstance(h, Bulk) and isinstance(h.ref, ray.ObjectRef) for h in handles)
    assert request.num_samples == rows["ray_train"][1]["consolidated_samples"]
    a, r = rows["actor"], rows["ray_train"]
    assert [x["phase"] for x in r] == ["device", "transfer", "server", "server", "server"]
    assert [x["bytes_by_kind"] for x in r] == [x["bytes_by_kind"] for x in a]
    losses = [x["train_loss"] for x in r[2:]]
    assert losses[-1] < losses[0]
    assert all(x["server_flops"] > 0 for x in r[2:])
    assert r[-1]["eval_accuracy"] > 0.3
    assert r[2]["server_batch_devices_mean"] > 2  # batches mix devices on the Ray Data path too
