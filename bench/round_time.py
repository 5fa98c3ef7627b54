"""Median round time of FedAvg and SplitFed v2 on the built-in MNIST data with 100 clients,
on the local and the Ray backend, measured side by side in one run.

    python bench/round_time.py [--rounds 4] [--clients 100]

Prints one line per (algorithm, backend) with the median wall time per round, and the
ray/local ratio per algorithm. Ray is started once, locally, before the first Ray run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile

from sfl_ray.config import load_config
from sfl_ray.run import prepare
from sfl_ray.runtime.launch import run_experiment


def median_round_s(algo: str, backend: str, rounds: int, clients: int, out: str) -> tuple[float, float]:
    cfg = load_config("jobs/quickstart.yaml", [
        f"algorithm.name={algo}", f"cluster.backend={backend}", f"train.num_clients={clients}",
        f"train.clients_per_round={clients}", f"stop.rounds={rounds}", "stop.target_metric=null",
        f"output.dir={out}", f"output.name={algo}-{backend}", "output.progress=false"])
    algorithm_cls, data, shards, _ = prepare(cfg)
    run_experiment(algorithm_cls, cfg, data, shards)
    with open(f"{cfg.run_dir()}/metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    return statistics.median(r["wall_s"] for r in rows), rows[-1]["eval_accuracy"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--clients", type=int, default=100)
    args = ap.parse_args()
    import ray
    ray.init(address="local", include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    out = tempfile.mkdtemp(prefix="sfl_bench")
    print(f"{'algorithm':<12} {'backend':<6} {'median round s':>14} {'final acc':>9}")
    for algo in ("fedavg", "splitfed_v2"):
        t = {}
        for backend in ("local", "ray"):
            t[backend], acc = median_round_s(algo, backend, args.rounds, args.clients, out)
            print(f"{algo:<12} {backend:<6} {t[backend]:>14.3f} {acc:>9.4f}", flush=True)
        print(f"{algo:<12} ray/local ratio {t['ray'] / t['local']:.2f}", flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
