"""The fast device<->server path on one node: a request/reply pipe pair per (client pool,
server block), in shared memory (runtime.pipe).

Ray Compiled Graphs do not fit this exchange: only the process that compiles a graph may run it,
and an actor takes part in one graph at a time, while here every pool starts its own exchanges
with the same server block, per batch, from inside a client program. Ray's shared-memory
channels (what a graph runs on) did fit, and were this path before; they poll while waiting and
cost 150-200 us per write or read inside a round. A pipe pair does what they did with less: the
pool writes a request (arrays copied once into shared memory, never pickled), a thread in the
server block, asleep on its socket until then, reads it, runs the server program under the
block's lock and writes the reply. A round trip costs two copies each way and two wake-ups
instead of a task submission (see bench/transfer.py). Pools and server blocks on different nodes
keep actor calls.

These are the Ray backend's actor classes: they also keep bulk payloads (runtime.bulk) in the
object store, so that the coordinator passes references, never the arrays.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from typing import Any, Optional

import ray

from sfl_ray.runtime.faults import ActorLost
from sfl_ray.runtime.local_backend import LocalEndpoint
from sfl_ray.runtime.pipe import CLOSED, Pipe
from sfl_ray.runtime.pool import ClientPool
from sfl_ray.runtime.server import ServerBlock
from sfl_ray.runtime.turns import PASS_TURN

log = logging.getLogger("sfl_ray.channels")

POLL_S = 2.0            # how often a waiting pool checks that its server block still lives


def put_bulk(stored: dict) -> Any:
    """One object in the object store, owned by this actor: it lives while someone holds a
    reference to it, and is lost if this actor's process dies."""
    return ray.put(stored)


def fetch_bulk(refs: list) -> list:
    """The objects `refs` refer to, in one read; an object whose owner died is a lost actor."""
    try:
        return ray.get(refs)
    except ray.exceptions.ObjectLostError as err:
        raise ActorLost(f"a bulk payload was lost with the process that stored it ({type(err).__name__})") from None


class ChannelEndpoint:
    """A pool's way to a server block on its node, through a pipe pair."""

    def __init__(self, server: Any, server_pid: int, index: int, timeout_s: float, request: Pipe, reply: Pipe):
        self.server, self.server_pid, self.index, self.timeout_s = server, server_pid, index, timeout_s
        self.request, self.reply = request, reply.listen()
        self._tag = 0
        self._broken: Optional[str] = None

    def _check_alive(self, method: str) -> None:
        try:
            pid = ray.get(self.server.ping.remote(), timeout=60)["pid"]
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as err:
            raise ActorLost(f"server block {self.index} lost during {method!r}: {type(err).__name__}") from None
        if pid != self.server_pid:  # restarted: its pipes went with the old process
            raise ActorLost(f"server block {self.index} was restarted during {method!r}")

    seq: Optional[int] = None  # the sequence (runtime.turns) the current client's requests belong to

    def _send(self, method: str, client: int, arrays: dict, info: dict, inline: bool = False) -> None:
        """Write one request under the next tag (`inline`: in its datagram, see Pipe.send)."""
        if self._broken:  # a request the block may still be reading: its memory must not be rewritten
            raise TimeoutError(self._broken)
        self._tag += 1
        try:
            self.request.send((method, client, arrays, info, self.seq), self._tag, inline=inline)
        except OSError:  # nobody listens: the block's process is gone
            self._check_alive(method)
            raise ActorLost(f"server block {self.index} stopped listening during {method!r}") from None

    def call(self, method: str, client: int, arrays: dict, info: dict) -> tuple[dict, dict]:
        self._send(method, client, arrays, info)
        end = time.monotonic() + self.timeout_s
        while True:
            got = self.reply.recv(min(POLL_S, max(0.0, end - time.monotonic())))
            if got is None:
                self._check_alive(method)
                if time.monotonic() >= end:
                    self._broken = (f"server block {self.index} did not answer {method!r} from client {client} "
                                    f"within cluster.task_timeout_s={self.timeout_s}s")
                    raise TimeoutError(self._broken)
                continue
            if got is not CLOSED and got[0] == self._tag:
                break  # (an answer to an earlier, abandoned request is dropped)
        status, *body = got[1]
        if status == "error":
            raise RuntimeError(f"server block {self.index} failed in {method!r}:\n{body[0]}")
        if status == "lost":  # the sequence was abandoned (a lost actor elsewhere): the round re-runs
            raise ActorLost(f"server block {self.index}: {body[0]}")
        reply, reply_info = body
        return reply, reply_info  # copied out of shared memory: the receiver owns it

    def pass_turn(self, client: int, wait: bool = True) -> None:
        """`client`'s program has returned: the next client's turn at this block. With `wait`
        False the pool goes on at once (its next request queues behind this one on the pipe, so
        the block sees them in order) and a failure comes back as the next request's answer; the
        last pass of a pool's share waits, so that nothing of a round is left unanswered."""
        if wait:
            self.call(PASS_TURN, client, {}, {})
        else:  # in the datagram: the next request may be written before the block reads this one
            self._send(PASS_TURN, client, {}, {"answer": False}, inline=True)

    def close(self) -> None:
        self.reply.close()


