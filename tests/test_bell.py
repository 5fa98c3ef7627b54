"""The doorbell a channel reader sleeps on (runtime.bell): one wake per ring, across processes,
timeouts that return, and a ring nobody can hear is an error, not a lost message."""

import pickle
import subprocess
import sys
import time

import pytest

from sfl_ray.runtime.bell import Bell


def test_each_ring_wakes_one_wait_and_an_unrung_wait_times_out():
    bell = Bell().listen()
    writer = pickle.loads(pickle.dumps(bell))  # as the other process gets it
    try:
        assert writer.name == bell.name and writer.address == bell.address
        writer.ring()
        writer.ring()
        assert bell.wait(1.0) is True
        assert bell.wait(1.0) is True
        t0 = time.monotonic()
        assert bell.wait(0.2) is False  # two rings, two wakes: the third wait sleeps out its timeout
        assert 0.15 <= time.monotonic() - t0 < 2.0
    finally:
        writer.close()
        bell.close()


def test_a_ring_from_another_process_wakes_a_sleeping_reader():
    bell = Bell().listen()
    try:
        code = ("import pickle, sys, time; from sfl_ray.runtime.bell import Bell; time.sleep(0.3); "
                "pickle.loads(bytes.fromhex(sys.argv[1])).ring()")
        proc = subprocess.Popen([sys.executable, "-c", code, pickle.dumps(Bell(bell.name)).hex()])
        t0 = time.monotonic()
        assert bell.wait(30.0) is True
        assert time.monotonic() - t0 < 29.0
        assert proc.wait(30) == 0
    finally:
        bell.close()


def test_ringing_a_bell_whose_reader_is_gone_raises():
    bell = Bell().listen()
    writer = Bell(bell.name)
    writer.ring()
    bell.close()
    with pytest.raises(OSError):
        writer.ring()
    writer.close()


def test_waiting_on_a_bell_that_does_not_listen_is_refused():
    with pytest.raises(RuntimeError, match="does not listen"):
        Bell().wait(0.01)
