"""What SplitFed v2's per-batch exchange costs, and what answering before stepping buys
(ServerContext.after_reply), with the quickstart's cnn: the device half here, the server half in
a server block in another process over a pipe pair (as on the Ray backend), stepping after its
reply (the default) or before it; and, as the reference, a server block in this process called
directly (as on the local backend). The three alternate in blocks of batches so all see the same
machine, side by side in one run.

    python bench/step_after_reply.py [--batches 1800] [--block 40] [--trace]

A batch is timed as the device sees it: forward, the exchange, backward, step. Prints the median
milliseconds per batch of each, the median of each of those three parts, and the ratios; `--trace` also times each stage of the pipe
exchange (both processes read one clock, CLOCK_MONOTONIC; the tracing adds a few microseconds per
message). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import tempfile
import time
from typing import Optional

import numpy as np
import torch

from _jobs import median
from sfl_ray.config import load_config
from sfl_ray.run import prepare
from sfl_ray.runtime.launch import make_blueprint

OVERRIDES = ["algorithm.name=splitfed_v2", "metrics.measure=off", "cluster.backend=local"]
WAYS = ("after", "before", "in_process")

EVENTS: Optional[list] = None  # (what, pipe, ns) when tracing


def _trace_pipes() -> None:
    """Record when every pipe send, datagram and receive begins and ends, in this process."""
    global EVENTS
    from sfl_ray.runtime.pipe import Pipe
    EVENTS = []
    send, datagram, recv = Pipe.send, Pipe._datagram, Pipe.recv

    def traced(name, fn):
        def wrapper(self, *args, **kwargs):
            EVENTS.append((name + "0", self.name, time.monotonic_ns()))
            try:
                return fn(self, *args, **kwargs)
            finally:
                EVENTS.append((name + "1", self.name, time.monotonic_ns()))
        return wrapper
    Pipe.send, Pipe._datagram, Pipe.recv = traced("send", send), traced("dg", datagram), traced("recv", recv)


def _blueprint():
    cfg = load_config("jobs/quickstart.yaml", OVERRIDES)
    algorithm_cls, data, shards, _ = prepare(cfg)
    return cfg, algorithm_cls, data, shards, make_blueprint(cfg, data)


def serve(request: str, reply: str, ready, stop, trace_file: Optional[str]) -> None:
    """The server block's process: SplitFed v2's program, stepping after or before its reply as
    each request's info says."""
    from sfl_ray.algorithms.common import server_step
    from sfl_ray.runtime.channels import ChannelServerBlock
    from sfl_ray.runtime.pipe import Pipe

    if trace_file:
        _trace_pipes()
    cfg, algorithm_cls, _, _, bp = _blueprint()
    torch.set_num_threads(cfg.cluster.torch_threads)
    block = ChannelServerBlock(algorithm_cls, bp, 0)
    program, after_first = block.program, block.program.train_step

    def train_step(client, arrays, info):
        if info.get("after_reply", True):
            return after_first(client, arrays, info)
        return server_step(program.model, program.opt, arrays)  # steps before it returns

    program.train_step = train_step
    block.serve(0, Pipe(request), Pipe(reply))
    ready.set()
    stop.wait()
    if trace_file:
        with open(trace_file, "w") as f:
            json.dump(EVENTS, f)


