"""The Ray backend: client pools on (fractional) GPUs, server blocks on whole GPUs, a coordinator actor.

Activations travel pool -> server block as numpy arrays in the object store (zero-copy reads
on the same node). Every wait has a deadline. This module is the only one that imports ray,
apart from run.py, which starts or joins the cluster.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import deque
from typing import Any, Callable, Mapping, Optional, Sequence

import ray

from sfl_ray.config_base import ConfigError
from sfl_ray.data.partition import Partition
from sfl_ray.runtime.bulk import rehome
from sfl_ray.runtime.channels import ChannelClientPool, ChannelServerBlock, PoolWithServer, fetch_bulk
from sfl_ray.runtime.faults import ActorLost
from sfl_ray.runtime.pipe import Pipe
from sfl_ray.runtime.protocol import ClientReply

log = logging.getLogger("sfl_ray.ray")


CHUNKS_PER_POOL = 4  # calls per pool in a parallel dispatch (progress and deadlines move per call)
FIRST_WAIT_S = 600.0  # a wait's deadline before any client call has been timed (cluster.task_timeout_s unset)

# Errors that mean "the actor's process is gone" (it is restarted, with its state lost).
_LOST = (ray.exceptions.RayActorError, getattr(ray.exceptions, "ActorUnavailableError", ray.exceptions.RayActorError))


class RayEndpoint:
    """A client's way to a server block actor."""

    def __init__(self, handle: Any, timeout_s: float, index: int = 0):
        self.handle, self.timeout_s, self.index = handle, timeout_s, index

    def call(self, method: str, client: int, arrays: dict, info: dict) -> tuple[dict, dict]:
        try:
            return ray.get(self.handle.call.remote(method, client, arrays, info), timeout=self.timeout_s)
        except _LOST as err:
            raise ActorLost(f"server block {self.index} lost during {method!r}: {type(err).__name__}") from None
        except ray.exceptions.GetTimeoutError:
            raise TimeoutError(f"server block {self.index} did not answer {method!r} from client {client} "
                               f"within cluster.task_timeout_s={self.timeout_s}s") from None


