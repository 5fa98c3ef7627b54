"""Turns at a server block: a sequential round run by all pools at once, in its order.

A sequential schedule (SplitFed v2) has one server block see one client's batches at a time,
in the schedule's order. Run one client call after another, every hand-over costs a round trip
through the coordinator while the cores wait. With turns, the coordinator gives every pool its
clients at once and tells the server block the order: a pool starts its next client as soon as
it can (loading weights, its first forward), and the block serves a client's requests only on
that client's turn; the pool passes the turn when the client's program returns. The server
steps run in exactly the sequential order, so the numbers are those of the one-by-one run.
"""

from __future__ import annotations

import threading
from typing import Optional, Sequence

from sfl_ray.runtime.faults import ActorLost

PASS_TURN = "__pass_turn__"  # the request a pool sends when a client's program has returned


class TurnGate:
    """The order in which clients may reach one server block during a sequence."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._seq: Optional[int] = None
        self._order: list[int] = []
        self._turn = 0
        self.passed = 0  # turns passed so far (health and tests)

    def begin(self, seq: int, order: Sequence[int]) -> None:
        """Sequence `seq` starts: its clients reach this block in `order`."""
        with self._cond:
            self._seq, self._order, self._turn = seq, list(order), 0
            self._cond.notify_all()

    def end(self, seq: int) -> None:
        """Sequence `seq` is over (done or abandoned): whoever still waits in it is released with
        ActorLost, and nothing of it is served any more."""
        with self._cond:
            if self._seq == seq:
                self._seq = None
            self._cond.notify_all()

    def wait_turn(self, seq: int, client: int) -> None:
        """Block until it is `client`'s turn in sequence `seq`."""
        with self._cond:
            while True:
                if self._seq != seq:
                    raise ActorLost(f"client {client}'s sequential round was abandoned")
                if self._turn < len(self._order) and self._order[self._turn] == client:
                    return
                if client not in self._order[self._turn:]:
                    raise ActorLost(f"client {client} has no turn left in this sequential round")
                self._cond.wait()

    def pass_turn(self, seq: int, client: int) -> None:
        """`client` is done with this block: the next client's turn (after its own came)."""
        with self._cond:  # re-entrant: the turn cannot move between the wait and the pass
            self.wait_turn(seq, client)
            self._turn += 1
            self.passed += 1
            self._cond.notify_all()
