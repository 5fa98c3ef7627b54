"""The device<->server exchange on Ray: channel pairs between co-located pools and server blocks
(actor calls across nodes), with numbers bit-identical to actor calls and to the local backend."""

import json

import pytest

from sfl_ray.run import prepare
from sfl_ray.runtime.launch import make_blueprint, run_experiment
from tests.helpers import ray_coordinator, small_config, without_timing

pytestmark = pytest.mark.slow  # starts Ray actors

# Pools and server block all on the test cluster's GPU node: every pair can use a channel.
ON_ONE_NODE = ("cluster.num_pools=2", "cluster.client_gpus=0.5", "cluster.server_gpus=1", "cluster.pool_cpus=0.5",
               "cluster.server_cpus=0.5")


def _rows(cfg):
    with open(f"{cfg.run_dir()}/metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def test_colocated_pairs_get_channels_and_distant_ones_actor_calls(ray_cluster, run_dir):
    from sfl_ray.runtime.ray_backend import start_actors

    # a server block of 2 CPUs fills a node of the test cluster: both pools land on the other one
    apart = ("cluster.num_pools=2", "cluster.pool_cpus=1", "cluster.server_cpus=2")
    for extra, expected in ((ON_ONE_NODE, 2), (apart, 0)):
        cfg = small_config(run_dir, "algorithm.name=splitfed_v2", *extra)
        algorithm_cls, data, shards, _ = prepare(cfg)
        ex = start_actors(algorithm_cls, make_blueprint(cfg, data), data.train_x, data.train_y, shards, cfg.cluster)
        try:
            where = ex.placement()
            server_node = where["servers"][0]["node_id"]
            together = sum(p["node_id"] == server_node for p in where["pools"])
            assert together == expected
            assert ex.links == {"channels": together, "actor_calls": 2 - together}
        finally:
            ex.shutdown()


@pytest.mark.parametrize("algo", ["splitfed_v2", "fsl_sage"])
def test_channels_give_the_numbers_of_actor_calls_and_of_the_local_backend(ray_cluster, run_dir, algo):
    rows = {}
    for name, extra in (("local", ["cluster.backend=local"]), ("channels", ["cluster.exchange=channels"]),
                        ("actor_calls", ["cluster.exchange=actor_calls"])):
        cfg = small_config(run_dir, f"algorithm.name={algo}", "train.optimizer=adam", "train.lr=0.001",
                           f"output.name={algo}-{name}", *ON_ONE_NODE, *extra)
        algorithm_cls, data, shards, _ = prepare(cfg)
        run_experiment(algorithm_cls, cfg, data, shards)
        rows[name] = without_timing(_rows(cfg))
    assert rows["channels"] == rows["local"] == rows["actor_calls"]
    assert rows["channels"][0]["bytes_up"] > 0


def test_an_idle_server_block_sleeps_on_its_channels(ray_cluster, run_dir):
    """Each of the block's channel threads sleeps on its pipe's socket until a request is there
    (Ray's channel read, the path before, polled). Two pools' threads waiting for requests must
    leave the cores to the clients."""
    import time

    import numpy as np
    import psutil
    import ray

    from sfl_ray.runtime.ray_backend import start_actors

    cfg = small_config(run_dir, "algorithm.name=splitfed_v2", *ON_ONE_NODE)
    algorithm_cls, data, shards, _ = prepare(cfg)
    ex = start_actors(algorithm_cls, make_blueprint(cfg, data), data.train_x, data.train_y, shards, cfg.cluster)
    try:
        assert ex.links["channels"] == 2
        block = psutil.Process(ex.placement()["servers"][0]["pid"])
        time.sleep(0.5)  # past start-up
        before, t0 = block.cpu_times(), time.monotonic()
        time.sleep(2.0)
        after, wall = block.cpu_times(), time.monotonic() - t0
        busy = (after.user + after.system) - (before.user + before.system)
        assert busy < 0.15 * wall, f"idle server block used {busy:.2f} CPU-s in {wall:.1f} s"
        # and a sleeping thread still answers (here the server program's error for a malformed request)
        answer = ray.get(ex.pools[1].call_server.remote(0, "train_step", {"activations": np.zeros((2, 3), np.float32),
                                                                          "labels": np.zeros(2, np.int64)}))
        assert "server block 0 failed in 'train_step'" in answer
    finally:
        ex.shutdown()


def test_a_server_error_reaches_the_client_through_the_channel(ray_cluster, run_dir):
    import numpy as np
    import ray

    from sfl_ray.runtime.ray_backend import start_actors

    cfg = small_config(run_dir, "algorithm.name=splitfed_v2", *ON_ONE_NODE)
    algorithm_cls, data, shards, _ = prepare(cfg)
    ex = start_actors(algorithm_cls, make_blueprint(cfg, data), data.train_x, data.train_y, shards, cfg.cluster)
    try:
        assert ex.links["channels"] == 2
        # a malformed request (activations of the wrong shape): the server program raises
        down = {"weights": ex.server_control(0, "get_weights")}
        bad = ray.get(ex.pools[0].call_server.remote(0, "train_step", {"activations": np.zeros((2, 3), np.float32),
                                                                      "labels": np.zeros(2, np.int64)}))
        assert "server block 0 failed in 'train_step'" in bad and down
    finally:
        ex.shutdown()


def test_a_sequential_round_on_channels_runs_in_turns_with_the_numbers_of_one_by_one(ray_cluster, run_dir):
    """SplitFed v2 is sequential: one client at a time at the server block. On channels every pool
    gets its clients at once and the block serves them in turns (runtime.turns); on actor calls
    the coordinator calls one client after another. Same rows, and the turns were taken."""
    rows, passed = {}, {}
    for exchange in ("channels", "actor_calls"):
        cfg = small_config(run_dir, "algorithm.name=splitfed_v2", "train.optimizer=adam", "train.lr=0.001",
                           "train.num_clients=6", "train.clients_per_round=5", f"output.name=turns-{exchange}",
                           *ON_ONE_NODE, f"cluster.exchange={exchange}")
        coord, ex = ray_coordinator(cfg)
        try:
            summary = coord.run()
            passed[exchange] = ex.placement()["servers"][0]["turns_passed"]
        finally:
            ex.shutdown()
        rows[exchange] = without_timing(_rows(cfg))
    assert rows["channels"] == rows["actor_calls"]
    assert passed == {"channels": 5 * summary["rounds"], "actor_calls": 0}


@pytest.mark.parametrize("algo,servers", [("splitfed_v2", 1), ("sglr", 1), ("splitfed_v1", 2)])
def test_server_blocks_in_the_pools_give_the_numbers_of_the_local_backend(ray_cluster, run_dir, algo, servers):
    """cluster.exchange=in_pool: pool p hosts server block p in its own process (no server block
    actor, no pipe); its requests are function calls. The rows, server FLOPs and bytes included,
    are the local backend's, under Adam (per-client and server optimizer state)."""
    rows = {}
    for name, extra in (("local", ["cluster.backend=local"]),
                        ("in_pool", ["cluster.exchange=in_pool", "cluster.pool_cpus=0.5"])):
        cfg = small_config(run_dir, f"algorithm.name={algo}", "train.optimizer=adam", "train.lr=0.001",
                           "train.num_clients=5", f"cluster.num_servers={servers}", f"output.name={algo}-{name}",
                           *extra)
        if name == "local":
            algorithm_cls, data, shards, _ = prepare(cfg)
            run_experiment(algorithm_cls, cfg, data, shards)
        else:
            coord, ex = ray_coordinator(cfg)
            try:
                where = ex.placement()
                assert ex.links == {"channels": 0, "actor_calls": 0, "in_pool": servers}
                assert len(ex.pools) == servers and ex.servers == ex.pools
                # each block is in its pool's process: no other actor process was started
                assert [s["pid"] for s in where["servers"]] == [p["pid"] for p in where["pools"]]
                assert len({p["pid"] for p in where["pools"]}) == servers
                coord.run()
            finally:
                ex.shutdown()
        rows[name] = without_timing(_rows(cfg))
    assert rows["in_pool"] == rows["local"]
    assert all(r["server_flops"] > 0 and r["bytes_up"] > 0 for r in rows["in_pool"])


def test_server_blocks_in_the_pools_take_one_pool_each(ray_cluster, run_dir):
    from sfl_ray.config_base import ConfigError
    from sfl_ray.runtime.ray_backend import plan_topology

    cfg = small_config(run_dir, "algorithm.name=splitfed_v2", "cluster.exchange=in_pool", "cluster.num_pools=2")
    with pytest.raises(ConfigError, match="num_pools must equal cluster.num_servers=1"):
        plan_topology(cfg.cluster, 4, True)
    cfg = small_config(run_dir, "cluster.exchange=in_pool", "cluster.num_servers=2", "cluster.server_gpus=1",
                       "cluster.client_gpus=0.25")
    assert plan_topology(cfg.cluster, 4, True) == (2, 2)  # the test cluster's 2 GPUs: one whole each
    assert plan_topology(cfg.cluster, 4, False)[1] == 0  # FedAvg: no block, pools as usual
    cfg = small_config(run_dir, "cluster.exchange=in_pool", "cluster.num_servers=3", "cluster.server_gpus=1")
    with pytest.raises(ConfigError, match="3 pools hosting server blocks x 1 GPU > the cluster's 2 GPUs"):
        plan_topology(cfg.cluster, 4, True)