class RayExecutor:
    """Dispatches client programs to pool actors and control calls to server actors."""

    def __init__(self, pools: list, servers: list, timeout_s: Optional[float], blueprint=None, cluster=None,
                 portable: frozenset = frozenset()):
        self.pools, self.servers, self.fixed_timeout_s = pools, servers, timeout_s
        self.blueprint, self.cluster = blueprint, cluster
        # Balancing (cluster.balance_pools): programs that may run on any pool; the clients whose
        # pool holds state for them (none in fresh pools; then as their replies and restored
        # states say), which stay at their pool; clients run on another pool so far.
        self.portable = portable if getattr(cluster, "balance_pools", False) else frozenset()
        self.stateful: set[int] = set()
        self.guest_runs = 0
        self.num_servers = len(servers)
        self.longest_call_s = 0.0  # the slowest client call so far: waits scale with it
        self.exchange = getattr(cluster, "exchange", "actor_calls")
        # in_pool: pool p hosts server block p, and `servers` are the pools' own handles
        self.in_pool = bool(servers) and self.exchange == "in_pool"
        self.links: dict = {}

    @property
    def timeout_s(self) -> float:
        """The deadline of one wait: cluster.task_timeout_s, or proportionate to the work seen."""
        if self.fixed_timeout_s is not None:
            return self.fixed_timeout_s
        return FIRST_WAIT_S if self.longest_call_s == 0 else max(60.0, 10 * self.longest_call_s)

    def _pool(self, client: int) -> Any:
        return self.pools[client % len(self.pools)]

    def _get(self, ref: Any, what: str) -> Any:
        """ray.get with the deadline; a lost actor or a timeout is named."""
        try:
            return ray.get(ref, timeout=self.timeout_s)
        except _LOST as err:
            raise ActorLost(f"{what} lost: {type(err).__name__}") from None
        except ray.exceptions.RayTaskError as err:
            if isinstance(err.cause, ActorLost):  # e.g. a bulk payload lost with the pool that stored it
                raise ActorLost(f"{what}: {err.cause}") from None
            raise
        except ray.exceptions.GetTimeoutError:
            raise TimeoutError(f"{what} did not answer within cluster.task_timeout_s={self.timeout_s}s") from None

    def run_clients(self, program: str, clients: Sequence[int], rnd: int, down: dict, parallel: bool,
                    on_done: Callable[[ClientReply], None],
                    per_client: Optional[Mapping[int, dict]] = None,
                    measure: Optional[Callable[[int], str]] = None) -> list[ClientReply]:
        shared = ray.put(down)  # one copy in the object store, read by every pool
        on_done = self._learning(on_done)

        def how(c: int) -> str:
            return measure(c) if measure else "exact"

        def payload(c: int) -> Any:
            return ray.put({**down, **per_client[c]}) if per_client and c in per_client else shared

        def who(c: int) -> str:
            return f"client pool {c % len(self.pools)} (running client {c}, round {rnd}, {program})"

        if not parallel and self.in_pool:
            # Each block is reached by its own pool only, which runs its share in the round's
            # order: every block sees its clients in the order one-by-one calls would give.
            return self._dispatch(program, clients, rnd, shared, per_client, how, on_done)
        if not parallel and self._in_turns(clients):
            # Unique across coordinators: a recovered one must not resume a dead one's sequence.
            seq, n = int.from_bytes(os.urandom(7), "little"), len(self.servers)
            for j, server in enumerate(self.servers):
                self._get(server.begin_turns.remote(seq, [c for c in clients if c % n == j]), f"server block {j}")
            try:
                return self._dispatch(program, clients, rnd, shared, per_client, how, on_done, seq)
            finally:  # releases a pool still waiting for a turn if the round was abandoned
                try:
                    ray.get([s.end_turns.remote(seq) for s in self.servers], timeout=self.timeout_s)
                except (*_LOST, ray.exceptions.GetTimeoutError):
                    pass  # a lost block holds no turns; the round's own error is the one to report
        if not parallel:
            out = []
            for c in clients:
                t0 = time.perf_counter()
                r = self._get(self._pool(c).run.remote(program, c, rnd, payload(c), how(c)), who(c))
                self.longest_call_s = max(self.longest_call_s, time.perf_counter() - t0)
                on_done(r)
                out.append(r)
                if r.error or r.lost:
                    break  # a sequential schedule cannot go on past a failed client
            return out
        return self._dispatch(program, clients, rnd, shared, per_client, how, on_done)

    def _in_turns(self, clients: Sequence[int]) -> bool:
        """A sequential dispatch runs on every pool at once, in turns at the server blocks
        (runtime.turns), where every pool reaches every block through channels: a block's
        channel threads wait for turns, while its one actor thread could not."""
        return len(clients) > 1 and bool(self.servers) and self.links.get("actor_calls", 1) == 0

    def _learning(self, on_done: Callable[[ClientReply], None]) -> Callable[[ClientReply], None]:
        """`on_done`, after noting whether the client may run on another pool next time."""
        def done(r: ClientReply) -> None:
            if r.keeps_state or r.error or r.lost:
                self.stateful.add(r.client)
            else:
                self.stateful.discard(r.client)
            on_done(r)
        return done

    def _dispatch(self, program, clients, rnd, shared, per_client, how, on_done, seq=None) -> list[ClientReply]:
        """Every pool gets its share of `clients` (in their order) in a few calls, not a call per
        client: a call costs the coordinator, the raylet and the pool milliseconds of CPU, taken
        from the cores the clients train on. Without balancing, CHUNKS_PER_POOL calls each, all
        at once. With it (a portable program, see Algorithm.portable_programs), two calls at a time
        per pool, each a third of what is left of its share, so that a pool that has run its share
        can take the tail of a busier pool's (clients that hold no state at their pool)."""
        n = len(self.pools)
        queues = [deque(i for i, c in enumerate(clients) if c % n == p) for p in range(n)]
        balance = (program in self.portable and seq is None and not self.in_pool and n > 1
                   and any(c not in self.stateful for c in clients))
        calls: dict = {}  # ref -> (pool, indices into clients)
        in_flight = [0] * n

        def send(p: int, part: list[int]) -> None:
            ids = [clients[i] for i in part]
            extra = {c: per_client[c] for c in ids if per_client and c in per_client}
            calls[self.pools[p].run_many.remote(program, ids, rnd, shared, extra, [how(c) for c in ids], seq)] = (p, part)
            in_flight[p] += 1

        def feed(p: int) -> None:
            """Keep pool p two calls deep: its own clients first, then a busier pool's movable tail."""
            while in_flight[p] < 2:
                own = queues[p]
                if own:
                    send(p, [own.popleft() for _ in range(max(1, math.ceil(len(own) / 3)))])
                    continue
                tails = [self._movable_tail(clients, queues[v]) for v in range(n)]
                victim = max(range(n), key=lambda v: tails[v])
                if tails[victim] == 0:
                    return
                taken = [queues[victim].pop() for _ in range(math.ceil(tails[victim] / 2))]
                self.guest_runs += len(taken)
                send(p, taken[::-1])

        if balance:
            for p in range(n):
                feed(p)
        else:
            for p, own in enumerate(queues):
                size = max(1, math.ceil(len(own) / CHUNKS_PER_POOL))
                while own:
                    send(p, [own.popleft() for _ in range(min(size, len(own)))])
        # A pool runs its calls one after another: a call's share of the wait is the time since
        # its pool's previous reply.
        t0 = time.perf_counter()
        last_reply: dict[int, float] = {}
        results: list[Optional[ClientReply]] = [None] * len(clients)
        guests: dict[int, dict] = {}  # home pool -> {client: state a program left on another pool}
        while calls:
            ready, _ = ray.wait(list(calls), num_returns=1, timeout=self.timeout_s)
            if not ready:
                late = sorted(clients[i] for _, part in calls.values() for i in part)
                raise TimeoutError(f"round {rnd}: clients {late[:10]} (on pools "
                                   f"{sorted({p for p, _ in calls.values()})}) did not reply within "
                                   f"cluster.task_timeout_s={self.timeout_s}s")
            pool, part = calls.pop(ready[0])
            in_flight[pool] -= 1
            replies = self._get(ready[0], f"client pool {pool} (running clients {[clients[i] for i in part][:10]}, "
                                          f"round {rnd}, {program})")
            now = time.perf_counter()
            self.longest_call_s = max(self.longest_call_s, now - last_reply.get(pool, t0))
            last_reply[pool] = now
            if balance:
                feed(pool)
            for i, r in zip(part, replies):
                results[i] = r
                if r.guest_state is not None:
                    guests.setdefault(r.client % n, {})[r.client] = r.guest_state
                    r.guest_state = None
                on_done(r)
        for p, states in guests.items():  # before any later call to that pool: calls keep their order
            self._get(self.pools[p].put_state.remote(states), f"client pool {p}")
        return results  # type: ignore[return-value]

    def _movable_tail(self, clients: Sequence[int], queue: deque) -> int:
        """How many of a pool's queued clients, from the end, may run on another pool."""
        k = 0
        for i in reversed(queue):
            if clients[i] in self.stateful:
                break
            k += 1
        return k

    def connect(self) -> dict:
        """Give every pool a channel pair to each server block on its node (cluster.exchange=
        channels); returns {"channels": n, "actor_calls": m} pool-server pairs (and with
        exchange=in_pool {"in_pool": k}: k pools each calling the block in its own process)."""
        counts = {"channels": 0, "actor_calls": 0}
        if self.in_pool:
            self.links = {**counts, "in_pool": len(self.servers)}
            return self.links
        if not self.servers or self.exchange != "channels":
            counts["actor_calls"] = len(self.pools) * len(self.servers)
            self.links = counts
            return counts
        where = self.placement()
        wait = self.cluster.task_timeout_s or FIRST_WAIT_S
        for i, (pool, p) in enumerate(zip(self.pools, where["pools"])):
            for j, (server, s) in enumerate(zip(self.servers, where["servers"])):
                if p["node_id"] != s["node_id"]:  # shared memory does not cross nodes
                    counts["actor_calls"] += 1
                    continue
                pipes = Pipe(), Pipe()  # request, reply
                pid = self._get(server.serve.remote(i, *pipes), f"server block {j}")
                self._get(pool.use_channels.remote(j, server, pid, wait, *pipes), f"client pool {i}")
                counts["channels"] += 1
        self.links = counts
        return counts

    def recover(self, deadline_s: float = 180.0) -> None:
        """Wait until every pool and server block answers again (Ray restarts a lost one: same
        handle, fresh process, state to be restored by the caller)."""
        end = time.time() + deadline_s
        for i, a in enumerate(self._actors()):
            what = f"client pool {i}" if i < len(self.pools) else f"server block {i - len(self.pools)}"
            while True:
                try:
                    ray.get(a.ping.remote(), timeout=max(1.0, end - time.time()))
                    break
                except _LOST as err:
                    if "creation task" in str(err):  # its constructor failed: Ray will not try again
                        raise ActorLost(f"{what} cannot come back, its restart failed: "
                                        f"{str(err).strip().splitlines()[-1]}") from None
                    if time.time() > end:
                        raise ActorLost(f"{what} did not come back within {deadline_s}s") from None
                    time.sleep(0.5)
                except ray.exceptions.GetTimeoutError:
                    raise ActorLost(f"{what} did not come back within {deadline_s}s") from None
        self.connect()  # a restarted pool or block lost its channels: every pair gets new ones

    def _actors(self) -> list:
        """Every pool and server block actor, once each (in_pool: the pools)."""
        return self.pools if self.in_pool else self.pools + self.servers

    def client_states(self, clients: Optional[Sequence[int]] = None) -> dict:
        """Every client's state (only `clients`', if given), from the pools hosting them."""
        out: dict = {}
        if clients is None:
            refs = [p.get_state.remote() for p in self.pools]
        else:
            refs = [p.get_state.remote([c for c in clients if c % len(self.pools) == i])
                    for i, p in enumerate(self.pools)]
        for i, ref in enumerate(refs):
            out.update(self._get(ref, f"client pool {i}"))
        return out

    def load_client_states(self, states: dict) -> None:
        self.stateful = {int(c) for c in states}  # every pool's state is replaced by these
        ref = ray.put(states)
        refs = [p.set_state.remote(ref) for p in self.pools]
        for i, r in enumerate(refs):
            self._get(r, f"client pool {i}")

    def server_control(self, index: int, method: str, *args: Any) -> Any:
        return self._get(self.servers[index].control.remote(method, *args), f"server block {index} ({method})")

    def pop_server_flops(self) -> int:
        return sum(self._get(s.pop_flops.remote(), f"server block {i}") for i, s in enumerate(self.servers))

    def keep_bulk(self, value: Any) -> Any:
        """The objects `value`'s handles refer to, copied by a task that takes no CPU and owned by
        this process from then on (a task's results belong to its caller): their makers may die."""
        def store(refs: list) -> list:
            copies = ray.remote(num_cpus=0, num_returns=len(refs) + 1)(_copies).remote(refs)
            self._get(copies[-1], "a copy of bulk payloads")  # an original lost already: ActorLost
            return copies[:-1]
        return rehome(value, store)

    def fit_server(self, request: Any) -> list[dict]:
        import shutil
        import tempfile

        from sfl_ray.runtime.ray_train_fit import fit_with_ray_train
        if self.cluster.storage_path:  # the user's storage: never ours to remove
            return fit_with_ray_train(self.blueprint, request, self.cluster, self.cluster.storage_path)
        storage = tempfile.mkdtemp(prefix="sfl_ray_train_")
        try:  # the weights come back in memory; the checkpoints are of no further use
            return fit_with_ray_train(self.blueprint, request, self.cluster, storage)
        finally:
            shutil.rmtree(storage, ignore_errors=True)

    def placement(self) -> dict:
        """Where each actor runs: node id, GPU ids, device (for checks and the dashboard)."""
        return {"pools": ray.get([p.ping.remote() for p in self.pools], timeout=self.timeout_s),
                "servers": ray.get([s.ping.remote() for s in self.servers], timeout=self.timeout_s)}

    def held_resources(self) -> dict:
        """The CPUs and GPUs this executor's pools and server blocks hold."""
        if self.cluster is None:
            return {}
        c, n = self.cluster, len(self.pools)
        if self.in_pool:
            return {"CPU": n * c.pool_cpus, "GPU": n * in_pool_gpus(c)}
        return {"CPU": n * c.pool_cpus + self.num_servers * c.server_cpus,
                "GPU": n * c.client_gpus + self.num_servers * c.server_gpus}

    def shutdown(self, wait_s: float = 10.0) -> None:
        """Kill the pools and server blocks, then wait (at most wait_s) until the cluster has their
        CPUs and GPUs back. Without the wait, a run started right after (compare, sweeps) is placed
        while GPUs are half released: its fractional pools land on two GPUs and leave no whole GPU
        for its server block, which then waits forever."""
        held = {k: v for k, v in self.held_resources().items() if v > 0}
        before = ray.available_resources() if held else {}
        for a in self._actors():
            ray.kill(a)
        end = time.time() + wait_s
        while held and time.time() < end:
            now = ray.available_resources()
            if all(now.get(k, 0.0) >= before.get(k, 0.0) + v - 1e-6 for k, v in held.items()):
                return
            time.sleep(0.05)
        if held:
            log.warning("the cluster had not given back %s of the killed actors within %ss", held, wait_s)


