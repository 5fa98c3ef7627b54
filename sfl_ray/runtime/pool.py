"""A client pool: many virtual clients in one process, run one after another.

Models are built once per pool; a client is its data indices plus a small persistent state.
Both are lazy: the indices are a view of the run's one partition array, and a client's state is
created when it first runs, so a pool can host thousands of registered clients that cost nothing
until they are sampled.
"""

from __future__ import annotations

import logging
import traceback
from collections import defaultdict
from typing import Mapping, Optional, Sequence

import numpy as np
import torch

from sfl_ray.data.partition import ClientShards
from sfl_ray.runtime import bulk
from sfl_ray.metrics.device_cost import FlopCache, MemoryTracker, Meter
from sfl_ray.runtime.codec import decode
from sfl_ray.runtime.finite import check_client_reply
from sfl_ray.runtime.faults import ActorLost
from sfl_ray.runtime.link import DOWN, UP, Ledger, Link, ServerEndpoint
from sfl_ray.runtime.precision import autocast
from sfl_ray.runtime.protocol import Algorithm, Blueprint, ClientContext, ClientReply
from sfl_ray.runtime.wire import owned, pack

log = logging.getLogger("sfl_ray.pool")


def pick_device(gpu_fraction: float) -> torch.device:
    """Chosen from what torch sees, never from Ray's bookkeeping alone."""
    if gpu_fraction > 0 and torch.cuda.is_available():
        # A fractional GPU is a scheduling hint; cap this process to its share for real.
        torch.cuda.set_per_process_memory_fraction(min(1.0, gpu_fraction))
        return torch.device("cuda")
    return torch.device("cpu")


def where_am_i() -> dict:
    """Process, node and GPU ids of this process (node/GPU ids only inside Ray)."""
    import os
    info: dict = {"pid": os.getpid(), "node_id": None, "gpu_ids": []}
    try:
        import ray
        if ray.is_initialized():
            info["node_id"] = ray.get_runtime_context().get_node_id()
            info["gpu_ids"] = [str(g) for g in ray.get_gpu_ids()]
    except ImportError:
        pass
    return info


