"""Work a server reply does not depend on runs after the reply has left (ServerContext.after_reply):
the SplitFed server's optimizer step overlaps the device's backward on the pipe path, and the block
serves nothing else until it is done. And a pool passes its turn without waiting for the hand-over.

In one process: a real server block (runtime.channels.ChannelServerBlock) serving a real pipe pair on
its thread, and a pool's endpoint on the other end, as on Ray but without the actors around them."""

import copy
import os
import threading
import time

import numpy as np
import pytest
import torch

from sfl_ray.algorithms.common import server_step
from sfl_ray.run import prepare
from sfl_ray.runtime.channels import ChannelEndpoint, ChannelServerBlock
from sfl_ray.runtime.faults import ActorLost
from sfl_ray.runtime.launch import make_blueprint
from sfl_ray.runtime.pipe import Pipe
from sfl_ray.runtime.server import ServerBlock
from tests.helpers import small_config


def _block(run_dir, cls=ChannelServerBlock):
    cfg = small_config(run_dir, "algorithm.name=splitfed_v2", "train.optimizer=adam", "train.lr=0.01",
                       "metrics.measure=sampled")
    algorithm_cls, data, _, _ = prepare(cfg)
    return cls(algorithm_cls, make_blueprint(cfg, data), 0)


def _endpoint(block: ChannelServerBlock, pool: int) -> ChannelEndpoint:
    request, reply = Pipe(), Pipe()
    block.serve(pool, Pipe(request.name), Pipe(reply.name))  # the block's ends, as the actor gets them
    return ChannelEndpoint(None, os.getpid(), 0, 10.0, Pipe(request.name), Pipe(reply.name))


def _request(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"activations": rng.standard_normal((8, 32, 7, 7)).astype(np.float32),
            "labels": rng.integers(0, 10, 8).astype(np.int64)}


def _close(endpoint: ChannelEndpoint, block: ChannelServerBlock) -> None:
    endpoint.close()
    for pipe in block._serving.values():
        Pipe(pipe.name).send_close()


def test_the_reply_leaves_before_the_optimizer_step_and_nothing_is_served_until_it_is_done(run_dir):
    block = _block(run_dir)
    program = block.program
    endpoint = _endpoint(block, 0)
    # The first request of a shape is measured (metrics.measure=sampled), and measured work is
    # not deferred: it runs inside the count. From the second on, the step waits for the reply.
    endpoint.call("train_step", 0, _request(9), {})
    reference = copy.deepcopy(program.model)  # the step taken first, in place, the plain way
    ref_opt = program.ctx.optimizer([reference])
    ref_opt.load_state_dict(copy.deepcopy(program.opt.state_dict()))  # its own moments
    started, release, finished = threading.Event(), threading.Event(), threading.Event()
    step = program.opt.step

    def held_step(*args, **kwargs):
        started.set()
        assert release.wait(10)
        out = step(*args, **kwargs)
        finished.set()
        return out

    program.opt.step = held_step
    try:
        for i in range(3):  # Adam: its state (moments, step count) must advance the same way
            started.clear(), release.clear(), finished.clear()
            req = _request(i)
            reply, info = endpoint.call("train_step", 0, req, {})
            assert started.wait(5) and not finished.is_set()  # the gradient came back mid-step
            weights = {}
            reader = threading.Thread(target=lambda: weights.update(block.control("get_weights")))
            reader.start()
            time.sleep(0.2)
            assert reader.is_alive()  # the block serves nothing else until the step is done
            release.set()
            reader.join(5)
            assert finished.is_set() and not reader.is_alive()

            tensors = {k: torch.from_numpy(v) for k, v in req.items()}
            ref_reply, ref_info = server_step(reference, ref_opt, tensors)
            assert np.array_equal(reply["gradients"], ref_reply["gradients"].numpy())
            assert info["loss"] == ref_info["loss"]
            for name, value in reference.state_dict().items():  # read after the step: the stepped weights
                assert np.array_equal(weights[name], value.numpy()), name
    finally:
        release.set()
        _close(endpoint, block)


def test_a_block_called_in_process_steps_before_it_returns_with_the_same_numbers(run_dir):
    """The local backend and actor calls pass no `answer`: the deferred step runs before the reply
    is returned, and reply and weights equal those of the pipe path."""
    on_pipe, in_process = _block(run_dir), _block(run_dir, ServerBlock)
    endpoint = _endpoint(on_pipe, 0)
    try:
        for i in range(3):
            a, a_info = endpoint.call("train_step", 0, _request(i), {})
            b, b_info = in_process.call("train_step", 0, _request(i), {})
            assert np.array_equal(a["gradients"], b["gradients"]) and a_info == b_info
        wa, wb = on_pipe.control("get_weights"), in_process.control("get_weights")
        assert all(np.array_equal(wa[k], wb[k]) for k in wb)
        assert on_pipe.pop_flops() == in_process.pop_flops() > 0  # counted the same (sampled: once per shape)
    finally:
        _close(endpoint, on_pipe)


def test_deferred_work_that_fails_after_its_reply_left_breaks_the_block_loudly(run_dir):
    block = _block(run_dir)

    def failing_step(*args, **kwargs):
        raise FloatingPointError("the step blew up")

    endpoint = _endpoint(block, 0)
    try:
        endpoint.call("train_step", 0, _request(0), {})  # a good step first
        block.program.opt.step = failing_step
        reply, _ = endpoint.call("train_step", 0, _request(1), {})  # its reply had left
        assert reply["gradients"].shape == (8, 32, 7, 7)
        with pytest.raises(RuntimeError, match=r"(?s)deferred past a 'train_step' reply.*the step blew up"):
            endpoint.call("train_step", 0, _request(2), {})  # the pool that sent it hears it next
        with pytest.raises(RuntimeError, match="the step blew up"):
            block.control("get_weights")  # and nothing else is served from a half-stepped block
    finally:
        _close(endpoint, block)


def test_a_pool_passes_its_turn_without_waiting_and_the_block_keeps_the_order(run_dir):
    block = _block(run_dir)
    a, b = _endpoint(block, 0), _endpoint(block, 1)
    try:
        block.begin_turns(1, [5, 7])
        a.seq = b.seq = 1
        t0 = time.monotonic()
        a.pass_turn(7, wait=False)  # not 7's turn yet: the block waits, the pool does not
        assert time.monotonic() - t0 < 1.0 and block.turns.passed == 0
        b.call("train_step", 5, _request(0), {})
        b.pass_turn(5)  # answered: 5 has passed ...
        deadline = time.monotonic() + 5
        while block.turns.passed < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert block.turns.passed == 2  # ... then 7's early pass goes through, in order

        # a pass that fails is the pool's next request's answer
        a.pass_turn(9, wait=False)  # 9 has no turn in this sequence
        a.pass_turn(11, wait=False)  # nor 11: a pass wants no answer, so the failure waits for one that does
        with pytest.raises(ActorLost, match="client 9 has no turn"):
            a.call("train_step", 5, _request(1), {})
        with pytest.raises(ValueError):  # a request with arrays cannot be sent without an answer
            a.request.send(("train_step", 5, _request(2), {}, None), 99, inline=True)
    finally:
        b.close()
        _close(a, block)
