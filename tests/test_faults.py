"""Fault injection on a real Ray cluster: a client pool's or a server block's process is killed
from outside (SIGKILL by pid) in the middle of a run; Ray restarts it, the coordinator restores
the round-start state and re-runs the round, and the run ends with the metrics of a run without
the fault (timings and the fault counter aside)."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from sfl_ray.config import load_config
from sfl_ray.data.partition import Partition
from sfl_ray.run import prepare

BASE = ["data.max_train_samples=1200", "data.max_test_samples=200", "train.num_clients=4", "train.clients_per_round=4",
        "stop.target_metric=null", "train.optimizer=adam", "train.lr=0.003", "output.progress=false", "stop.rounds=8",
        "output.checkpoint_every=0"]
ALGO = {"splitfed_v2": [], "fsl_sage": ["algorithm.align_every=2", "algorithm.align_epochs=3"],
        "sglr": ["algorithm.schedule=table2"]}
IGNORE = {"wall_s", "faults"}


def _run(cfg, progress=None):
    from sfl_ray.runtime.launch import run_experiment
    algorithm_cls, data, shards, _ = prepare(cfg)
    return run_experiment(algorithm_cls, cfg, data, shards, progress=progress)


def _rows(cfg) -> list[dict]:
    import json
    from pathlib import Path
    lines = (Path(cfg.run_dir()) / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k not in IGNORE} for x in lines]


def _on_start(monkeypatch, look) -> None:
    """Call `look(executor)` on every executor start_actors makes in this process (the driver)."""
    import sfl_ray.runtime.ray_backend as rb

    real_start = rb.start_actors

    def start(*a, **k):
        ex = real_start(*a, **k)
        look(ex)
        return ex

    monkeypatch.setattr(rb, "start_actors", start)


def _same_metrics_despite_a_kill(tmp_path, common: list[str], pid_of, pools: int = 2) -> None:
    """Run `common` on the local backend (no fault) and on Ray, killing the process `pid_of(progress)`
    names once one of rounds 2 to 7 of 8 is under way: the driver polls the coordinator about
    every second, and these rounds take a quarter to half a second, so a window of two rounds
    could fall between two polls (and did), one of six cannot. The Ray run must recover and end
    with the same rows."""
    ref = load_config(None, common + [f"output.dir={tmp_path}", "cluster.backend=local", "output.name=ref"])
    _run(ref)
    killed = threading.Event()

    def progress(p: dict) -> None:
        if not killed.is_set() and 2 <= p.get("round", 0) <= 7:
            os.kill(pid_of(p), signal.SIGKILL)
            killed.set()

    cfg = load_config(None, common + [f"output.dir={tmp_path}", "cluster.backend=ray", f"cluster.num_pools={pools}",
                                      "output.name=faulty"])
    summary = _run(cfg, progress)
    assert killed.is_set()
    assert summary["totals"]["faults"] >= 1, summary["totals"]
    assert _rows(cfg) == _rows(ref)


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["pool", "server"])
@pytest.mark.parametrize("algo", list(ALGO))
def test_a_killed_actor_is_recovered_with_the_same_metrics(tmp_path, ray_cluster, monkeypatch, algo, victim):
    import ray

    pids = {}
    _on_start(monkeypatch, lambda ex: pids.update(pool=ray.get(ex.pools[0].ping.remote())["pid"],
                                                   server=ray.get(ex.servers[0].ping.remote())["pid"]))
    _same_metrics_despite_a_kill(tmp_path, BASE + [f"algorithm.name={algo}", *ALGO[algo]], lambda p: pids[victim])


@pytest.mark.slow
def test_a_pool_killed_during_a_round_in_turns_is_recovered_with_the_same_metrics(tmp_path, ray_cluster, monkeypatch):
    """SplitFed v2 with every pool on the server block's node runs its rounds in turns
    (runtime.turns): a pool killed mid-round leaves the other pool waiting for a turn that never
    comes; the abandoned sequence must release it, and the re-run give the same rows."""
    import ray

    pids = {}

    def look(ex):
        assert ex.links == {"channels": 2, "actor_calls": 0}
        pids["pool"] = ray.get(ex.pools[1].ping.remote())["pid"]

    _on_start(monkeypatch, look)
    on_one_node = ["cluster.client_gpus=0.5", "cluster.server_gpus=1", "cluster.pool_cpus=0.5", "cluster.server_cpus=0.5"]
    _same_metrics_despite_a_kill(tmp_path, BASE + ["algorithm.name=splitfed_v2", *on_one_node], lambda p: pids["pool"])


@pytest.mark.slow
def test_a_killed_pool_hosting_a_server_block_is_recovered_with_the_same_metrics(tmp_path, ray_cluster, monkeypatch):
    """cluster.exchange=in_pool: the one pool's process holds the server block too; both come
    back restored from the round-start snapshot."""
    import ray

    pids = {}

    def look(ex):
        assert ex.links == {"channels": 0, "actor_calls": 0, "in_pool": 1}
        pids["pool"] = ray.get(ex.pools[0].ping.remote())["pid"]

    _on_start(monkeypatch, look)
    _same_metrics_despite_a_kill(tmp_path, BASE + ["algorithm.name=splitfed_v2", "cluster.exchange=in_pool"],
                                 lambda p: pids["pool"], pools=1)


@pytest.mark.slow
def test_a_killed_coordinator_is_recovered_from_its_last_checkpoint(tmp_path, ray_cluster):
    """The coordinator's process dies mid-run: the driver starts a new one from the last
    checkpoint (pools and server blocks restored from it too) and the run ends as without it."""
    _same_metrics_despite_a_kill(tmp_path, BASE + ["algorithm.name=fsl_sage", *ALGO["fsl_sage"],
                                                   "output.checkpoint_every=1"], lambda p: p["pid"])


@pytest.mark.slow
def test_a_killed_pool_whose_share_of_the_partition_is_large_is_recovered(tmp_path, ray_cluster, monkeypatch):
    """Ray puts a constructor argument over 100 KB in the object store itself and does not keep it
    for a restart (ray#53727): a pool whose partition view is that large (2,000 registered
    clients over 12,000 samples) must still come back, its arguments kept alive by the driver."""
    import ray
    import ray.cloudpickle

    pids = {}

    def look(ex):
        pids["pool"] = ray.get(ex.pools[0].ping.remote())["pid"]

    _on_start(monkeypatch, look)
    common = ["train.num_clients=2000", "train.clients_per_round=200", "stop.target_metric=null", "output.progress=false",
              "stop.rounds=8", "output.checkpoint_every=0", "train.optimizer=adam", "train.lr=0.003",
              "data.max_test_samples=200", "algorithm.name=splitfed_v2"]
    _, data, shards, _ = prepare(load_config(None, common))
    assert len(data.train_x) == 12000
    assert len(ray.cloudpickle.dumps(Partition.from_lists(shards).hosted(0, 2))) > 100 * 1024  # what made it fail
    _same_metrics_despite_a_kill(tmp_path, common, lambda p: pids["pool"])


@pytest.mark.slow
def test_an_actor_whose_restart_fails_is_reported_at_once(tmp_path, ray_cluster):
    """A restarted actor whose constructor fails will not be tried again: recovery says so at once,
    with the cause, instead of waiting out its deadline for an actor that cannot come back."""
    import time

    import ray

    from sfl_ray.runtime.faults import ActorLost
    from sfl_ray.runtime.ray_backend import RayExecutor

    @ray.remote(num_cpus=0, max_restarts=3)
    class Flaky:
        def __init__(self, flag: str):
            if os.path.exists(flag):
                raise RuntimeError("this pool cannot be built again")
            open(flag, "w").close()  # the first construction succeeds; every later one fails

        def ping(self) -> dict:
            return {"pid": os.getpid()}

    actor = Flaky.remote(str(tmp_path / "built"))
    os.kill(ray.get(actor.ping.remote())["pid"], signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(ActorLost, match="client pool 0 cannot come back.*this pool cannot be built again"):
        RayExecutor([actor], [], None).recover(deadline_s=120)
    assert time.monotonic() - t0 < 60
