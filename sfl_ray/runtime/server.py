"""A server block: hosts an algorithm's server program, counts its FLOPs.

Requests from clients arrive as numpy arrays (zero-copy from the object store) and are
handed to the program as tensors; replies go back as numpy arrays.
"""

from __future__ import annotations

import logging
import threading
import traceback
from typing import Any, Callable, Optional

import torch
from sfl_ray.metrics.device_cost import FlopCache, FlopCounter

from sfl_ray.runtime import bulk
from sfl_ray.runtime.codec import decode
from sfl_ray.runtime.pool import where_am_i
from sfl_ray.runtime.precision import autocast
from sfl_ray.runtime.protocol import Algorithm, Blueprint, ServerContext
from sfl_ray.runtime.turns import PASS_TURN, TurnGate
from sfl_ray.runtime.wire import owned, pack, to_tensor

log = logging.getLogger("sfl_ray.server")


def _shapes(arrays: dict) -> tuple:
    return tuple(sorted((k, _shapes(v) if isinstance(v, dict) else (tuple(v.shape), str(v.dtype)))
                        for k, v in arrays.items()))


def _tensors(arrays: dict, device: torch.device) -> dict:
    return {k: (_tensors(v, device) if isinstance(v, dict) else to_tensor(v, device)) for k, v in arrays.items()}


class ServerBlock:
    """One server-block process (a whole GPU on a cluster)."""

    def __init__(self, algorithm_cls: type[Algorithm], blueprint: Blueprint, index: int, use_gpu: bool = False):
        torch.set_num_threads(blueprint.torch_threads)
        if algorithm_cls.server_cls is None:
            raise ValueError(f"algorithm {algorithm_cls.name} has no server half")
        device = torch.device("cuda") if use_gpu and torch.cuda.is_available() else torch.device("cpu")
        self.device = device
        self._after: list[Callable[[], Any]] = []  # work left for after the current reply
        self.program = algorithm_cls.server_cls(ServerContext(blueprint, index, device, put=self.put_bulk,
                                                              after_reply=self._after.append))
        self.codec = blueprint.codec
        self.precision = blueprint.precision
        self.flops = 0
        self.measure = blueprint.measure
        self.flop_cache = FlopCache()
        # Requests may arrive on channel threads (runtime.channels) besides the actor's own
        # thread: the program runs one request or control call at a time, in arrival order.
        self.lock = threading.RLock()
        self.turns = TurnGate()  # a sequential round run by every pool at once (runtime.turns)
        self._broken: Optional[str] = None  # deferred work failed after its reply left

    def _counted(self, fn, *args: Any, key: Optional[tuple] = None, link: bool = False) -> Any:
        """`fn(*args)` with its FLOPs counted (or taken from the cache under `key`). For a link
        method (`link`) the result is (reply, info, then): `then` runs the work the program left
        for after its reply (ServerContext.after_reply), or is None. Work that is being counted
        is not left for later: it runs here, inside the count, as does a schedule call's."""
        self._after.clear()  # whatever a failed call left for later is not this call's
        with autocast(self.precision, self.device):
            if self.measure == "off" or (key is not None and key in self.flop_cache.flops):
                if self.measure != "off":
                    self.flop_cache.hits += 1
                    self.flops += self.flop_cache.flops[key]
                out = fn(*args)
                if link:
                    return (*out, self._then())
                self._run_after()
                return out
            counter = FlopCounter()
            with counter:
                out = fn(*args)
                self._run_after()
        self.flops += counter.flops
        if key is not None:
            self.flop_cache.misses += 1
            self.flop_cache.flops[key] = counter.flops
        return (*out, None) if link else out

    def _run_after(self) -> None:
        for w in self._take_after():
            w()

    def _take_after(self) -> list[Callable[[], Any]]:
        work = list(self._after)
        self._after.clear()  # in place: the program's context appends to this very list
        return work

    def _then(self) -> Optional[Callable[[], None]]:
        work = self._take_after()
        if not work:
            return None

        def then() -> None:
            with autocast(self.precision, self.device):
                for w in work:
                    w()
        return then

    def call(self, method: str, client: int, arrays: dict, info: dict, seq: Optional[int] = None,
             answer: Optional[Callable[[dict, dict], None]] = None) -> tuple[dict, dict]:
        """A request from a client over the link: compressed activations are decoded here, and
        the reply's gradients compressed (link.compression). A request of sequence `seq` waits
        for its client's turn (runtime.turns), outside the lock, so that the turn can come.

        With `answer`, the reply goes to it as soon as it is ready, and work the program deferred
        past its reply (a server's optimizer step) runs after that, while the client goes on with
        its own work, yet before the block serves anything else. Without, that work runs before
        the reply is returned. The block's state after a request is the same either way."""
        if seq is not None:
            if method == PASS_TURN:
                self.turns.pass_turn(seq, client)
                if answer is not None:
                    answer({}, {})
                return {}, {}
            self.turns.wait_turn(seq, client)
        with self.lock:
            self._check_not_broken()
            reply, reply_info, then = self._call(method, client, arrays, info)
            if answer is not None:
                answer(reply, reply_info)
            if then is not None:
                try:
                    then()
                except BaseException:
                    if answer is not None:  # the reply has left: the failure is the block's from now on
                        self._broken = (f"server work deferred past a {method!r} reply to client {client} "
                                        f"failed:\n{traceback.format_exc()}")
                    raise
            return reply, reply_info

    def _check_not_broken(self) -> None:
        if self._broken is not None:
            raise RuntimeError(self._broken)

    def begin_turns(self, seq: int, order: list[int]) -> None:
        """Sequence `seq`: serve these clients' requests in this order."""
        self.turns.begin(seq, order)

    def end_turns(self, seq: int) -> None:
        self.turns.end(seq)

    def _call(self, method: str, client: int, arrays: dict, info: dict) -> tuple[dict, dict, Optional[Callable]]:
        fn = getattr(self.program, method)
        key = None
        if self.measure == "sampled" and method in self.program.flops_by_shape:
            key = (method, _shapes(arrays))
        reply, reply_info, then = self._counted(fn, client, _tensors(decode(arrays), self.device), info, key=key,
                                                link=True)
        return self.codec.encode(pack(reply)), reply_info, then

    def control(self, method: str, *args: Any) -> Any:
        """A call from the schedule (server-side work, not on the link). Bulk handles among the
        arguments (runtime.bulk) are fetched, all at once, and decoded: the program sees arrays."""
        with self.lock:
            self._check_not_broken()
            args = bulk.resolve(args, self.fetch_bulk)
            key = self.program.flop_key(method, args) if self.measure == "sampled" else None
            return self._counted(getattr(self.program, method), *args, key=key)

    # -- bulk payloads (runtime.bulk); the Ray block reads them from the object store -------
    def put_bulk(self, stored: dict) -> object:
        """Store bulk payloads the program hands back; returns what a `Bulk` handle refers to."""
        return owned(stored)

    def fetch_bulk(self, refs: list) -> list:
        """The stored objects `refs` refer to."""
        return bulk.local_fetch(refs)

    def pop_flops(self) -> int:
        """FLOPs since the last call (the coordinator reads this once per round)."""
        with self.lock:
            f, self.flops = self.flops, 0
        return f

    def ping(self) -> dict:
        return {**where_am_i(), "device": str(self.device), "turns_passed": self.turns.passed}
