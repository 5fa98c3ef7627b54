"""One SFL round trip through the runtime (activations up to a server block, a gradient of the
same size back), 64 KiB to 64 MiB: microseconds per round trip and GB/s moved, over the pipe
pair (`cluster.exchange: channels`, runtime/pipe.py) and over actor calls, against a plain
numpy copy of the same bytes, side by side in one run.

    python bench/transfer.py [--repeats 50]

The server program here only echoes (the transfer alone is timed). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import ray

from _jobs import median, start_local_ray
from sfl_ray.config import load_config
from sfl_ray.runtime.channels import ChannelClientPool, ChannelServerBlock
from sfl_ray.runtime.protocol import Algorithm, RoundSummary, ServerProgram
from sfl_ray.runtime.ray_backend import RayEndpoint, RayExecutor

SIZES_KIB = (64, 1024, 16 * 1024, 64 * 1024)


class EchoServer(ServerProgram):
    def train_step(self, client, arrays, info):
        return {"gradients": arrays["activations"]}, {}


class Echo(Algorithm):
    name = "echo"
    config_cls = None
    server_cls = EchoServer

    def init_global(self, parts): ...
    def client_program(self, ctx, down): return {}, {}
    def run_round(self, rt, rnd, clients): return RoundSummary()
    def eval_weights(self, rt): return None


class TimingPool(ChannelClientPool):
    def round_trips(self, kib: int, n: int) -> list[float]:
        """n round trips of `kib` KiB each way through this pool's endpoint to server block 0."""
        a = np.random.default_rng(0).random(kib * 1024 // 4, dtype=np.float32)
        out = []
        for _ in range(n + 3):
            t = time.perf_counter()
            reply, _ = self.servers[0].call("train_step", 0, {"activations": a}, {})
            out.append(time.perf_counter() - t)
            assert reply["gradients"].nbytes == a.nbytes
        return out[3:]


def memcpy_s(kib: int, n: int) -> float:
    a = np.random.default_rng(0).random(kib * 1024 // 4, dtype=np.float32)
    b = np.empty_like(a)
    times = []
    for _ in range(n):
        t = time.perf_counter()
        np.copyto(b, a)  # up
        np.copyto(a, b)  # and down
        times.append(time.perf_counter() - t)
    return median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=50)
    args = ap.parse_args()
    start_local_ray()
    from sfl_ray.runtime.launch import make_blueprint
    from sfl_ray.run import prepare
    cfg = load_config("jobs/quickstart.yaml", ["train.num_clients=1", "data.max_train_samples=100"])
    _, data, shards, _ = prepare(cfg)
    bp = make_blueprint(cfg, data)
    server = ray.remote(ChannelServerBlock).options(num_cpus=0.5).remote(Echo, bp, 0)
    pools = {}
    for exchange in ("channels", "actor_calls"):
        pool = ray.remote(TimingPool).options(num_cpus=0.5).remote(
            Echo, bp, data.train_x, data.train_y, {0: shards[0]}, [RayEndpoint(server, 600.0, 0)])
        ex = RayExecutor([pool], [server], None, bp, cfg.cluster.model_copy(update={"exchange": exchange}))
        ex.connect()
        pools[exchange] = (pool, ex.links)
    res: dict = {"bench": "transfer", "sizes_kib": list(SIZES_KIB)}
    print(f"{'KiB':>7} {'channel us':>11} {'actor us':>10} {'memcpy us':>10} {'channel GB/s':>13} {'memcpy GB/s':>12}")
    for kib in SIZES_KIB:
        n = max(5, args.repeats if kib <= 1024 else args.repeats // 5)
        ch = median(ray.get(pools["channels"][0].round_trips.remote(kib, n)))
        ac = median(ray.get(pools["actor_calls"][0].round_trips.remote(kib, n)))
        mc = memcpy_s(kib, n)
        moved = 2 * kib * 1024 / 1e9  # GB up and down
        print(f"{kib:>7} {ch * 1e6:>11.0f} {ac * 1e6:>10.0f} {mc * 1e6:>10.0f} {moved / ch:>13.2f} {moved / mc:>12.2f}",
              flush=True)
        res.setdefault("channel_us", []).append(ch * 1e6)
        res.setdefault("actor_call_us", []).append(ac * 1e6)
        res.setdefault("memcpy_us", []).append(mc * 1e6)
    big = -1
    res.update({"mib": SIZES_KIB[big] // 1024, "runtime_gbps": 2 * SIZES_KIB[big] * 1024 / 1e9 / (res["channel_us"][big] / 1e6),
                "memcpy_gbps": 2 * SIZES_KIB[big] * 1024 / 1e9 / (res["memcpy_us"][big] / 1e6),
                "round_trip_us_small": res["channel_us"][0], "actor_call_us_small": res["actor_call_us"][0],
                "links": {k: v[1] for k, v in pools.items()}})
    res["ratio"] = res["runtime_gbps"] / res["memcpy_gbps"]
    print(json.dumps(res))


if __name__ == "__main__":
    main()
