"""Many clients on one machine: round time and peak memory of every Ray process as the number of
clients grows, and what ten thousand registered clients cost when a hundred are sampled.

    python bench/scale.py [--clients 10 100 500] [--algorithms fedavg splitfed_v2 cse_fsl fsl_sage ampere]
                          [--rounds 3] [--samples-per-client 4] [--registered 10000] [--sampled 100]
                          [--registered-rounds 8]

Each run is the quickstart job (built-in MNIST, cnn cut at pool2) on the Ray backend, shrunk so
that what grows is the number of clients, not the work: `samples-per-client` training samples per
client (one batch), every client sampled every round, two client pools and one server block on a
local Ray instance started once. Per run: the median round time (rounds after the first, which
warms up), the start-up (partition, checks, actors; the data's loading apart: it grows with the
samples) and the peak of the summed RSS of this process and every process under it (the Ray
head, raylet, workers, the pool, server block and coordinator actors), sampled every 0.2 s.
`per_client_ms` is the least-squares slope of round time over clients: what one more client adds
to a round wall-clock, its own training step included (an upper bound on its fixed overhead);
`step_ms` is that step timed alone.

Then FedAvg with `registered` clients registered and `sampled` run per round, against `sampled`
registered, one sample a client either way: start-up, round time and peak RSS should not depend
on the registered count. About 3.5 minutes on 2 cores; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from typing import Sequence
from unittest import mock

import psutil

from _jobs import start_local_ray

from sfl_ray.config import load_config
from sfl_ray.data import load_source
from sfl_ray.run import prepare
from sfl_ray.runtime.launch import run_experiment

GIB = 1024 ** 3
ALGORITHMS = ["fedavg", "splitfed_v2", "cse_fsl", "fsl_sage", "ampere"]
EXTRA = {  # what makes each algorithm's round the cost of its clients, not of a fixed phase
    "fsl_sage": ["algorithm.align_epochs=1"],  # alignment is real server work per client, not overhead
    "ampere": ["algorithm.server_epochs=1"],
}


class PeakRSS:
    """Peak of the summed RSS of this process and all its descendants, sampled in a thread."""

    def __init__(self, every_s: float = 0.2):
        self.every_s, self.peak, self._stop = every_s, 0, threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    @staticmethod
    def now() -> int:
        me = psutil.Process()
        total = 0
        for p in [me, *me.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:  # a process that ended between listing and reading
                pass
        return total

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            self._stop.wait(self.every_s)

    def __enter__(self) -> "PeakRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


def settle(timeout_s: float = 20.0) -> None:
    """Wait until the actors of the previous run have exited, so that a run's peak RSS is its own."""
    end = time.time() + timeout_s
    while time.time() < end:
        names = []
        for p in psutil.Process().children(recursive=True):
            try:
                names.append(p.cmdline()[0].strip() if p.cmdline() else "")
            except psutil.Error:
                pass
        # actors are ray::<Class>; idle workers (ray::IDLE) and the node's agents stay
        if not any(n.startswith("ray::") and not n.startswith("ray::IDLE") and not n.endswith("Agent")
                   for n in names):
            return
        time.sleep(0.2)


