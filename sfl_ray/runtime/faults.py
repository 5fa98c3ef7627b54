"""Lost actors as the runtime sees them, whatever backend lost them.

A pool or server block whose process died raises `ActorLost` wherever it is waited on (the
schedule, a client's link to its server block); the coordinator then waits for the restarted
actors, restores the round-start snapshot and runs the round again, so that its result is the
same as without the fault.
"""

from __future__ import annotations


class ActorLost(RuntimeError):
    """A client pool or server block process is gone; the message names which and where."""
