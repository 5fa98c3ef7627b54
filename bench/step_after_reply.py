"""What answering before stepping buys (ServerContext.after_reply): SplitFed v2's per-batch exchange
with the quickstart's cnn (device half here, server half in a server block in another process, a
pipe pair between them), the server's optimizer step taken after its reply (the default) and
before it, alternating in blocks of batches so both see the same machine, side by side in one run.

    python bench/step_after_reply.py [--batches 1200] [--block 40]

A batch is timed as the device sees it: forward, the exchange, backward, step. Prints the median
milliseconds per batch of each and their ratio; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time

import numpy as np
import torch

from _jobs import median
from sfl_ray.config import load_config
from sfl_ray.run import prepare
from sfl_ray.runtime.launch import make_blueprint

OVERRIDES = ["algorithm.name=splitfed_v2", "metrics.measure=off", "cluster.backend=local"]


def _blueprint():
    cfg = load_config("jobs/quickstart.yaml", OVERRIDES)
    algorithm_cls, data, shards, _ = prepare(cfg)
    return cfg, algorithm_cls, data, shards, make_blueprint(cfg, data)


def serve(request: str, reply: str, ready, stop) -> None:
    """The server block's process: SplitFed v2's program, stepping after or before its reply as
    each request's info says."""
    from sfl_ray.algorithms.common import server_step
    from sfl_ray.runtime.channels import ChannelServerBlock
    from sfl_ray.runtime.pipe import Pipe

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, default=1200)
    ap.add_argument("--block", type=int, default=40, help="batches per block of one way before switching")
    args = ap.parse_args()

    from sfl_ray.data.batches import client_batches
    from sfl_ray.runtime.channels import ChannelEndpoint
    from sfl_ray.runtime.pipe import Pipe

    cfg, _, data, shards, bp = _blueprint()
    torch.set_num_threads(cfg.cluster.torch_threads)
    request, reply = Pipe(), Pipe()
    ctx = mp.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    server = ctx.Process(target=serve, args=(request.name, reply.name, ready, stop), daemon=True)
    server.start()
    if not ready.wait(120):
        raise SystemExit("the server block's process did not start")
    endpoint = ChannelEndpoint(None, server.pid, 0, 60.0, Pipe(request.name), Pipe(reply.name))
    device = bp.build_parts().device
    opt = bp.make_optimizer(list(device.parameters()))
    times: dict[bool, list[float]] = {True: [], False: []}
    batches, rnd = [], 0
    try:
        for i in range(args.batches):
            if not batches:
                rnd += 1
                batches = list(client_batches(data.train_x, data.train_y, np.concatenate(shards), cfg.train.batch_size,
                                              cfg.seed, rnd, 0))
            x, y = batches.pop()
            after = (i // args.block) % 2 == 0
            t0 = time.perf_counter()
            z = device(x)
            out, _ = endpoint.call("train_step", 0, {"activations": z.detach().numpy(), "labels": y.numpy()},
                                   {"after_reply": after})
            opt.zero_grad()
            z.backward(torch.from_numpy(out["gradients"]))
            opt.step()
            if i >= 2 * args.block:  # the first block of each way warms up
                times[after].append(time.perf_counter() - t0)
    finally:
        endpoint.close()
        stop.set()
        server.join(10)
    after_ms, before_ms = median(times[True]) * 1e3, median(times[False]) * 1e3
    print(f"step after the reply   {after_ms:.3f} ms per batch ({len(times[True])} batches)")
    print(f"step before the reply  {before_ms:.3f} ms per batch ({len(times[False])} batches)")
    print(f"after / before         {after_ms / before_ms:.3f}")
    print(json.dumps({"bench": "step_after_reply", "batches": args.batches, "after_ms": after_ms,
                      "before_ms": before_ms, "after_over_before": after_ms / before_ms}))


if __name__ == "__main__":
    main()
