"""What the framework costs: FedAvg and SplitFed v2 at 100 clients (built-in MNIST, the cnn model,
every client every round, Dirichlet 0.5, batch 32, SGD 0.05, one local epoch) on the Ray backend,
on the local backend, and as a plain single-process PyTorch loop written here (the floor: the
same batches through the same models, nothing else), measured side by side in one run.

    python bench/overhead.py [--rounds 4] [--clients 100]

Prints the median seconds per round of each and the ratios; the last line is one JSON object
(unprefixed keys are FedAvg's).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np
import torch

from _jobs import median, run_job, start_local_ray
from sfl_ray.config import load_config
from sfl_ray.data.batches import client_batches
from sfl_ray.models.split import build_parts
from sfl_ray.models.task import task_loss
from sfl_ray.run import prepare


def overrides(algo: str, clients: int, rounds: int, backend: str) -> list[str]:
    return [f"algorithm.name={algo}", f"cluster.backend={backend}", f"train.num_clients={clients}",
            f"train.clients_per_round={clients}", f"stop.rounds={rounds}", "stop.target_metric=null",
            "train.eval_every=1000"]  # evaluation only after the last round: rounds time training


def floor_rounds(algo: str, clients: int, rounds: int) -> list[float]:
    """The same work in one process, one thread: per client, the round's batches through the model."""
    cfg = load_config("jobs/quickstart.yaml", overrides(algo, clients, rounds, "local"))
    _, data, shards, _ = prepare(cfg)
    torch.set_num_threads(1)
    parts = build_parts(cfg.model.name, cfg.model.cut, data.input_shape, data.num_classes, cfg.seed, cfg.model)
    device, server = parts.device, parts.server
    lr, bs = cfg.train.lr, cfg.train.batch_size
    times = []
    for rnd in range(1, rounds + 1):
        t0 = time.perf_counter()
        start = [p.detach().clone() for p in device.parameters()]
        start_srv = [p.detach().clone() for p in server.parameters()]
        acc_dev = [torch.zeros_like(p) for p in start]
        acc_srv = [torch.zeros_like(p) for p in start_srv]
        n_total = 0
        for c, idx in enumerate(shards):
            with torch.no_grad():
                for p, s in zip(device.parameters(), start):
                    p.copy_(s)
                if algo == "fedavg":
                    for p, s in zip(server.parameters(), start_srv):
                        p.copy_(s)
            opt_d = torch.optim.SGD(device.parameters(), lr=lr)
            opt_s = torch.optim.SGD(server.parameters(), lr=lr)
            for x, y in client_batches(data.train_x, data.train_y, idx, bs, cfg.seed, rnd, c):
                opt_d.zero_grad(), opt_s.zero_grad()
                task_loss(server(device(x)), y).backward()  # split or not, the same arithmetic
                opt_d.step(), opt_s.step()
            with torch.no_grad():
                for a, p in zip(acc_dev, device.parameters()):
                    a.add_(p, alpha=len(idx))
                if algo == "fedavg":
                    for a, p in zip(acc_srv, server.parameters()):
                        a.add_(p, alpha=len(idx))
            n_total += len(idx)
        with torch.no_grad():
            for p, a in zip(device.parameters(), acc_dev):
                p.copy_(a / n_total)
            if algo == "fedavg":
                for p, a in zip(server.parameters(), acc_srv):
                    p.copy_(a / n_total)
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--clients", type=int, default=100)
    args = ap.parse_args()
    start_local_ray()
    out = tempfile.mkdtemp(prefix="sfl_bench_overhead")
    res: dict = {"bench": "overhead", "clients": args.clients, "rounds": args.rounds}
    for algo in ("fedavg", "splitfed_v2"):
        t = {}
        for backend in ("ray", "local"):
            rows, _ = run_job("quickstart", out, f"{algo}-{backend}", overrides(algo, args.clients, args.rounds, backend))
            t[backend] = median([r["wall_s"] for r in rows[:-1]] or [rows[-1]["wall_s"]])
            print(f"{algo:<12} {backend:<6} median round {t[backend]:.3f} s", flush=True)
        t["floor"] = median(floor_rounds(algo, args.clients, args.rounds))
        print(f"{algo:<12} floor  median round {t['floor']:.3f} s", flush=True)
        prefix = "" if algo == "fedavg" else "splitfed_v2_"
        res.update({f"{prefix}ray_s": t["ray"], f"{prefix}local_s": t["local"], f"{prefix}floor_s": t["floor"],
                    f"{prefix}ray_over_floor": t["ray"] / t["floor"], f"{prefix}ray_over_local": t["ray"] / t["local"]})
        print(f"{algo:<12} ray/floor {t['ray'] / t['floor']:.2f}  ray/local {t['ray'] / t['local']:.2f}", flush=True)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
