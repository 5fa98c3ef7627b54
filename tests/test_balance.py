"""Balanced pools (cluster.balance_pools): in a parallel round a pool that has run its own
clients takes portable programs of stateless clients from a busier pool; the numbers stay those of
the local backend, and state never ends up on a pool that is not the client's own."""

from __future__ import annotations

import time
from typing import Literal

import numpy as np
import pytest
import torch
from pydantic import Field

from sfl_ray import registry
from sfl_ray.algorithms.fedavg import FedAvg, FedAvgConfig
from sfl_ray.config import load_config
from sfl_ray.data.partition import Partition
from sfl_ray.run import prepare
from sfl_ray.runtime.launch import make_blueprint
from sfl_ray.runtime.pool import ClientPool
from sfl_ray.runtime.wire import module_weights
from tests.helpers import local_coordinator, ray_coordinator, small_config, without_timing


class SlowEvenConfig(FedAvgConfig):
    name: Literal["slow_even_fedavg"] = Field("slow_even_fedavg", description="FedAvg whose even clients "
                                              "take 60 ms longer (the pool hosting them is the busier one).")


class SlowEvenFedAvg(FedAvg):
    name = "slow_even_fedavg"
    config_cls = SlowEvenConfig

    def client_program(self, ctx, down):
        if ctx.client % 2 == 0:
            time.sleep(0.06)  # wall time only: the numbers are FedAvg's
        return super().client_program(ctx, down)


@pytest.fixture
def slow_even():
    saved = registry.snapshot()
    registry.register_algorithm(SlowEvenFedAvg)
    yield
    registry.restore(saved)


def _configs(run_dir: str, *extra: str, algorithm: str = "slow_even_fedavg"):
    common = [f"algorithm.name={algorithm}", "train.num_clients=16", "data.max_train_samples=480",
              "train.batch_size=16", "stop.rounds=3", "cluster.num_pools=2", *extra]
    return (small_config(run_dir, *common, "output.name=local"),
            small_config(run_dir, *common, "cluster.backend=ray", "output.name=ray"))


def _run_both(run_dir: str, *extra: str, algorithm: str = "slow_even_fedavg"):
    local_cfg, ray_cfg = _configs(run_dir, *extra, algorithm=algorithm)
    local, _ = local_coordinator(local_cfg)
    local.run()
    coord, ex = ray_coordinator(ray_cfg)
    try:
        coord.run()
        states = ex.client_states()
    finally:
        ex.shutdown()
    return local, coord, ex, states


@pytest.mark.slow
def test_a_free_pool_takes_clients_of_a_busy_one_and_the_numbers_stay_local(ray_cluster, run_dir, slow_even):
    local, coord, ex, states = _run_both(run_dir)
    # Fresh pools hold no state and plain SGD leaves none: clients of the slow pool (even ids)
    # move to the other in every round.
    assert ex.guest_runs > 0
    assert ex.stateful == set()
    assert states == {}  # plain SGD: no client state anywhere, nothing left behind by a guest
    assert without_timing(coord.writer.rows) == without_timing(local.writer.rows)


@pytest.mark.slow
def test_state_a_guest_makes_goes_to_its_own_pool_and_the_client_stays_there(ray_cluster, run_dir, slow_even):
    local_cfg, ray_cfg = _configs(run_dir, "train.optimizer=adam")
    local, _ = local_coordinator(local_cfg)
    local.run()
    coord, ex = ray_coordinator(ray_cfg)
    moved: list[int] = []
    dispatch = ex._dispatch

    def watch(*args, **kwargs):
        before = ex.guest_runs
        out = dispatch(*args, **kwargs)
        moved.append(ex.guest_runs - before)
        return out

    ex._dispatch = watch
    try:
        coord.run()
        import ray
        per_pool = [set(ray.get(p.get_state.remote(), timeout=60)) for p in ex.pools]
    finally:
        ex.shutdown()
    # Round 1: no client has state yet, so the slow pool's tail moves, and the Adam moments its
    # programs made went back to the clients' own pool. From then on Adam's moments keep every
    # client at its pool.
    assert moved[0] > 0 and moved[1:] == [0, 0]
    assert ex.stateful == set(range(16))
    assert per_pool == [set(range(0, 16, 2)), set(range(1, 16, 2))]
    assert without_timing(coord.writer.rows) == without_timing(local.writer.rows)


