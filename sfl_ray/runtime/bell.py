"""A doorbell between two processes on one node: the reader of a shared-memory channel sleeps on
it instead of spinning.

Ray's channel read waits by polling (`sched_yield` in a loop), so a waiting reader keeps a core
busy: a server block's thread per pool waits for requests, each pool waits for its replies. On a
node with fewer cores than processes those spinners take the CPU the clients and the server step
need. The writer rings after its write has returned, so a reader that wakes finds the message
sealed and its read returns at once. One datagram per message on a Unix socket: on Linux in the
abstract namespace (no file, gone with the socket), elsewhere a path in the temp directory.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import uuid
from typing import Optional


class Bell:
    """One direction's wake-up: `listen` once in the reading process, `ring` per message in the
    writing one, `wait` before each read. Pickles as its name only."""

    def __init__(self, name: Optional[str] = None):
        self.name = name or f"sfl_ray-{uuid.uuid4().hex[:20]}"
        self._sock: Optional[socket.socket] = None
        self._listening = False

    def __getstate__(self) -> dict:
        return {"name": self.name}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["name"])

    @property
    def address(self) -> str:
        if sys.platform.startswith("linux"):
            return "\0" + self.name
        return os.path.join(tempfile.gettempdir(), self.name + ".bell")

    def listen(self) -> "Bell":
        """Bind the reading end (before any writer rings)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(self.address)
        self._sock, self._listening = sock, True
        return self

    def ring(self) -> None:
        """Wake the reader; raises ConnectionError if nobody listens any more (its process is gone)."""
        if self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self._sock.sendto(b"\1", self.address)
        except FileNotFoundError as err:  # a path-bound bell whose reader removed it
            raise ConnectionRefusedError(str(err)) from None

    def wait(self, timeout: Optional[float]) -> bool:
        """Sleep until rung (True) or `timeout` seconds pass (False); None waits for ever."""
        if not self._listening or self._sock is None:
            raise RuntimeError(f"wait() on bell {self.name}, which does not listen")
        self._sock.settimeout(timeout)
        try:
            self._sock.recv(16)
            return True
        except (socket.timeout, BlockingIOError):
            return False

    def close(self) -> None:
        """Stop listening (a writer's next ring then fails) or drop the writing socket."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._listening and not self.address.startswith("\0"):
            try:
                os.unlink(self.address)
            except OSError:
                pass
        self._listening = False