def stages(device_events: list, block_events: list, batches: list, request: str, reply: str) -> dict:
    """Median microseconds of each stage of the traced pipe batches (`batches`: their device-side
    (start, forward done, end) times)."""
    def times(events, what, pipe):
        return np.array([t for w, p, t in events if w == what and p == pipe], dtype=np.int64)

    def after(arr, t):  # the first time in arr at or after t
        return arr[np.searchsorted(arr, t)]

    d = {k: times(device_events, k, request) for k in ("send0", "dg0", "send1")}
    d.update({"recv1": times(device_events, "recv1", reply)})
    b = {"recv1": times(block_events, "recv1", request), "recv0": times(block_events, "recv0", request)}
    b.update({k: times(block_events, k, reply) for k in ("send0", "dg0", "send1")})
    rows = []
    for start, fwd, end in batches[:-1]:  # the last one's block may not have gone back to waiting
        sent, dg = after(d["send0"], fwd), after(d["dg0"], fwd)
        read = after(b["recv1"], dg)
        answer, answer_dg, answered = after(b["send0"], read), after(b["dg0"], read), after(b["send1"], read)
        got = after(d["recv1"], answer_dg)
        free = after(b["recv0"], answered)
        rows.append({"device forward": fwd - start, "device writes the request": dg - sent,
                     "device's datagram call": after(d["send1"], dg) - dg,
                     "block wakes and reads the request": read - dg,
                     "server program (to its reply)": answer - read,
                     "block writes the reply": answer_dg - answer,
                     "block's datagram call": answered - answer_dg,
                     "device wakes and reads the reply": got - answer_dg,
                     "device backward and step": end - got,
                     "block's work after its reply": free - answered})
    return {k: median([r[k] for r in rows]) / 1e3 for k in rows[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, default=1800)
    ap.add_argument("--block", type=int, default=40, help="batches per block of one way before switching")
    ap.add_argument("--trace", action="store_true", help="also time each stage of the pipe exchange")
    args = ap.parse_args()

    from sfl_ray.data.batches import client_batches
    from sfl_ray.runtime.channels import ChannelEndpoint
    from sfl_ray.runtime.local_backend import LocalEndpoint
    from sfl_ray.runtime.pipe import Pipe
    from sfl_ray.runtime.server import ServerBlock

    trace_file = os.path.join(tempfile.mkdtemp(prefix="sfl_bench_trace"), "block.json") if args.trace else None
    if args.trace:
        _trace_pipes()
    cfg, algorithm_cls, data, shards, bp = _blueprint()
    torch.set_num_threads(cfg.cluster.torch_threads)
    request, reply = Pipe(), Pipe()
    ctx = mp.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    server = ctx.Process(target=serve, args=(request.name, reply.name, ready, stop, trace_file), daemon=True)
    server.start()
    if not ready.wait(120):
        raise SystemExit("the server block's process did not start")
    endpoint = ChannelEndpoint(None, server.pid, 0, 60.0, Pipe(request.name), Pipe(reply.name))
    in_process = LocalEndpoint(ServerBlock(algorithm_cls, bp, 0))  # what the local backend calls
    device = bp.build_parts().device
    opt = bp.make_optimizer(list(device.parameters()))
    # per way, each timed batch's (start, forward done, call done, end) on CLOCK_MONOTONIC, in ns
    stamps: dict[str, list[tuple[int, int, int, int]]] = {w: [] for w in WAYS}
    batches, rnd = [], 0
    try:
        for i in range(args.batches):
            if not batches:
                rnd += 1
                batches = list(client_batches(data.train_x, data.train_y, np.concatenate(shards), cfg.train.batch_size,
                                              cfg.seed, rnd, 0))
            x, y = batches.pop()
            way = WAYS[(i // args.block) % len(WAYS)]
            n0 = time.monotonic_ns()
            z = device(x)
            n1 = time.monotonic_ns()
            arrays = {"activations": z.detach().numpy(), "labels": y.numpy()}
            if way == "in_process":
                out, _ = in_process.call("train_step", 0, arrays, {})
            else:
                out, _ = endpoint.call("train_step", 0, arrays, {"after_reply": way == "after"})
            n2 = time.monotonic_ns()
            opt.zero_grad()
            z.backward(torch.from_numpy(out["gradients"]))
            opt.step()
            if i >= len(WAYS) * args.block:  # the first block of each way warms up
                stamps[way].append((n0, n1, n2, time.monotonic_ns()))
    finally:
        endpoint.close()
        stop.set()
        server.join(10)
    ms = {w: median([end - start for start, _, _, end in stamps[w]]) / 1e6 for w in WAYS}
    print(f"pipe, step after the reply   {ms['after']:.3f} ms per batch ({len(stamps['after'])} batches)")
    print(f"pipe, step before the reply  {ms['before']:.3f} ms per batch ({len(stamps['before'])} batches)")
    print(f"one process (local backend)  {ms['in_process']:.3f} ms per batch ({len(stamps['in_process'])} batches)")
    split = {w: [median([s[k + 1] - s[k] for s in stamps[w]]) / 1e3 for k in range(3)] for w in WAYS}
    for w, label in zip(WAYS, ("pipe, after", "pipe, before", "one process")):
        f, c, b = split[w]
        print(f"  {label:<13} median us: forward {f:6.0f}, the call {c:6.0f}, backward and step {b:6.0f}")
    print(f"after / before               {ms['after'] / ms['before']:.3f}")
    print(f"after / one process          {ms['after'] / ms['in_process']:.3f}")
    res = {"bench": "step_after_reply", "batches": args.batches, "after_ms": ms["after"], "before_ms": ms["before"],
           "in_process_ms": ms["in_process"], "after_over_before": ms["after"] / ms["before"],
           "after_over_in_process": ms["after"] / ms["in_process"],
           "device_us": {w: dict(zip(("forward", "call", "backward_step"), split[w])) for w in WAYS}}
    if args.trace:
        with open(trace_file) as f:
            block_events = json.load(f)
        traced = [(start, fwd, end) for start, fwd, _, end in stamps["after"]]
        res["stages_us"] = stages(EVENTS, block_events, traced, request.name, reply.name)
        print("stages of the pipe exchange, step after the reply (median us per batch):")
        for k, v in res["stages_us"].items():
            print(f"  {k:<36} {v:8.0f}")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