@pytest.mark.slow
def test_balancing_off_keeps_every_client_at_its_pool(ray_cluster, run_dir, slow_even):
    local, coord, ex, _ = _run_both(run_dir, "cluster.balance_pools=false")
    assert ex.guest_runs == 0
    assert [r["round"] for r in coord.writer.rows] == [1, 2, 3]
    assert without_timing(coord.writer.rows) == without_timing(local.writer.rows)


def _pools(tmp_path, *overrides: str):
    """Pools 0 and 1 of 2 in this process (client c is hosted by pool c % 2)."""
    cfg = load_config(None, ["data.max_train_samples=200", "train.num_clients=4", "train.batch_size=25",
                             f"output.dir={tmp_path}", "algorithm.name=fedavg", *overrides])
    algorithm_cls, data, shards, _ = prepare(cfg)
    bp = make_blueprint(cfg, data)
    part = Partition.from_lists(shards)
    pools = [ClientPool(algorithm_cls, bp, data.train_x, data.train_y, part.hosted(p, 2), []) for p in (0, 1)]
    return pools, module_weights(pools[0].parts.full())


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_a_guest_leaves_its_state_to_its_own_pool(tmp_path, momentum):
    pools, weights = _pools(tmp_path, f"train.momentum={momentum}")
    home, _ = _pools(tmp_path / "b", f"train.momentum={momentum}")
    guest = pools[1].run("client_program", 0, 1, {"weights": weights}, "off")  # client 0 on pool 1
    at_home = home[0].run("client_program", 0, 1, {"weights": weights}, "off")
    assert guest.error is None and at_home.error is None
    for k in guest.up["weights"]:  # the same arithmetic wherever it runs
        assert np.array_equal(guest.up["weights"][k], at_home.up["weights"][k]), k
    assert 0 not in pools[1].state and pools[1].get_state() == {}  # nothing stays on the guest's host
    if momentum == 0.0:  # plain SGD keeps nothing: the client may move again
        assert not guest.keeps_state and guest.guest_state is None and home[0].get_state() == {}
        return
    assert guest.keeps_state and at_home.keeps_state  # momentum buffers are the client's state
    pools[0].put_state({0: guest.guest_state})
    moved, kept = pools[0].get_state()[0], home[0].get_state()[0]
    a, b = moved["optim/model"][1]["state"], kept["optim/model"][1]["state"]
    assert a.keys() == b.keys() and all(np.array_equal(a[i]["momentum_buffer"], b[i]["momentum_buffer"]) for i in a)
    with pytest.raises(KeyError):
        pools[1].put_state({0: guest.guest_state})  # a pool takes state only for clients it hosts


def test_an_optimizer_without_per_parameter_state_is_not_kept(tmp_path):
    pools, weights = _pools(tmp_path)
    pools[0].run("client_program", 0, 1, {"weights": weights}, "off")
    assert "optim/model" not in pools[0].state[0]
    pools, weights = _pools(tmp_path / "adam", "train.optimizer=adam")
    pools[0].run("client_program", 0, 1, {"weights": weights}, "off")
    _, opt = pools[0].state[0]["optim/model"]
    assert all(torch.count_nonzero(s["exp_avg_sq"]) > 0 for s in opt["state"].values())


@pytest.mark.slow
def test_clients_of_unequal_size_give_the_local_numbers_on_balanced_pools(ray_cluster, run_dir):
    """Quantity skew (partition.sizes=lognormal): the weighted average of clients that differ
    tenfold in size, wherever they ran, is the local backend's."""
    skew = ("partition.sizes=lognormal", "partition.size_sigma=1.5", "train.optimizer=adam")
    sizes = prepare(_configs(run_dir, *skew, algorithm="fedavg")[0])[2].sizes
    assert sizes.max() > 5 * np.median(sizes)
    local, coord, _, _ = _run_both(run_dir, *skew, algorithm="fedavg")
    rows = without_timing(coord.writer.rows)
    assert rows == without_timing(local.writer.rows)
    assert all(np.isfinite(r["train_loss"]) for r in rows)
