"""One direction of a request/reply exchange between two processes on one host: the arrays'
bytes in shared memory, a datagram to say a message is there.

A message is pickled (protocol 5) with its arrays out of band: their bytes are copied once into
a shared mapping the writer owns, the small pickle beside them, and a datagram on a Unix socket
(Linux: the abstract namespace, no file; elsewhere a file in a directory of the user's own)
tells the reader where they are. The reader sleeps on its socket (no polling: a waiting thread
takes no core), copies the arrays out (what it keeps is its own, writable) and unpickles. The
mapping is an anonymous file (`memfd_create`, or an unlinked temporary file) whose descriptor
travels with the datagram that first needs it (SCM_RIGHTS): nothing is named, nothing is left
behind when both processes are gone, and a larger message moves to a larger mapping.

Only the reader's own user may write to it: on Linux the socket asks the kernel for each sender's
credentials (SO_PASSCRED) and drops a datagram from another user unread (abstract sockets are
listed in /proc/net/unix for everyone to see, and a message is unpickled); elsewhere the socket
file lives in a directory only its user may enter.

The writer may reuse its mapping as soon as the reader has its copy: in a request/reply pair a
side writes again only after it has read the other's answer. A small message without arrays (a
client passing its turn) travels in the datagram alone and leaves the mapping alone, so it needs
no answer. A message carries a tag (the request's number), so that an answer to an abandoned
request is recognised and dropped.
"""

from __future__ import annotations

import mmap
import os
import pickle
import socket
import struct
import sys
import tempfile
import time
import uuid
from array import array
from typing import Any, Optional

import numpy as np

ALIGN = 64
CLOSED = object()  # what `recv` returns when the writer said the pipe is closed
# A datagram says where a message's parts are. Up to this many parts it lists them itself (a few
# hundred bytes; datagrams may be as small as 2 KiB, macOS's default); beyond, the listing is one
# more part in the mapping and the datagram says where that is.
SPANS_IN_DATAGRAM = 64
# A message of no arrays and at most this many bytes travels in its datagram: the mapping stays
# untouched, so such a message may be sent without waiting for an answer (see `send`).
INLINE_BYTES = 1024


# Linux: sockets in the abstract namespace (no file), senders' credentials checked per datagram.
_ABSTRACT = sys.platform.startswith("linux")
_ANCILLARY = socket.CMSG_SPACE(3 * 4) + socket.CMSG_SPACE(4 * 4)  # credentials + a few descriptors


def _private_dir() -> str:
    """Where socket files go without an abstract namespace: a directory only this user may enter
    (short: a socket path may be ~100 bytes, and macOS's temp directory takes most of that)."""
    base = "/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir()
    path = os.path.join(base, f"sfl_ray-{os.getuid()}")
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.lstat(path)
    if st.st_uid != os.getuid() or st.st_mode & 0o077 or not os.path.isdir(path) or os.path.islink(path):
        raise PermissionError(f"{path} must be a directory of this user's only (mode 700) for sfl_ray's pipes")
    return path


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _anonymous_file(size: int) -> int:
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("sfl_ray-pipe", getattr(os, "MFD_CLOEXEC", 0))
    else:  # an unlinked temporary file: gone when the last descriptor closes
        f = tempfile.TemporaryFile()
        fd = os.dup(f.fileno())
        f.close()
    os.ftruncate(fd, size)
    return fd