class ChannelClientPool(ClientPool):
    """A client pool that can reach server blocks on its node through channels."""

    def put_bulk(self, stored: dict) -> Any:
        return put_bulk(stored)

    def fetch_bulk(self, refs: list) -> list:
        return fetch_bulk(refs)

    def use_channels(self, index: int, server: Any, server_pid: int, timeout_s: float, request: Pipe,
                     reply: Pipe) -> None:
        """Reach server block `index` through this pipe pair from now on."""
        old = self.servers[index]
        if isinstance(old, ChannelEndpoint):
            old.close()
        self.servers[index] = ChannelEndpoint(server, server_pid, index, timeout_s, request, reply)

    def call_server(self, index: int, method: str, arrays: dict) -> str:
        """Send one request to server block `index` the way clients do; the reply's kinds, or the
        error it raised (for health checks and tests)."""
        try:
            reply, _ = self.servers[index].call(method, -1, arrays, {})
            return ",".join(sorted(reply))
        except Exception as err:  # noqa: BLE001 - reported, not raised
            return str(err)


class ChannelServerBlock(ServerBlock):
    """A server block that also answers requests arriving on pipes, one thread per pool."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._serving: dict[int, Pipe] = {}  # pool -> the request pipe its thread listens on

    def put_bulk(self, stored: dict) -> Any:
        return put_bulk(stored)

    def fetch_bulk(self, refs: list) -> list:
        return fetch_bulk(refs)

    def serve(self, pool_index: int, request: Pipe, reply: Pipe) -> int:
        """Answer pool `pool_index`'s requests from now on (ending the thread that served an earlier
        incarnation of that pool); returns this process's id, which the pool watches."""
        import os
        old = self._serving.pop(pool_index, None)
        if old is not None:
            try:
                Pipe(old.name).send_close()  # the old thread wakes, finds it closed and ends
            except OSError:
                pass
        request.listen()  # before the pool can send
        t = threading.Thread(target=self._serve_loop, args=(pool_index, request, reply), daemon=True,
                             name=f"sfl-channel-{pool_index}")
        self._serving[pool_index] = request
        t.start()
        return os.getpid()

    def _serve_loop(self, pool_index: int, request: Pipe, reply: Pipe) -> None:
        carried = None  # the failure of a request that wanted no answer: the next one's answer

        def send(out: tuple, tag: int) -> None:
            try:
                reply.send(out, tag)
            except OSError:  # the pool's process is gone; a new incarnation gets a new pair
                pass

        try:
            while True:
                got = request.recv(None)
                if got is CLOSED:
                    return  # replaced by a newer pool incarnation
                tag, (method, client, arrays, info, seq) = got  # copied out: the pool may write again
                wants_answer = not (method == PASS_TURN and info.get("answer") is False)
                if carried is not None:  # what follows a failure is not served: it hears the failure
                    if wants_answer:  # (the pool awaits this one; a pool's last pass is awaited)
                        send(carried, tag)
                        carried = None
                    continue
                answered = []

                def answer(out: dict, out_info: dict, tag: int = tag) -> None:
                    answered.append(True)
                    send(("ok", out, out_info), tag)

                try:
                    self.call(method, client, arrays, info, seq, answer=answer if wants_answer else None)
                    continue
                except ActorLost as err:
                    failure = ("lost", str(err))
                except Exception:  # noqa: BLE001 - the client program raises it, as an actor call would
                    # after an answer, what failed is the work deferred past it: the block says so
                    failure = ("error", (answered and self._broken) or traceback.format_exc())
                if answered or not wants_answer:  # the answer has left, or none was wanted: the next one says it
                    carried = failure
                else:
                    send(failure, tag)
        except Exception:  # noqa: BLE001 - a dead loop must say why; the pool then times out and checks us
            log.exception("channel thread for pool %d ended", pool_index)
        finally:
            request.close()
            reply.close()


class PoolWithServer(ChannelClientPool):
    """A client pool hosting a server block in the pool's own process (cluster.exchange=in_pool):
    a request is a function call, as on the local backend, with no hand-over between processes.
    Pool p hosts block p and there are as many pools as blocks, so every client the pool hosts
    (client % pools == p) talks to this block (client % blocks == p) and to no other, and no other
    pool reaches it. The block answers the executor's server calls (control, pop_flops) too."""

    def __init__(self, algorithm_cls: Any, blueprint: Any, train_x: Any, train_y: Any, shards: Any, index: int,
                 gpu_fraction: float = 0.0, server_gpu: bool = False):
        self.block = ChannelServerBlock(algorithm_cls, blueprint, index, server_gpu)
        super().__init__(algorithm_cls, blueprint, train_x, train_y, shards, [LocalEndpoint(self.block)],
                         gpu_fraction)

    def control(self, method: str, *args: Any) -> Any:
        return self.block.control(method, *args)

    def pop_flops(self) -> int:
        return self.block.pop_flops()

    def ping(self) -> dict:
        return {**super().ping(), "server_device": str(self.block.device), "turns_passed": self.block.turns.passed}