def run(out: str, name: str, algo: str, clients: int, sampled: int, train_samples: int, batch: int,
        rounds: int) -> dict:
    """One job on Ray; its round times, start-up and peak RSS."""
    cfg = load_config(os.path.join("jobs", "quickstart.yaml"), [
        f"algorithm.name={algo}", f"train.num_clients={clients}", f"train.clients_per_round={sampled}",
        f"data.max_train_samples={train_samples}", "data.max_test_samples=200", f"train.batch_size={batch}",
        "partition.name=iid", f"stop.rounds={rounds}", "stop.target_metric=null", f"train.eval_every={rounds}",
        "cluster.backend=ray", "cluster.num_pools=2", "cluster.pool_cpus=0.5", "cluster.server_cpus=0.5",
        f"output.dir={out}", f"output.name={name}", "output.progress=false", "output.checkpoint_every=0",
        "output.overwrite=true", *EXTRA.get(algo, [])])
    settle()
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        data = load_source(cfg.data)  # its cost grows with the samples, not the clients: timed apart
        load_s = time.perf_counter() - t0
        with mock.patch("sfl_ray.data.load_source", lambda _: data):
            algorithm_cls, data, shards, _ = prepare(cfg)
        prepare_s = time.perf_counter() - t0 - load_s
        run_experiment(algorithm_cls, cfg, data, shards)
        total_s = time.perf_counter() - t0
    with open(os.path.join(cfg.run_dir(), "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    rounds_s = [r["wall_s"] for r in rows if r["round"] <= rounds]
    assert all(r["clients"] == sampled for r in rows if r["round"] <= rounds), "a round ran fewer clients"
    return {"round_s": statistics.median(rounds_s[1:] or rounds_s), "rounds_s": rounds_s, "load_s": load_s,
            "prepare_s": prepare_s,
            # partition, model checks, actors, coordinator (and their shutdown): all but data and rounds
            "start_s": total_s - load_s - sum(r["wall_s"] for r in rows), "rss_gib": rss.peak / GIB}


def step_ms(batch: int, reps: int = 50) -> float:
    """One client's training step alone, in this process on one thread: forward, backward and an
    SGD update of the whole cnn on one batch (what FedAvg's client does; a split client and its
    server share the same work). The part of `per_client_ms` that is work, not overhead."""
    import torch

    from sfl_ray.models.split import build_parts
    from sfl_ray.models.task import task_loss

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = build_parts("cnn", None, (1, 28, 28), 10, 0).full()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    times = []
    for _ in range(reps + 5):
        t0 = time.perf_counter()
        loss = task_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    torch.set_num_threads(threads)
    return 1000 * statistics.median(times[5:])


def slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, nargs="+", default=[10, 100, 500])
    ap.add_argument("--algorithms", nargs="+", default=ALGORITHMS,
                    help="the first gives the headline numbers; each runs at every --clients count")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--samples-per-client", type=int, default=4)
    ap.add_argument("--registered", type=int, default=10_000, help="0: skip the registered/sampled case")
    ap.add_argument("--sampled", type=int, default=100)
    ap.add_argument("--registered-rounds", type=int, default=8, help="rounds of the registered/sampled runs")
    args = ap.parse_args()
    start_local_ray()
    out = tempfile.mkdtemp(prefix="sfl_bench_scale")
    s = args.samples_per_client
    per_algo: dict[str, dict] = {}
    print(f"{'algorithm':<12} {'clients':>7} {'round s':>8} {'start s':>8} {'peak RSS GiB':>12}", flush=True)
    for algo in args.algorithms:
        res = [run(out, f"{algo}-{n}", algo, n, n, n * s, s, args.rounds) for n in args.clients]
        for n, r in zip(args.clients, res):
            print(f"{algo:<12} {n:>7} {r['round_s']:>8.3f} {r['start_s']:>8.1f} {r['rss_gib']:>12.2f}", flush=True)
        round_s = [r["round_s"] for r in res]
        per_algo[algo] = {"round_s": round_s, "rss_gib": [r["rss_gib"] for r in res],
                          "start_s": [r["start_s"] for r in res],
                          "per_client_ms": 1000 * slope(args.clients, round_s) if len(res) > 1 else None}
        if per_algo[algo]["per_client_ms"] is not None:
            print(f"{algo:<12} per client {per_algo[algo]['per_client_ms']:.2f} ms", flush=True)
    head = per_algo[args.algorithms[0]]
    step = step_ms(s)
    print(f"one client's training step alone: {step:.2f} ms", flush=True)
    result = {"bench": "scale", "algorithm": args.algorithms[0], "clients": args.clients,
              "round_s": head["round_s"], "rss_gib": head["rss_gib"], "per_client_ms": head["per_client_ms"],
              "step_ms": step,
              "rss_gib_max": max(max(a["rss_gib"]) for a in per_algo.values()), "algorithms": per_algo}
    if args.registered:
        # one sample a client either way: `sampled` registered with `sampled` samples, `registered`
        # with `registered` samples; the sampled clients' work is the same
        r = args.registered_rounds
        few = run(out, "registered-few", "fedavg", args.sampled, args.sampled, args.sampled, 32, r)
        many = run(out, "registered-many", "fedavg", args.registered, args.sampled, args.registered, 32, r)
        for n, r in ((args.sampled, few), (args.registered, many)):
            print(f"registered {n:>6}, sampled {args.sampled}: round {r['round_s']:.3f}s, start {r['start_s']:.1f}s "
                  f"(partition + checks {r['prepare_s']:.2f}s; data {r['load_s']:.2f}s apart), "
                  f"peak RSS {r['rss_gib']:.2f} GiB", flush=True)
        result.update({"registered": args.registered, "sampled": args.sampled,
                       "registered_10k_round_s": many["round_s"], "registered_10k_start_s": many["start_s"],
                       "registered_10k_rss_gib": many["rss_gib"], "registered_few_round_s": few["round_s"],
                       "registered_few_start_s": few["start_s"], "registered_few_rss_gib": few["rss_gib"]})
    print(json.dumps(result))


if __name__ == "__main__":
    main()
