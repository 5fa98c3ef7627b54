"""The pipe a pool and its server block exchange requests over (runtime.pipe): messages with
their arrays come out equal and owned by the reader, across processes, growing past the first
mapping; a reader sleeps until a message is there; a send nobody can hear is an error."""

import pickle
import subprocess
import sys
import time

import numpy as np
import pytest

from sfl_ray.runtime.pipe import CLOSED, SPANS_IN_DATAGRAM, Pipe


def test_a_message_with_its_arrays_comes_out_equal_and_owned():
    reader = Pipe().listen()
    writer = pickle.loads(pickle.dumps(reader))  # as the other process gets it
    try:
        act = np.random.default_rng(0).standard_normal((32, 32, 7, 7)).astype(np.float32)
        labels = np.arange(32, dtype=np.int64)
        strided = np.arange(20, dtype=np.float64).reshape(4, 5)[:, ::2]  # not contiguous: pickled in-band
        empty = np.zeros((0, 4), dtype=np.float32)
        msg = ("train_step", 3, {"activations": act, "labels": labels, "q": {"s": strided, "e": empty}},
               {"round": 1}, None)
        written = writer.send(msg, tag=7)
        assert written >= act.nbytes + labels.nbytes  # the arrays' bytes went through shared memory
        tag, (method, client, arrays, info, seq) = reader.recv(5.0)
        assert (tag, method, client, info, seq) == (7, "train_step", 3, {"round": 1}, None)
        assert np.array_equal(arrays["activations"], act) and arrays["activations"].dtype == np.float32
        assert np.array_equal(arrays["labels"], labels) and np.array_equal(arrays["q"]["s"], strided)
        assert arrays["q"]["e"].shape == (0, 4) and arrays["q"]["e"].dtype == np.float32
        # the reader's copy is its own: the writer's next message reuses the mapping
        writer.send(("x", 0, {"activations": np.zeros_like(act)}, {}, None), tag=8)
        assert np.array_equal(arrays["activations"], act)
        arrays["activations"] += 1  # and writable
        assert reader.recv(5.0)[0] == 8
    finally:
        writer.close()
        reader.close()


def test_a_message_larger_than_the_mapping_moves_to_a_larger_one():
    reader, writer = Pipe().listen(), None
    try:
        writer = Pipe(reader.name)
        for n in (1000, 3 << 20, 10, 9 << 20):  # past the 1 MiB first mapping, twice, and back
            a = np.full(n, n % 251, dtype=np.uint8)
            writer.send({"a": a}, tag=n)
            tag, got = reader.recv(5.0)
            assert tag == n and np.array_equal(got["a"], a)
    finally:
        writer.close()
        reader.close()


def test_a_send_from_another_process_wakes_a_sleeping_reader():
    reader = Pipe().listen()
    try:
        code = ("import pickle, sys, time, numpy as np; from sfl_ray.runtime.pipe import Pipe; time.sleep(0.3); "
                "pickle.loads(bytes.fromhex(sys.argv[1])).send({'g': np.arange(300000, dtype=np.float32)}, tag=5)")
        proc = subprocess.Popen([sys.executable, "-c", code, pickle.dumps(Pipe(reader.name)).hex()])
        t0 = time.monotonic()
        tag, got = reader.recv(30.0)
        assert tag == 5 and np.array_equal(got["g"], np.arange(300000, dtype=np.float32))
        assert time.monotonic() - t0 < 29.0
        assert proc.wait(30) == 0  # the writer exited: what the reader got is still there
        assert got["g"][-1] == 299999
    finally:
        reader.close()


def test_a_message_of_many_arrays_lists_its_parts_in_shared_memory():
    """More parts than a datagram lists (a model's weights, tensor by tensor): the listing goes in
    the mapping, and every array still comes out equal."""
    reader = Pipe().listen()
    writer = Pipe(reader.name)
    try:
        weights = {f"layer{i}.weight": np.full((i % 7 + 1, 3), i, dtype=np.float32) for i in range(3000)}
        assert len(weights) > SPANS_IN_DATAGRAM
        writer.send(("set", 0, weights, {}, None), tag=11)
        tag, (_, _, got, _, _) = reader.recv(5.0)
        assert tag == 11 and got.keys() == weights.keys()
        assert all(np.array_equal(got[k], v) for k, v in weights.items())
        writer.send({"few": np.ones(4)}, tag=12)  # and back to a listing in the datagram
        tag, got = reader.recv(5.0)
        assert tag == 12 and np.array_equal(got["few"], np.ones(4))
    finally:
        writer.close()
        reader.close()


