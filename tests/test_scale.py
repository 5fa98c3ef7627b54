"""Hundreds and thousands of clients: 500 in a round with every upload aggregated, 10,000
registered with no per-client object until a client is sampled, and 1,000 on a 4-node cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from sfl_ray.algorithms.common import weighted_average
from sfl_ray.data.partition import ClientShards, Partition, partition
from sfl_ray.metrics.evaluate import Evaluator
from sfl_ray.metrics.writer import RunWriter
from sfl_ray.run import prepare
from sfl_ray.runtime.checkpoint import unpack
from sfl_ray.runtime.coordinator import Coordinator
from sfl_ray.runtime.launch import make_blueprint, run_experiment
from sfl_ray.runtime.local_backend import LocalExecutor
from tests.helpers import local_coordinator, small_config, without_timing

ROOT = Path(__file__).resolve().parents[1]


def _many(run_dir: str, algo: str, clients: int, *extra: str):
    """`clients` clients of two MNIST samples each, all sampled, one round: the runtime's work per
    client, not the model's, is what grows."""
    return small_config(run_dir, f"algorithm.name={algo}", f"train.num_clients={clients}",
                        f"train.clients_per_round={clients}", f"data.max_train_samples={2 * clients}",
                        "data.max_test_samples=100", "train.batch_size=2", "partition.name=iid", "stop.rounds=1",
                        f"output.name={algo}-{clients}", *extra)


def test_500_clients_fedavg_round_averages_every_clients_upload(run_dir):
    cfg = _many(run_dir, "fedavg", 500)
    coord, ex = local_coordinator(cfg)
    summary = coord.run()
    row = coord.writer.rows[0]
    assert summary["rounds"] == 1 and row["clients"] == 500
    model_bytes = sum(v.nbytes for v in coord.algorithm.global_model.values())
    assert row["bytes_by_kind"]["up/weights"] == 500 * model_bytes
    assert len(ex.pool.state) == 500  # each client's optimizer state, kept for its next round
    # Every client's program again, alone, in a fresh pool, from the same start: the global model
    # must be their sample-weighted average, in the round's client order, to the last bit.
    algorithm_cls, data, shards, _ = prepare(cfg)
    fresh = LocalExecutor(algorithm_cls, make_blueprint(cfg, data), data.train_x, data.train_y, shards, 0)
    algo = algorithm_cls(fresh.pool.blueprint)
    algo.init_global(fresh.pool.blueprint.build_parts())
    ups = []
    for c in range(500):
        r = fresh.pool.run("client_program", c, 1, {"weights": algo.global_model}, "off")
        assert r.error is None
        ups.append((r.up["weights"], float(r.info["num_samples"])))
    expect = weighted_average(ups)
    assert all(np.array_equal(coord.algorithm.global_model[k], expect[k]) for k in expect)
    # and that average moved the model: leaving one client out would not give the same weights
    assert not all(np.array_equal(weighted_average(ups[:-1])[k], expect[k]) for k in expect)


def test_500_clients_splitfed_v2_round_averages_every_device_block(run_dir):
    cfg = _many(run_dir, "splitfed_v2", 500)
    coord, ex = local_coordinator(cfg)
    seen: list = []
    run_clients = ex.run_clients

    def record(*args, **kw):
        replies = run_clients(*args, **kw)
        seen.extend((r.client, r.up["weights"], r.info["num_samples"]) for r in replies)
        return replies

    ex.run_clients = record
    coord.run()
    row = coord.writer.rows[0]
    assert row["clients"] == 500 and sorted(c for c, _, _ in seen) == list(range(500))
    # one server step per client batch: 500 activations up, 500 gradients down
    act = 4 * int(np.prod(coord.evaluator.parts.act_shape))
    assert row["bytes_by_kind"]["up/activations"] == 1000 * act
    total = sum(n for _, _, n in seen)
    for k, v in coord.algorithm.global_device.items():
        expect = sum(n * w[k].astype(np.float64) for _, w, n in seen) / total
        np.testing.assert_allclose(v, expect, rtol=1e-5, atol=1e-7)