def _copies(refs: list) -> tuple:
    """The objects `refs` refer to, as this task's results (so owned by its caller), and a last
    result that says they were all there."""
    return (*fetch_bulk(refs), True)


def in_pool_gpus(cluster) -> float:
    """GPUs of a pool hosting a server block (cluster.exchange=in_pool): the block's whole GPUs,
    or the pool's fraction if larger."""
    return max(cluster.client_gpus, cluster.server_gpus)


def plan_topology(cluster, num_clients: int, needs_server: bool) -> tuple[int, int]:
    """(pools, servers) for this cluster; refuses requests the cluster cannot hold."""
    res = ray.cluster_resources()
    cpus, gpus = res.get("CPU", 0.0), res.get("GPU", 0.0)
    servers = cluster.num_servers if needs_server else 0
    if servers and cluster.exchange == "in_pool":
        return _plan_in_pool(cluster, num_clients, servers, cpus, gpus)
    free_cpu = cpus - servers * cluster.server_cpus
    free_gpu = gpus - servers * cluster.server_gpus
    if servers * cluster.server_gpus > gpus:
        raise ConfigError("cluster.server_gpus", cluster.server_gpus,
                          f"{servers} server block(s) x {cluster.server_gpus} GPU > the cluster's {gpus:g} GPUs")
    pools = cluster.num_pools
    if pools is None:
        limits = [num_clients]
        if cluster.pool_cpus > 0:
            limits.append(int(math.floor(free_cpu / cluster.pool_cpus + 1e-9)))
        if cluster.client_gpus > 0:
            limits.append(int(math.floor(free_gpu / cluster.client_gpus + 1e-9)))
        pools = max(1, min(limits))
    pools = min(pools, num_clients)
    if pools * cluster.pool_cpus > free_cpu + 1e-9:
        raise ConfigError("cluster.num_pools", pools,
                          f"{pools} pools x {cluster.pool_cpus} CPU + {servers} servers x {cluster.server_cpus} CPU "
                          f"> the cluster's {cpus:g} CPUs")
    if pools * cluster.client_gpus > free_gpu + 1e-9:
        raise ConfigError("cluster.client_gpus", cluster.client_gpus,
                          f"{pools} pools x {cluster.client_gpus} GPU + {servers} servers x {cluster.server_gpus} GPU "
                          f"> the cluster's {gpus:g} GPUs")
    return pools, servers


