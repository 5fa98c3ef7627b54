"""Bulk payloads go once, by reference (runtime.bulk): Ampere's transfer and SGLR's per-iteration
activations and gradients travel pool <-> server block; the coordinator holds handles only, the
link counts what it counted before, and the rows are those of the local backend."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest

from sfl_ray.runtime.bulk import Bulk, by_reference, local_fetch, resolve
from sfl_ray.runtime.codec import Codec, decode_array
from sfl_ray.runtime.wire import payload_nbytes
from tests.helpers import local_coordinator, ray_coordinator, small_config, without_timing


def _array_bytes(value: Any) -> int:
    """Bytes of every numpy array inside `value` (dicts, lists, tuples, replies): what a process
    holding `value` received of the payloads; a `Bulk` handle holds none."""
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    if isinstance(value, dict):
        return sum(_array_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_array_bytes(v) for v in value)
    if hasattr(value, "up") and hasattr(value, "info"):  # a ClientReply
        return _array_bytes(value.up) + _array_bytes(value.info)
    return 0


def test_a_handle_carries_what_was_counted_and_resolves_to_the_decoded_array():
    codec = Codec("int8")
    a = np.random.default_rng(0).standard_normal((6, 4, 3, 3)).astype(np.float32)
    y = np.arange(6)
    wire = codec.encode({"activations": a, "labels": y, "weights": {"w": np.ones(3, np.float32)}})
    up = by_reference(wire, ["activations", "labels"], dict)
    h = up["activations"]
    assert isinstance(h, Bulk) and h.encoded and len(h) == 6 and h.shape == a.shape
    assert h.nbytes == payload_nbytes(wire["activations"]) < a.nbytes  # the compressed form, as counted
    assert up["weights"] is wire["weights"] and _array_bytes(up) == 12  # only the bulk kinds are replaced
    args = resolve(([(up["activations"], up["labels"], 3)], {"y": up["labels"]}), local_fetch)
    (z, labels, owner), = args[0]
    np.testing.assert_array_equal(z, decode_array(wire["activations"]))
    assert labels is wire["labels"] and args[1]["y"] is labels and owner == 3
    # a receiver that counts before decoding gets the wire form
    assert resolve({"g": h}, local_fetch, decoded=False)["g"] is wire["activations"]


class _Watch:
    """Wraps a Ray executor: the payload arrays the coordinator receives in replies and in server
    results, and sends as server arguments, by client program / server method."""

    def __init__(self, ex):
        self.ex, self.received, self.sent, self.handles = ex, {}, {}, []
        real_run, real_control = ex.run_clients, ex.server_control

        def run_clients(program, *args, **kw):
            replies = real_run(program, *args, **kw)
            self.received[program] = self.received.get(program, 0) + sum(_array_bytes(r) for r in replies)
            self.handles += [v for r in replies for v in r.up.values() if isinstance(v, Bulk)]
            return replies

        def server_control(index, method, *args):
            self.sent[method] = self.sent.get(method, 0) + _array_bytes(args)
            out = real_control(index, method, *args)
            self.received[method] = self.received.get(method, 0) + _array_bytes(out)
            return out

        ex.run_clients, ex.server_control = run_clients, server_control


@pytest.mark.slow
@pytest.mark.parametrize("algo, extra", [
    ("ampere", ["algorithm.server_epochs=1", "link.compression=int8"]),
    ("sglr", ["algorithm.schedule=table2", "link.compression=bf16"]),
])
def test_bulk_payloads_bypass_the_coordinator_and_rows_match_local(ray_cluster, run_dir, algo, extra):
    import ray

    common = [f"algorithm.name={algo}", "stop.rounds=1", "cluster.num_pools=2", *extra]
    local, _ = local_coordinator(small_config(run_dir, *common, "output.name=local"))
    local.run()
    coord, ex = ray_coordinator(small_config(run_dir, *common, "cluster.backend=ray", "output.name=ray"))
    watch = _Watch(ex)
    try:
        coord.run()
    finally:
        ex.shutdown()
    rows = coord.writer.rows
    assert without_timing(rows) == without_timing(local.writer.rows)
    assert watch.handles and all(isinstance(h.ref, ray.ObjectRef) for h in watch.handles)
    if algo == "ampere":
        transfer = rows[1]
        assert transfer["phase"] == "transfer" and transfer["bytes_by_kind"]["up/activations"] > 0
        assert sum(h.nbytes for h in watch.handles if h.kind == "activations") == \
            transfer["bytes_by_kind"]["up/activations"]  # the handles refer to what the link counted
        assert watch.received["activations_program"] == 0 and watch.sent["set_dataset"] == 0
    else:
        counted = rows[0]["bytes_by_kind"]
        assert counted["up/activations"] > 0 and counted["down/gradients"] > 0
        assert watch.received["sglr_forward"] == 0 and watch.sent["iteration"] == 0
        assert watch.received["iteration"] == 0 and watch.received["sglr_backward"] == 0


def _restart(pool) -> int:
    """Kill `pool` and wait until it answers from a new process (the objects it owned are gone
    with the old one); returns the old process id."""
    import ray

    old = ray.get(pool.ping.remote(), timeout=60)["pid"]
    ray.kill(pool, no_restart=False)
    while True:
        try:
            if ray.get(pool.ping.remote(), timeout=120)["pid"] != old:
                return old
        except ray.exceptions.RayActorError:
            time.sleep(0.2)


@pytest.mark.slow
def test_kept_payloads_outlive_the_pool_that_stored_them(ray_cluster, run_dir):
    """`RoundRuntime.keep` (Ray: the coordinator takes copies by a task): after the pool that
    stored a transfer dies, the original handles are lost actors, the kept ones still read the
    same arrays; the coordinator received handles only."""
    import ray

    from sfl_ray.runtime.channels import fetch_bulk
    from sfl_ray.runtime.faults import ActorLost

    cfg = small_config(run_dir, "algorithm.name=ampere", "stop.rounds=1", "cluster.num_pools=1",
                       "cluster.backend=ray", "algorithm.server_trainer=ray_train")
    coord, ex = ray_coordinator(cfg)
    try:
        coord.algorithm.init_global(coord.evaluator.parts)
        weights = coord.algorithm.global_device
        replies = ex.run_clients("activations_program", [0, 1], 1, {"weights": weights}, True, lambda r: None)
        parts = [(r.up["activations"], r.up["labels"], r.client) for r in replies]
        assert _array_bytes(replies) == 0
        kept = ex.keep_bulk(parts)
        assert _array_bytes(kept) == 0 and all(isinstance(z, Bulk) for z, _, _ in kept)
        assert {z.ref for z, _, _ in kept}.isdisjoint({z.ref for z, _, _ in parts})
        _restart(ex.pools[0])  # (the originals were never read here: nothing of them is cached)
        with pytest.raises(ActorLost):
            resolve(parts, fetch_bulk)
        after = resolve(kept, fetch_bulk)
        again = ex.run_clients("activations_program", [0, 1], 1, {"weights": weights}, True, lambda r: None)
        for (z1, y1, c1), r in zip(after, again):  # what the restarted pool makes anew
            z2, y2 = resolve((r.up["activations"], r.up["labels"]), fetch_bulk)
            np.testing.assert_array_equal(z1, z2)
            np.testing.assert_array_equal(y1, y2)
            assert c1 == r.client and z1.shape[0] > 0
        with pytest.raises(ActorLost):  # keeping what is already lost says so
            ex.keep_bulk(parts)
    finally:
        ex.shutdown()


@pytest.mark.slow
def test_a_transfer_lost_with_its_pool_is_sent_again(ray_cluster, run_dir):
    """The pool that stored a device's transfer dies before the server block reads it: the object
    is gone with its owner, the read is a lost actor, and the coordinator re-runs the row."""
    import ray

    common = ["algorithm.name=ampere", "stop.rounds=1", "algorithm.server_epochs=1", "cluster.num_pools=2"]
    local, _ = local_coordinator(small_config(run_dir, *common, "output.name=local"))
    local.run()
    coord, ex = ray_coordinator(small_config(run_dir, *common, "cluster.backend=ray", "output.name=ray"))
    real_control, killed = ex.server_control, []

    def server_control(index, method, *args):
        if method == "set_dataset" and not killed:
            killed.append(_restart(ex.pools[0]))
        return real_control(index, method, *args)

    ex.server_control = server_control
    try:
        coord.run()
    finally:
        ex.shutdown()
    assert killed and coord.faults == 1 and coord.writer.rows[1]["faults"] == 1
    strip = [{k: v for k, v in r.items() if k != "faults"} for r in without_timing(coord.writer.rows)]
    assert strip == [{k: v for k, v in r.items() if k != "faults"} for r in without_timing(local.writer.rows)]