def test_10k_registered_clients_start_without_building_10k_client_objects(run_dir):
    cfg = small_config(run_dir, "algorithm.name=fedavg", "train.num_clients=10000", "train.clients_per_round=100",
                       "data.max_train_samples=10000", "train.batch_size=8", "partition.name=iid",
                       "train.optimizer=adam", "train.lr=0.001", "stop.rounds=2", "output.name=registered")
    algorithm_cls, data, shards, _ = prepare(cfg)
    assert isinstance(shards, Partition) and len(shards) == 10_000
    bp = make_blueprint(cfg, data)

    def retained(parts) -> tuple[int, LocalExecutor]:
        """Python memory a new executor keeps (tracemalloc: every Python object, numpy arrays too)."""
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        ex = LocalExecutor(algorithm_cls, bp, data.train_x, data.train_y, parts, 0)
        after = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        return after - before, ex

    hundred = partition(data.train_y, cfg.partition, 100, cfg.seed)
    retained(hundred)  # first builds warm caches up
    few, _ = retained(hundred)
    many, ex = retained(shards)
    # a dict entry, an empty state and an index array per client: 1.5 MB more for 10,000
    assert many - few < 200_000, (few, many)
    assert isinstance(ex.pool.shards, ClientShards) and ex.pool.shards.partition is shards
    assert len(ex.pool.state) == 0 and ex.client_states() == {}
    assert ex.pool.ping()["clients"] == range(10_000) and ex.pool.ping()["client_states"] == 0

    coord = Coordinator(algorithm_cls(bp), ex, Evaluator(bp.build_parts(), data.test_x, data.test_y, 500),
                        RunWriter(cfg.run_dir()), num_clients=10_000, clients_per_round=100, stop=cfg.stop,
                        cost_model=cfg.cost_model, seed=cfg.seed)
    asked: list = []
    client_states = ex.client_states

    def spy(clients=None):
        asked.append(None if clients is None else sorted(clients))
        return client_states(clients)

    ex.client_states = spy
    ex.recover = lambda deadline_s=180.0: None  # keep round-start snapshots as on Ray (incremental ones)
    coord.run()
    touched = set(coord.sample(1)) | set(coord.sample(2))
    assert [r["clients"] for r in coord.writer.rows] == [100, 100]
    assert set(ex.pool.state) == touched and ex.pool.ping()["client_states"] == len(touched)
    # the snapshot after round 2 fetched round 2's clients only, and holds every touched client
    assert asked[-1] == coord.sample(2) and len(asked[-1]) == 100
    snap = coord._after[1]["clients"]
    full = unpack(client_states())  # as they cross to the coordinator: packed (tensors as arrays)
    assert set(snap) == set(full) == touched
    for c in touched:  # Adam's moments of every touched client, as a full gather sees them
        a, b = snap[c]["optim/model"][1]["state"], full[c]["optim/model"][1]["state"]
        assert a.keys() == b.keys() and len(a) == len(list(ex.pool.parts.full().parameters()))
        assert all(torch.equal(a[i]["exp_avg"], b[i]["exp_avg"]) for i in a)
    # restored into a fresh pool: exactly the touched clients have state, untouched none
    fresh = LocalExecutor(algorithm_cls, bp, data.train_x, data.train_y, shards, 0)
    fresh.load_client_states(snap)
    assert set(fresh.pool.state) == touched
    again = unpack(fresh.client_states())
    c = min(touched)
    assert torch.equal(again[c]["optim/model"][1]["state"][0]["exp_avg_sq"],
                       full[c]["optim/model"][1]["state"][0]["exp_avg_sq"])


@pytest.mark.slow
def test_500_clients_fedavg_and_splitfed_v2_on_ray_match_local(ray_cluster, run_dir):
    for algo in ("fedavg", "splitfed_v2"):
        rows = {}
        for backend in ("local", "ray"):
            cfg = _many(run_dir, algo, 500, f"cluster.backend={backend}", f"output.name={algo}-{backend}",
                        "cluster.num_pools=2", "cluster.pool_cpus=0.5", "cluster.server_cpus=0.5")
            algorithm_cls, data, shards, _ = prepare(cfg)
            run_experiment(algorithm_cls, cfg, data, shards)
            with open(f"{cfg.run_dir()}/metrics.jsonl") as f:
                rows[backend] = [json.loads(line) for line in f]
        assert rows["ray"][0]["clients"] == 500
        assert without_timing(rows["ray"]) == without_timing(rows["local"]), algo


@pytest.mark.slow
def test_1000_clients_on_4_nodes_pools_spread_by_fractional_gpus_servers_on_whole_ones(tmp_path):
    # Its own cluster (4 nodes, one fake GPU each), so in its own process: this session's Ray is
    # joined to the conftest cluster.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "scale_cluster.py"), str(tmp_path / "runs")],
                          env=env, capture_output=True, text=True, timeout=900, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    nodes = out["nodes"]
    assert len(nodes) == 4 and all(n["GPU"] == 1 for n in nodes.values())
    pools, (server,) = out["placement"]["pools"], out["placement"]["servers"]
    assert len(server["gpu_ids"]) == 1  # a whole GPU, its node's only one: no pool shares that node
    assert server["node_id"] not in {p["node_id"] for p in pools}
    per_node: dict = {}
    for p in pools:
        assert len(p["gpu_ids"]) == 1
        per_node[p["node_id"]] = per_node.get(p["node_id"], 0) + 1
    assert len(per_node) >= 2 and max(per_node.values()) <= 2  # 0.5 GPU each, on 1-GPU nodes: spread
    for node, n in per_node.items():  # two pools on a node share its one GPU, half each
        assert len({tuple(p["gpu_ids"]) for p in pools if p["node_id"] == node}) == 1
    assert sorted(c for p in pools for c in p["clients"]) == list(range(1000))
    assert all(p["client_states"] == 0 for p in pools)  # nothing built for a client before it runs
    row = out["row"]
    assert row["clients"] == 1000 and row["server_steps"] == 1000 and np.isfinite(row["train_loss"])
    assert sum(out["client_states_after"]) == 1000