def test_timeouts_close_and_a_reader_that_is_gone():
    reader = Pipe().listen()
    writer = Pipe(reader.name)
    t0 = time.monotonic()
    assert reader.recv(0.2) is None  # nothing sent: the wait sleeps out its timeout
    assert 0.15 <= time.monotonic() - t0 < 2.0
    writer.send_close()
    assert reader.recv(1.0) is CLOSED
    reader.close()
    with pytest.raises(OSError):
        writer.send({"a": np.zeros(3)})
    writer.close()
    with pytest.raises(RuntimeError, match="does not listen"):
        Pipe().recv(0.01)


def test_where_there_is_no_abstract_namespace_the_socket_is_a_file_removed_on_close(monkeypatch):
    import os

    from sfl_ray.runtime import pipe as pipe_module
    monkeypatch.setattr(pipe_module, "_ABSTRACT", False)
    reader = Pipe().listen()
    assert not reader.address.startswith("\0") and os.path.exists(reader.address)
    assert os.stat(os.path.dirname(reader.address)).st_mode & 0o777 == 0o700  # only this user gets in
    writer = Pipe(reader.name)
    writer.send({"a": np.arange(5)}, tag=1)
    tag, got = reader.recv(5.0)
    assert tag == 1 and np.array_equal(got["a"], np.arange(5))
    reader.close()
    assert not os.path.exists(reader.address)
    with pytest.raises(ConnectionRefusedError):  # the path is gone: nobody listens
        writer.send({"a": np.zeros(1)})
    writer.close()


def test_a_datagram_from_another_user_is_dropped_unread(monkeypatch):
    """The reader takes only its own user's datagrams (the kernel says who sent each): here the
    reader believes it is someone else, so what this process sends is another user's."""
    import os

    reader = Pipe().listen()
    writer = Pipe(reader.name)
    try:
        real = os.getuid()
        monkeypatch.setattr(os, "getuid", lambda: real + 1)
        writer.send({"a": np.arange(3)}, tag=1)
        assert reader.recv(0.3) is None and reader.dropped == 1
        monkeypatch.setattr(os, "getuid", lambda: real)
        writer.close()
        writer = Pipe(reader.name)  # (the dropped datagram carried the first writer's mapping)
        writer.send({"a": np.arange(4)}, tag=2)
        tag, got = reader.recv(5.0)
        assert tag == 2 and np.array_equal(got["a"], np.arange(4)) and reader.dropped == 1
    finally:
        writer.close()
        reader.close()


@pytest.mark.skipif(not hasattr(__import__("os"), "geteuid") or __import__("os").geteuid() != 0,
                    reason="needs root, to send as another user")
def test_a_message_from_a_real_other_user_never_reaches_the_reader():
    reader = Pipe().listen()
    try:
        # what a datagram of a pipe looks like; the sender becomes nobody before it sends
        code = ("import os, socket, sys; os.setgid(65534); os.setuid(65534); "
                "socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(bytes.fromhex(sys.argv[2]), chr(0) + sys.argv[1])")
        datagram = pickle.dumps((66, [(0, 5)]))
        proc = subprocess.run([sys.executable, "-c", code, reader.name, datagram.hex()],
                              capture_output=True, timeout=60)
        assert proc.returncode == 0, proc.stderr.decode()
        assert reader.recv(0.5) is None and reader.dropped == 1
    finally:
        reader.close()


def test_a_small_message_without_arrays_travels_in_its_datagram_and_leaves_the_mapping_alone():
    """What lets a pool pass its turn without waiting for an answer: its next request may be
    written to the mapping before the reader has read the pass."""
    reader = Pipe().listen()
    writer = Pipe(reader.name)
    try:
        assert writer.send(("__pass_turn__", 3, {}, {"answer": False}, 1), tag=1, inline=True) == 0
        assert writer._map is None  # nothing written to shared memory
        act = np.arange(1000, dtype=np.float32)
        writer.send(("train_step", 4, {"activations": act}, {}, 1), tag=2)  # before the reader read the first
        assert writer.send(("__pass_turn__", 4, {}, {"answer": False}, 1), tag=3, inline=True) == 0
        first, second, third = reader.recv(5.0), reader.recv(5.0), reader.recv(5.0)
        assert first == (1, ("__pass_turn__", 3, {}, {"answer": False}, 1))
        assert second[0] == 2 and np.array_equal(second[1][2]["activations"], act)
        assert third[0] == 3
        with pytest.raises(ValueError):  # arrays, or too much for a datagram, need the mapping
            writer.send({"a": act}, tag=4, inline=True)
        with pytest.raises(ValueError):
            writer.send("x" * 4096, tag=5, inline=True)
    finally:
        writer.close()
        reader.close()