class Pipe:
    """`listen` once in the reading process, then `recv`; `send` in the writing one. Pickles as
    its name only, so both ends are made from one `Pipe()`."""

    def __init__(self, name: Optional[str] = None):
        self.name = name or f"sfl_ray-{uuid.uuid4().hex[:20]}"
        self._sock: Optional[socket.socket] = None
        self._listening = False
        self._map: Optional[mmap.mmap] = None
        self.dropped = 0  # datagrams from other users, dropped unread

    def __getstate__(self) -> dict:
        return {"name": self.name}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["name"])

    @property
    def address(self) -> str:
        if _ABSTRACT:
            return "\0" + self.name
        return os.path.join(_private_dir(), self.name + ".pipe")

    def listen(self) -> "Pipe":
        """Bind the reading end (before any writer sends)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if _ABSTRACT:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)  # before bind: no datagram unvetted
        sock.bind(self.address)
        self._sock, self._listening = sock, True
        return self

    # -- writing ---------------------------------------------------------------------------
    def send(self, obj: Any, tag: int = 0, inline: bool = False) -> int:
        """Write `obj` and tell the reader; returns the bytes written to shared memory. Raises
        OSError (ConnectionRefusedError) if nobody listens any more: the reader's process is gone.

        A small message without arrays goes in the datagram alone. `inline=True` insists on that
        (ValueError otherwise): a message sent without waiting for its answer must leave the
        mapping to the next one, which may be written before the reader has read this one."""
        buffers: list = []
        header = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
        if not buffers and len(header) <= INLINE_BYTES:
            self._datagram(pickle.dumps((tag, header)), [])
            return 0
        if inline:
            raise ValueError(f"a message of {len(buffers)} arrays and {len(header)} bytes cannot go in a datagram")
        raws = [b.raw() for b in buffers]
        parts = [memoryview(header)] + raws
        spans, offset = [], 0
        for p in parts:
            spans.append((offset, p.nbytes))
            offset += _aligned(p.nbytes)
        where: Any = spans
        writes = list(zip(spans, parts))
        if len(spans) > SPANS_IN_DATAGRAM:  # a message of many arrays: its spans go in the mapping too
            listing = pickle.dumps(spans)
            where = (offset, len(listing))
            writes.append((where, memoryview(listing)))
            offset += _aligned(len(listing))
        fds: list[int] = []
        if self._map is None or len(self._map) < offset:
            size = max(offset, 2 * len(self._map) if self._map is not None else 1 << 20)
            fd = _anonymous_file(size)
            if self._map is not None:
                self._map.close()
            self._map = mmap.mmap(fd, size)
            fds = [fd]
        try:
            with memoryview(self._map) as view:
                for (start, n), p in writes:
                    if n:
                        np.frombuffer(view, np.uint8, n, start)[:] = np.frombuffer(p.cast("B"), np.uint8)
            for r in raws:
                r.release()
            self._datagram(pickle.dumps((tag, where)), fds)
        finally:
            for fd in fds:  # the mapping and the datagram in flight hold the file
                os.close(fd)
        return offset

    def _datagram(self, meta: bytes, fds: list[int]) -> None:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array("i", fds))] if fds else []
        try:
            self._writer().sendmsg([meta], anc, 0, self.address)
        except FileNotFoundError as err:  # a path-bound pipe whose reader removed it
            raise ConnectionRefusedError(str(err)) from None

    def send_close(self) -> None:
        """Tell the reader this pipe is done (its `recv` returns CLOSED)."""
        self._writer().sendto(b"", self.address)

    def _writer(self) -> socket.socket:
        if self._sock is None:  # a writer's socket is unbound: made on first use
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        return self._sock

    # -- reading ---------------------------------------------------------------------------
    def recv(self, timeout: Optional[float]) -> Any:
        """(tag, obj) once a message is there, None after `timeout` seconds (None: wait for
        ever), CLOSED if the writer closed the pipe."""
        if not self._listening or self._sock is None:
            raise RuntimeError(f"recv() on pipe {self.name}, which does not listen")
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._sock.settimeout(None if deadline is None else max(0.0, deadline - time.monotonic()))
            try:
                data, anc, _, _ = self._sock.recvmsg(1 << 16, _ANCILLARY)
            except (socket.timeout, BlockingIOError):
                return None
            fds, uid = array("i"), None
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
                elif _ABSTRACT and level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    uid = struct.unpack("3i", payload[:12])[1]  # (pid, uid, gid), vouched for by the kernel
            if not _ABSTRACT or uid == os.getuid():
                break
            for fd in fds:  # another user's: dropped unread
                os.close(fd)
            self.dropped += 1
        for fd in fds[:-1]:
            os.close(fd)
        if fds:
            try:
                if self._map is not None:
                    self._map.close()
                self._map = mmap.mmap(fds[-1], os.fstat(fds[-1]).st_size)
            finally:
                os.close(fds[-1])
        if not data:
            return CLOSED
        tag, spans = pickle.loads(data)
        if isinstance(spans, bytes):  # the message itself, sent in the datagram
            return tag, pickle.loads(spans)
        with memoryview(self._map) as view:
            if isinstance(spans, tuple):  # (offset, size) of the spans' listing in the mapping
                spans = pickle.loads(view[spans[0]:spans[0] + spans[1]])
            (h0, hn), rest = spans[0], spans[1:]
            header = bytes(view[h0:h0 + hn])
            # copies (the writer reuses the mapping) made by numpy: bytearray(view) copies at a
            # fifth of memcpy speed
            buffers = [np.frombuffer(view, np.uint8, n, s).copy() for s, n in rest]
        return tag, pickle.loads(header, buffers=buffers)

    def close(self) -> None:
        """Stop listening (a writer's next send then fails) and drop the mapping."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._map is not None:
            self._map.close()
            self._map = None
        if self._listening and not self.address.startswith("\0"):
            try:
                os.unlink(self.address)
            except OSError:
                pass
        self._listening = False