class ClientPool:
    """Hosts the virtual clients `shards` (client id -> sample indices; a `ClientShards` view of
    the partition, or any mapping) of one pool."""

    def __init__(self, algorithm_cls: type[Algorithm], blueprint: Blueprint, train_x: np.ndarray,
                 train_y: np.ndarray, shards: Mapping[int, np.ndarray],
                 servers: Sequence[ServerEndpoint], gpu_fraction: float = 0.0):
        torch.set_num_threads(blueprint.torch_threads)
        self.algorithm = algorithm_cls(blueprint)
        self.blueprint = blueprint
        self.data = (train_x, train_y)
        self.shards = shards if isinstance(shards, ClientShards) else {int(k): v for k, v in shards.items()}
        self.servers = list(servers)
        self.device = pick_device(gpu_fraction)
        self.parts = blueprint.build_parts()
        self.parts.device.to(self.device)
        self.parts.server.to(self.device)
        self.algorithm.build_client_modules(self.parts)
        # A client's persistent state, created on its first program: registered clients never
        # sampled hold nothing (get_state reports only clients that have state).
        self.state: defaultdict[int, dict] = defaultdict(dict)
        # A client whose program continues in its next call keeps one memory tracker across them.
        self._open_trackers: dict[int, MemoryTracker] = {}
        self.flop_cache = FlopCache()  # step FLOPs by shape, shared by every client of this pool

    def get_state(self, clients: Optional[Sequence[int]] = None) -> dict:
        """The persistent state (optimizer moments, aux models, own blocks) of every hosted client
        that has some (of `clients` only, if given) as a plain tree, packed for the trip to the
        coordinator (runtime.checkpoint.pack), for checkpoints and round-start snapshots."""
        from sfl_ray.runtime.checkpoint import pack, to_tree
        ids = list(self.state) if clients is None else clients
        return {c: pack(to_tree(self.state[c])) for c in ids if self.state.get(c)}

    def set_state(self, states: dict) -> None:
        """Restore `get_state()` (for the clients this pool hosts); modules in client state are
        copies of the device block."""
        self._open_trackers.clear()
        # Clients absent from `states` had none: they start afresh, as if never sampled.
        self.state = defaultdict(dict, {int(c): self._unpack_state(st) for c, st in states.items()
                                        if int(c) in self.shards})

    def put_state(self, states: dict) -> None:
        """Take the state of hosted clients that a program left on another pool (packed as
        `get_state` packs it), beside the state of the others."""
        for c, st in states.items():
            if int(c) not in self.shards:
                raise KeyError(f"client {c} is not hosted by this pool")
            self.state[int(c)] = self._unpack_state(st)

    def _unpack_state(self, st: dict) -> dict:
        import copy

        from sfl_ray.runtime.checkpoint import from_tree

        def device_copy(sd: dict):
            m = copy.deepcopy(self.parts.device)
            m.load_state_dict(sd)
            return m

        return from_tree(st, device_copy)

    def ping(self) -> dict:
        """Where this pool runs (for placement checks and health)."""
        clients = self.shards.clients if isinstance(self.shards, ClientShards) else sorted(self.shards)
        # clients: a range on a partition view (compact however many); client_states: clients
        # holding state so far (they are created lazily, on a client's first program).
        return {**where_am_i(), "clients": clients, "client_states": len(self.state), "device": str(self.device)}

    # -- bulk payloads (runtime.bulk); the Ray pool keeps them in the object store ----------
    def put_bulk(self, stored: dict) -> object:
        """Store one reply's bulk payloads; returns what a `Bulk` handle refers to. Here the
        object itself, copied: what the coordinator and server keep must not share the device's
        storage (as serialisation does on Ray)."""
        return owned(stored)

    def fetch_bulk(self, refs: list) -> list:
        """The stored objects `refs` refer to (handles in what this pool is sent)."""
        return bulk.local_fetch(refs)

    def run_many(self, program: str, clients: Sequence[int], rnd: int, down: dict, per_client: Mapping[int, dict],
                 measure: Sequence[str], seq: Optional[int] = None) -> list[ClientReply]:
        """`run` for several clients, one after another (a dispatch sends a pool its share of the
        round in a few calls); `per_client` adds to `down` what only one client gets. With `seq`,
        the clients take turns at their server block (runtime.turns): each passes its turn when
        its program returns."""
        out = []
        for i, (c, m) in enumerate(zip(clients, measure)):
            payload = {**down, **per_client[c]} if c in per_client else down
            if seq is None:
                out.append(self.run(program, c, rnd, payload, m))
                continue
            endpoint = self._endpoint(c)
            endpoint.seq = seq
            try:
                reply = self.run(program, c, rnd, payload, m)
                try:  # the next client need not wait for the hand-over; the last pass is answered
                    endpoint.pass_turn(c, wait=i == len(clients) - 1)
                except ActorLost as err:
                    reply.lost = reply.lost or str(err)
            finally:
                endpoint.seq = None
            out.append(reply)
        return out

    def _endpoint(self, client: int) -> Optional[ServerEndpoint]:
        """The server block `client` talks to (None without server blocks)."""
        return self.servers[client % len(self.servers)] if self.servers else None

    def run(self, program: str, client: int, rnd: int, down: dict, measure: str = "exact") -> ClientReply:
        """Run one client's program for one round; failures come back as values. `measure`: exact
        (FLOPs and memory), flops (FLOPs, cached per step shape) or off."""
        endpoint = self._endpoint(client)
        ledger = Ledger(count_labels=self.blueprint.count_labels)
        reply = ClientReply(client=client)
        try:  # what was sent by reference is fetched here, and counted as it came
            down = bulk.resolve(down, self.fetch_bulk, decoded=False)
        except ActorLost as err:  # the server block that stored it died: the round is re-run
            reply.lost = str(err)
            return reply
        ledger.record(DOWN, down)
        down = decode(down)  # counted as it came (compressed gradients), used as float32
        tracker = self._open_trackers.pop(client, None) or MemoryTracker()
        meter = Meter(measure, self.device, tracker, self.flop_cache)
        ctx = ClientContext(client, rnd, self.blueprint, self.parts, self.data, self._shard(client),
                            Link(endpoint, client, ledger, self.blueprint.codec), self.state[client], tracker,
                            self.device, meter=meter, program=program)
        try:
            with meter.measuring() as cost:
                with autocast(self.blueprint.precision, self.device):
                    up, info = getattr(self.algorithm, program)(ctx, down)
            ctx.save_optimizers()
            if ctx.keep_measuring and measure == "exact":
                self._open_trackers[client] = tracker
            up = pack(up)
            check_client_reply(client, rnd, up, info)  # a NaN loss or upload is this client's error
            up = self.blueprint.codec.encode(up)  # uploaded activations go compressed (link.compression)
            ledger.record(UP, up)
            if ctx.bulk_kinds:  # counted above as they are; they go on by reference
                up = bulk.by_reference(up, ctx.bulk_kinds, self.put_bulk)
            reply.up, reply.info = up, dict(info)
            reply.flops, reply.peak_mem_bytes = cost["flops"], cost["peak_mem_bytes"]
            reply.cuda_peak_mem_bytes, reply.saved_tensors = cost["cuda_peak_mem_bytes"], cost["saved_tensors"]
        except ActorLost as err:  # not the client's fault: the coordinator re-runs the round
            reply.lost = str(err)
        except Exception:  # noqa: BLE001 - a failure is a value; the coordinator's policy decides
            reply.error = traceback.format_exc()
            log.error("client %d failed in round %d:\n%s", client, rnd, reply.error)
        reply.bytes = {f"{d}/{k}": v for (d, k), v in ledger.bytes.items()}
        reply.messages = dict(ledger.messages)
        if client in self.shards:
            reply.keeps_state = bool(self.state.get(client)) or client in self._open_trackers
        else:  # a guest (runtime balancing): whatever it left here belongs to its own pool
            self._leave_guest(client, reply)
        return reply

    def _shard(self, client: int):
        """A client's sample indices: a hosted one's, or a guest's from the run's partition."""
        if client in self.shards or not isinstance(self.shards, ClientShards):
            return self.shards[client]
        return self.shards.partition[client]

    def _leave_guest(self, client: int, reply: ClientReply) -> None:
        """A guest keeps nothing here: its state goes back with the reply (packed as get_state
        packs it), to its own pool."""
        reply.guest_state = self.get_state([client]).get(client)
        self.state.pop(client, None)
        continued = self._open_trackers.pop(client, None) is not None
        reply.keeps_state = reply.guest_state is not None or continued


__all__ = ["ClientPool", "pick_device", "UP", "DOWN"]