def _plan_in_pool(cluster, num_clients: int, servers: int, cpus: float, gpus: float) -> tuple[int, int]:
    """in_pool: one pool per server block, each hosting its block."""
    if cluster.num_pools is not None and cluster.num_pools != servers:
        raise ConfigError("cluster.num_pools", cluster.num_pools,
                          f"with cluster.exchange=in_pool every pool hosts a server block: num_pools must equal "
                          f"cluster.num_servers={servers} (or be left unset)")
    if servers > num_clients:
        raise ConfigError("cluster.num_servers", servers,
                          f"with cluster.exchange=in_pool every server block needs a pool, and a pool a client: "
                          f"{servers} server blocks > {num_clients} clients")
    if servers * cluster.pool_cpus > cpus + 1e-9:
        raise ConfigError("cluster.pool_cpus", cluster.pool_cpus,
                          f"{servers} pools hosting server blocks x {cluster.pool_cpus} CPU > the cluster's {cpus:g} CPUs")
    if servers * in_pool_gpus(cluster) > gpus + 1e-9:
        raise ConfigError("cluster.server_gpus", cluster.server_gpus,
                          f"{servers} pools hosting server blocks x {in_pool_gpus(cluster):g} GPU > the cluster's "
                          f"{gpus:g} GPUs")
    return servers, servers


