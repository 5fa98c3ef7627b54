"""The fast device<->server path on one node: Ray shared-memory channels, the transport under
Ray Compiled Graphs, one request/reply pair per (client pool, server block).

A Compiled Graph itself does not fit this exchange: only the process that compiles a graph may
run it, and an actor takes part in one graph at a time, while here every pool starts its own
exchanges with the same server block, per batch, from inside a client program. The channels a
graph would use do fit: the pool writes a request (numpy arrays, serialised out of band, read
zero-copy), a thread in the server block reads it, runs the server program under the block's
lock and writes the reply. A round trip costs a memory copy and a wake-up instead of a task
submission (see bench/transfer.py). Pools and server blocks on different nodes keep actor calls.
A reader sleeps on a doorbell (runtime.bell) until its message is there: Ray's channel read
polls, and a poller per waiting thread would take the cores the clients train on.

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
from ray.experimental.channel.shared_memory_channel import Channel

from sfl_ray.runtime.bell import Bell
from sfl_ray.runtime.faults import ActorLost
from sfl_ray.runtime.pool import ClientPool
from sfl_ray.runtime.server import ServerBlock
from sfl_ray.runtime.turns import PASS_TURN
from sfl_ray.runtime.wire import owned

log = logging.getLogger("sfl_ray.channels")

BUFFER_BYTES = 1 << 20  # grows on demand (the channel resizes itself for a larger payload)
POLL_S = 2.0            # how often a waiting pool checks that its server block still lives
_CLOSED = getattr(ray.exceptions, "RayChannelError", RuntimeError)
_TIMEOUT = getattr(ray.exceptions, "RayChannelTimeoutError", TimeoutError)


def _me() -> Any:
    return ray.get_runtime_context().current_actor


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
    """A pool's way to a server block on its node, through a channel pair."""

    def __init__(self, request: Channel, reply: Channel, server: Any, server_pid: int, index: int, timeout_s: float,
                 request_bell: Bell, reply_bell: Bell):
        self.request, self.reply, self.server = request, reply, server
        self.server_pid, self.index, self.timeout_s = server_pid, index, timeout_s
        self.request_bell, self.reply_bell = request_bell, reply_bell.listen()

    def _check_alive(self, method: str) -> None:
        try:
            pid = ray.get(self.server.ping.remote(), timeout=60)["pid"]
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as err:
            raise ActorLost(f"server block {self.index} lost during {method!r}: {type(err).__name__}") from None
        if pid != self.server_pid:  # restarted: its channels went with the old process
            raise ActorLost(f"server block {self.index} was restarted during {method!r}")

    def _wait(self, op, method: str, client: int) -> Any:
        end = time.monotonic() + self.timeout_s
        while True:
            try:
                return op(min(POLL_S, max(0.0, end - time.monotonic())))
            except _TIMEOUT:
                self._check_alive(method)
                if time.monotonic() >= end:
                    raise TimeoutError(f"server block {self.index} did not answer {method!r} from client {client} "
                                       f"within cluster.task_timeout_s={self.timeout_s}s") from None
            except _CLOSED:
                raise ActorLost(f"server block {self.index}: its channel closed during {method!r}") from None

    def _wait_for_reply(self, method: str, client: int) -> None:
        end = time.monotonic() + self.timeout_s
        while not self.reply_bell.wait(min(POLL_S, max(0.0, end - time.monotonic()))):
            self._check_alive(method)
            if time.monotonic() >= end:
                raise TimeoutError(f"server block {self.index} did not answer {method!r} from client {client} "
                                   f"within cluster.task_timeout_s={self.timeout_s}s")

    seq: Optional[int] = None  # the sequence (runtime.turns) the current client's requests belong to

    def call(self, method: str, client: int, arrays: dict, info: dict) -> tuple[dict, dict]:
        self._wait(lambda t: self.request.write((method, client, arrays, info, self.seq), timeout=t), method, client)
        try:
            self.request_bell.ring()
        except OSError:  # nobody listens: the block's process is gone
            self._check_alive(method)
            raise ActorLost(f"server block {self.index} stopped listening during {method!r}") from None
        self._wait_for_reply(method, client)
        status, *body = self._wait(lambda t: self.reply.read(timeout=t), method, client)
        if status == "error":
            raise RuntimeError(f"server block {self.index} failed in {method!r}:\n{body[0]}")
        if status == "lost":  # the sequence was abandoned (a lost actor elsewhere): the round re-runs
            raise ActorLost(f"server block {self.index}: {body[0]}")
        reply, reply_info = body
        return owned(reply), reply_info  # out of the reply buffer: receivers keep what they get

    def pass_turn(self, client: int) -> None:
        """`client`'s program has returned: the next client's turn at this block."""
        self.call(PASS_TURN, client, {}, {})


