"""Turns at a server block (runtime.turns): a sequential round run by every pool at once must
reach the server block in the schedule's order, and an abandoned one must release its waiters."""

from __future__ import annotations

import threading
import time

import pytest

from sfl_ray.runtime.faults import ActorLost
from sfl_ray.runtime.turns import TurnGate


def _client(gate: TurnGate, seq: int, client: int, log: list, errors: dict) -> None:
    try:
        gate.wait_turn(seq, client)
        log.append(client)
        time.sleep(0.01)  # its server steps
        gate.pass_turn(seq, client)
    except ActorLost as err:
        errors[client] = str(err)


def test_clients_reach_the_block_in_the_sequence_order_whatever_order_they_arrive_in():
    gate, log, errors = TurnGate(), [], {}
    order = [3, 0, 2, 1]
    gate.begin(7, order)
    # every client is ready at once, the last of the order first
    threads = [threading.Thread(target=_client, args=(gate, 7, c, log, errors)) for c in reversed(order)]
    for t in threads:
        t.start()
        time.sleep(0.005)
    for t in threads:
        t.join(5)
    assert log == order and not errors


def test_a_client_that_passes_its_turn_early_waits_for_its_turn_first():
    gate = TurnGate()
    gate.begin(1, [0, 1])
    done = threading.Event()
    t = threading.Thread(target=lambda: (gate.pass_turn(1, 1), done.set()))
    t.start()
    assert not done.wait(0.2)  # client 1 (no server step at all) may not pass before client 0
    gate.pass_turn(1, 0)
    assert done.wait(5)


def test_an_abandoned_sequence_releases_its_waiters_as_lost_and_serves_nothing_more():
    gate, log, errors = TurnGate(), [], {}
    gate.begin(5, [0, 1])
    waiter = threading.Thread(target=_client, args=(gate, 5, 1, log, errors))
    waiter.start()
    time.sleep(0.05)
    gate.end(5)  # client 0's pool was lost: the coordinator ends the sequence
    waiter.join(5)
    assert not waiter.is_alive() and log == [] and "abandoned" in errors[1]
    with pytest.raises(ActorLost):
        gate.wait_turn(5, 0)  # a late request of the old sequence
    gate.begin(6, [0])  # the re-run's sequence: a new id
    with pytest.raises(ActorLost):
        gate.wait_turn(5, 0)
    gate.wait_turn(6, 0)


def test_a_client_outside_the_sequence_is_refused():
    gate = TurnGate()
    gate.begin(2, [0, 1])
    with pytest.raises(ActorLost, match="no turn"):
        gate.wait_turn(2, 9)