def ship_plugins_by_value() -> None:
    """Plug-ins registered in this process outside entry points (in a script, a test module, a
    file) may not be importable where the actors run: their modules travel by value, like
    __main__'s. Installed plug-ins (entry points) are imported there, like sfl_ray itself."""
    import sys

    from sfl_ray.registry import plugin_modules

    for name in plugin_modules():
        ray.cloudpickle.register_pickle_by_value(sys.modules[name])


def start_actors(algorithm_cls, blueprint, train_x, train_y, shards, cluster) -> RayExecutor:
    """Create server block and client pool actors and wait until each is alive."""
    ship_plugins_by_value()  # before anything holding a plug-in (class, config, model entry) is pickled
    pools_n, servers_n = plan_topology(cluster, len(shards), algorithm_cls.wants_server_blocks(blueprint.algorithm))
    in_pool = servers_n > 0 and cluster.exchange == "in_pool"  # pool p hosts server block p
    server_actor = ray.remote(ChannelServerBlock)
    # A lost pool or server block is restarted by Ray (same handle, so every endpoint stays valid);
    # the coordinator restores its state from the round-start snapshot (see Coordinator).
    # Ray keeps a restarted actor's constructor arguments only if someone holds them: one over
    # 100 KB that Ray put in the object store itself is gone after the first start, and the actor
    # can never come back (ray#53727). So every argument that may be large (a plug-in algorithm or
    # model travels by value; a pool's share of the partition grows with samples and clients) goes
    # in by a reference the executor keeps (`keep_alive`) for as long as the actors live.
    cls_ref, bp_ref = ray.put(algorithm_cls), ray.put(blueprint)
    servers = [server_actor.options(num_cpus=cluster.server_cpus, num_gpus=cluster.server_gpus, max_restarts=3,
                                    name=None).remote(cls_ref, bp_ref, i, cluster.server_gpus > 0)
               for i in range(0 if in_pool else servers_n)]
    # A pool waits on its server block per batch: far less work than a client call.
    endpoints = [RayEndpoint(s, cluster.task_timeout_s or FIRST_WAIT_S, i) for i, s in enumerate(servers)]
    x_ref, y_ref = ray.put(train_x), ray.put(train_y)
    pool_actor, hosting_actor = ray.remote(ChannelClientPool), ray.remote(PoolWithServer)
    pools, held = [], [cls_ref, bp_ref, x_ref, y_ref]
    shards = Partition.from_lists(shards)
    for p in range(pools_n):
        # A view (the partition's two arrays and a range of client ids): no per-client object.
        held.append(ray.put(shards.hosted(p, pools_n)))
        if in_pool:
            gpus = in_pool_gpus(cluster)
            pools.append(hosting_actor.options(num_cpus=cluster.pool_cpus, num_gpus=gpus, max_restarts=3).remote(
                cls_ref, bp_ref, x_ref, y_ref, held[-1], p, min(1.0, gpus), cluster.server_gpus > 0))
        else:
            pools.append(pool_actor.options(num_cpus=cluster.pool_cpus, num_gpus=cluster.client_gpus, max_restarts=3)
                         .remote(cls_ref, bp_ref, x_ref, y_ref, held[-1], endpoints, cluster.client_gpus))
    wait = cluster.task_timeout_s or FIRST_WAIT_S
    try:
        ray.get([a.ping.remote() for a in servers + pools], timeout=wait)
    except ray.exceptions.GetTimeoutError:
        raise TimeoutError(f"{pools_n} pool(s) and {servers_n} server block(s) were not all scheduled within "
                           f"{wait}s; cluster resources: {ray.cluster_resources()}") from None
    log.info("started %d client pool(s) and %d server block(s)%s", pools_n, servers_n, " in them" if in_pool else "")
    ex = RayExecutor(pools, list(pools) if in_pool else servers, cluster.task_timeout_s, blueprint, cluster,
                     portable=frozenset(algorithm_cls.portable_programs))
    # The actors' constructor arguments must outlive start-up: Ray re-reads them to restart one.
    ex.keep_alive = tuple(held)
    links = ex.connect()
    log.info("device<->server exchange: %d pool-server pair(s) on channels, %d on actor calls, %d in one process",
             links["channels"], links["actor_calls"], links.get("in_pool", 0))
    return ex