class ChannelClientPool(ClientPool):
    """A client pool that can reach server blocks on its node through channels."""

    def put_bulk(self, stored: dict) -> Any:
        return put_bulk(stored)

    def fetch_bulk(self, refs: list) -> list:
        return fetch_bulk(refs)

    def open_request_channel(self, server: Any, server_node: str) -> Channel:
        """The channel this pool writes requests to, read by `server` (a Channel is made by its writer)."""
        return Channel(_me(), [(server, server_node)], BUFFER_BYTES)

    def use_channels(self, index: int, request: Channel, reply: Channel, server: Any, server_pid: int,
                     timeout_s: float, request_bell: Bell, reply_bell: Bell) -> None:
        """Reach server block `index` through this channel pair (and their bells) from now on."""
        request.ensure_registered_as_writer()
        reply.ensure_registered_as_reader()
        old = self.servers[index]
        if isinstance(old, ChannelEndpoint):
            old.reply_bell.close()
        self.servers[index] = ChannelEndpoint(request, reply, server, server_pid, index, timeout_s,
                                              request_bell, reply_bell)

    def call_server(self, index: int, method: str, arrays: dict) -> str:
        """Send one request to server block `index` the way clients do; the reply's kinds, or the
        error it raised (for health checks and tests)."""
        try:
            reply, _ = self.servers[index].call(method, -1, arrays, {})
            return ",".join(sorted(reply))
        except Exception as err:  # noqa: BLE001 - reported, not raised
            return str(err)


class ChannelServerBlock(ServerBlock):
    """A server block that also answers requests arriving on channels, one thread per pool."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._serving: dict[int, tuple[Channel, Channel, Bell]] = {}

    def put_bulk(self, stored: dict) -> Any:
        return put_bulk(stored)

    def fetch_bulk(self, refs: list) -> list:
        return fetch_bulk(refs)

    def open_reply_channel(self, pool: Any, pool_node: str) -> Channel:
        """The channel this block writes replies to, read by `pool`."""
        return Channel(_me(), [(pool, pool_node)], BUFFER_BYTES)

    def serve(self, pool_index: int, request: Channel, reply: Channel, request_bell: Bell, reply_bell: Bell) -> int:
        """Answer pool `pool_index`'s requests from now on (ending the thread that served an earlier
        incarnation of that pool); returns this process's id, which the pool watches."""
        import os
        old = self._serving.pop(pool_index, None)
        if old is not None:
            for ch in old[:2]:
                try:
                    ch.close()  # the old thread's read fails and it ends
                except Exception:  # noqa: BLE001 - a channel of a dead process may not close cleanly
                    pass
            try:
                old[2].ring()  # wake it to find its channel closed
            except OSError:
                pass
        request_bell.listen()  # before the pool can ring it
        t = threading.Thread(target=self._serve_loop, args=(pool_index, request, reply, request_bell, reply_bell),
                             daemon=True, name=f"sfl-channel-{pool_index}")
        self._serving[pool_index] = (request, reply, request_bell)
        t.start()
        return os.getpid()

    def _serve_loop(self, pool_index: int, request: Channel, reply: Channel, request_bell: Bell,
                    reply_bell: Bell) -> None:
        try:
            request.ensure_registered_as_reader()
            reply.ensure_registered_as_writer()
            while True:
                request_bell.wait(None)
                msg = request.read()
                method, client, arrays, info, seq = msg
                arrays = owned(arrays)  # out of the request buffer: the next message reuses it
                del msg  # release the request buffer before the (long) server step
                try:
                    out = ("ok", *self.call(method, client, arrays, info, seq))
                except ActorLost as err:
                    out = ("lost", str(err))
                except Exception:  # noqa: BLE001 - the client program raises it, as an actor call would
                    out = ("error", traceback.format_exc())
                reply.write(out)
                try:
                    reply_bell.ring()
                except OSError:  # the pool's process is gone; a new incarnation gets a new pair
                    pass
        except _CLOSED:
            return  # replaced by a newer pool incarnation, or shutting down
        except Exception:  # noqa: BLE001 - a dead loop must say why; the pool then times out and checks us
            log.exception("channel thread for pool %d ended", pool_index)
        finally:
            request_bell.close()
