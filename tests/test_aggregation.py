"""FedAvg as pure maths, and what each baseline averages."""

import numpy as np

from sfl_ray.algorithms.common import client_order, weighted_average
from sfl_ray.algorithms.fedavg import FedAvg
from sfl_ray.runtime.protocol import ClientReply, RoundRuntime
from tests.helpers import local_coordinator, small_config


def test_weighted_average_is_the_sample_weighted_mean():
    a = {"w": np.array([1.0, 2.0], np.float32), "n": np.array(3)}
    b = {"w": np.array([4.0, 8.0], np.float32), "n": np.array(7)}
    out = weighted_average([(a, 1.0), (b, 3.0)])
    np.testing.assert_allclose(out["w"], [(1 + 3 * 4) / 4, (2 + 3 * 8) / 4])
    assert out["w"].dtype == np.float32
    assert out["n"] == 7  # integer buffers: the largest count


class _FakeRound(RoundRuntime):
    """Hands back prepared replies, so the schedule's aggregation is checked alone."""

    num_servers = 0

    def __init__(self, replies):
        self._replies = replies

    def clients(self, ids, down, parallel=True, program="client_program"):
        return [self._replies[c] for c in ids]

    def server(self, method, *args, index=0):
        raise AssertionError("FedAvg has no server")


def test_fedavg_round_is_sample_weighted(run_dir):
    cfg = small_config(run_dir, "algorithm.name=fedavg")
    coord, _ = local_coordinator(cfg)
    algo: FedAvg = coord.algorithm
    rng = np.random.default_rng(0)
    states = {c: {"x": rng.normal(size=(3,)).astype(np.float32)} for c in range(3)}
    n = {0: 10, 1: 30, 2: 60}
    replies = {c: ClientReply(client=c, up={"weights": states[c]}, info={"num_samples": n[c]}) for c in states}
    algo.global_model = {"x": np.zeros(3, np.float32)}
    algo.run_round(_FakeRound(replies), 1, [0, 1, 2])
    expect = sum(n[c] * states[c]["x"].astype(np.float64) for c in states) / 100
    np.testing.assert_allclose(algo.global_model["x"], expect, rtol=1e-6)


def test_splitfed_v1_keeps_a_replica_per_client_and_averages_them(run_dir):
    cfg = small_config(run_dir, "algorithm.name=splitfed_v1", "train.num_clients=3", "stop.rounds=1")
    coord, ex = local_coordinator(cfg)
    coord.algorithm.init_global(coord.evaluator.parts)
    row = coord.run_one_round(1)
    server = ex.servers[0].program
    assert sorted(server.replicas) == [0, 1, 2] and row["server_replicas"] == 3
    reps = server.replica_weights()
    key = next(k for k in reps[0] if k.endswith("weight"))
    assert not np.allclose(reps[0][key], reps[1][key])  # each replica trained on its own client
    sizes = [len(ex.pool.shards[c]) for c in range(3)]
    expect = weighted_average([(reps[c], float(sizes[c])) for c in range(3)])
    for k in expect:
        np.testing.assert_allclose(coord.algorithm.global_server[k], expect[k], rtol=1e-6, atol=1e-7)


def test_splitfed_v2_trains_one_server_block_in_sequence(run_dir):
    cfg = small_config(run_dir, "algorithm.name=splitfed_v2", "train.num_clients=3", "stop.rounds=1")
    coord, ex = local_coordinator(cfg)
    coord.algorithm.init_global(coord.evaluator.parts)
    program = ex.servers[0].program
    calls, real = [], program.train_step
    models_seen = set()

    def spy(client, arrays, info):
        calls.append(client)
        models_seen.add(id(program.model))
        return real(client, arrays, info)

    program.train_step = spy
    before = {k: v.copy() for k, v in program.get_weights().items()}
    coord.run_one_round(1)
    order = client_order(cfg.seed, 1, [0, 1, 2])
    # Each client's batches arrive as one contiguous run, in the round's random order.
    runs = [c for i, c in enumerate(calls) if i == 0 or calls[i - 1] != c]
    assert runs == order
    assert len(models_seen) == 1
    assert any(not np.array_equal(before[k], v) for k, v in program.get_weights().items())
