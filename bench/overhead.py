"""What the framework costs: FedAvg and SplitFed v2 at 100 clients (built-in MNIST, the cnn model,
every client every round, Dirichlet 0.5, batch 32, SGD 0.05, one local epoch) on the Ray backend,
on the local backend, and as a plain single-process PyTorch loop written here (the floor: the
same batches through the same models, nothing else), measured side by side in one run.

    python bench/overhead.py [--rounds 6] [--repeats 3] [--clients 100] [--algos fedavg,splitfed_v2] [--skew 1.0]

SplitFed v2 also runs on Ray with its server block in the pool's process (cluster.exchange=
in_pool: requests are function calls, no hand-over between processes). The ways take turns,
`--repeats` times over (Ray, local, floor, Ray, local, floor, ...), so that a machine whose speed
drifts (a shared VM's does, by 20% within an hour) weighs on all of them alike. A run's rounds
except its last (which also evaluates) are timed; each figure is the median over every timed
round of every repeat, and each ratio is also given per repeat. A Ray run's first round is
slower (its pools create their clients' state and fill their caches), so it is also reported on
its own, for every way. FedAvg also runs on Ray with every client on its own pool
(cluster.balance_pools=false), and for both Ray ways the script reads Ray's timeline: how long
the pools wait for the busiest of them in a round, and how long they idle between rounds.
FedAvg's floor also runs split over two processes at once (floor2: half the clients each, one
thread each, nothing exchanged): what two cores give plain PyTorch, so ray/floor2 is what the
framework costs over the hardware's own parallel speed. `--skew S` gives the clients unequal
sizes (partition.sizes=lognormal, size_sigma=S) in every way, where balanced pools matter.
Prints them; the last line is one JSON object (unprefixed keys are FedAvg's).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from _jobs import median, run_job, start_local_ray
from sfl_ray.config import load_config
from sfl_ray.data.batches import client_batches
from sfl_ray.models.split import build_parts
from sfl_ray.models.task import task_loss
from sfl_ray.run import prepare


EXTRA: list[str] = []  # --skew: every way's clients of unequal size


def overrides(algo: str, clients: int, rounds: int, backend: str) -> list[str]:
    """`backend`: ray, local, ray_in_pool (Ray with the server block in the pool's process) or
    ray_unbalanced (Ray with every client on its own pool: cluster.balance_pools=false)."""
    where = [f"cluster.backend={backend}"]
    if backend == "ray_in_pool":
        where = ["cluster.backend=ray", "cluster.exchange=in_pool"]
    if backend == "ray_unbalanced":
        where = ["cluster.backend=ray", "cluster.balance_pools=false"]
    return [f"algorithm.name={algo}", *where, *EXTRA, f"train.num_clients={clients}",
            f"train.clients_per_round={clients}", f"stop.rounds={rounds}", "stop.target_metric=null",
            "train.eval_every=1000"]  # evaluation only after the last round: rounds time training


def floor_rounds(algo: str, clients: int, rounds: int, part: tuple[int, int] = (0, 1),
                 barrier=None) -> list[float]:
    """The same work in one process, one thread: per client, the round's batches through the model.
    `part=(i, n)`: only every n-th client from the i-th (a share of the floor2 way), starting each
    round at `barrier` with the other shares."""
    cfg = load_config("jobs/quickstart.yaml", overrides(algo, clients, rounds, "local"))
    _, data, shards, _ = prepare(cfg)
    mine = list(enumerate(shards))[part[0]::part[1]]
    torch.set_num_threads(1)
    parts = build_parts(cfg.model.name, cfg.model.cut, data.input_shape, data.num_classes, cfg.seed, cfg.model)
    device, server = parts.device, parts.server
    lr, bs = cfg.train.lr, cfg.train.batch_size
    times = []
    for rnd in range(1, rounds + 1):
        if barrier is not None:
            barrier.wait()
        t0 = time.perf_counter()
        start = [p.detach().clone() for p in device.parameters()]
        start_srv = [p.detach().clone() for p in server.parameters()]
        acc_dev = [torch.zeros_like(p) for p in start]
        acc_srv = [torch.zeros_like(p) for p in start_srv]
        n_total = 0
        for c, idx in mine:
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


def _floor_share(algo: str, clients: int, rounds: int, part: tuple[int, int], barrier, out, extra: list) -> None:
    EXTRA[:] = extra  # a spawned process starts with the module's defaults
    out.put((part[0], floor_rounds(algo, clients, rounds, part, barrier)))


def floor2_rounds(algo: str, clients: int, rounds: int, n: int = 2) -> list[float]:
    """The floor's loop in `n` processes at once, each one thread and 1/n of the clients (client c
    in share c % n, as pools host them), starting every round together; a round lasts as long as
    the slowest share. Each share averages its own clients and exchanges nothing, so on equal
    clients this is what the cores give with no framework at all: the best any runtime can do
    here (it leaves out the averaging across shares, a few milliseconds). On clients of unequal
    size (--skew) its shares are as unequal as the pools' own: no balancing."""
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_floor_share, args=(algo, clients, rounds, (i, n), barrier, out, list(EXTRA)))
             for i in range(n)]
    for p in procs:
        p.start()
    shares = dict(out.get() for _ in procs)
    for p in procs:
        p.join()
    return [max(share[r] for share in shares.values()) for r in range(rounds)]


def pool_rounds(since_s: float, until_s: float) -> list[dict]:
    """Where a parallel Ray round's time goes, from Ray's timeline: per round, each pool's busy
    time, the span from the round's first call's start to its last call's end, and the idle gap
    before its first call. A round's calls are those before the round-start snapshot's state
    fetches (`get_state`, one per pool, after every round on Ray). A pool's calls run one after
    another, so a round lasts as long as its busiest pool; the others wait for it."""
    import ray
    events = [e for e in ray.timeline() if e.get("ph") == "X" and since_s <= e["ts"] / 1e6 <= until_s]
    calls = sorted((e["ts"] / 1e6, (e["ts"] + e["dur"]) / 1e6, e["tid"]) for e in events if e.get("name") == "run_many")
    ends: list[float] = []  # a round ends where its pools are asked for their clients' state
    for t in sorted(e["ts"] / 1e6 for e in events if e.get("name") == "get_state"):
        if not ends or t - ends[-1] > 0.05:
            ends.append(t)
    rounds: dict[int, list[tuple]] = {}
    for call in calls:
        rounds.setdefault(sum(1 for t in ends if t < call[0]), []).append(call)
    out, prev_end = [], None
    for _, r in sorted(rounds.items()):
        busy: dict = {}
        for start, end, pool in r:
            busy[pool] = busy.get(pool, 0.0) + end - start
        first, last = min(c[0] for c in r), max(c[1] for c in r)
        out.append({"span_s": last - first, "busy_s": sorted(busy.values()),
                    "gap_before_s": None if prev_end is None else first - prev_end})
        prev_end = last
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3, help="turns of Ray, local and floor, one after another")
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--algos", default="fedavg,splitfed_v2", help="which of fedavg,splitfed_v2 to run")
    ap.add_argument("--skew", type=float, default=0.0,
                    help="clients of unequal size: partition.sizes=lognormal with this size_sigma (0: equal)")
    args = ap.parse_args()
    if args.skew > 0:
        EXTRA.extend(["partition.sizes=lognormal", f"partition.size_sigma={args.skew}"])
    start_local_ray()
    out = tempfile.mkdtemp(prefix="sfl_bench_overhead")
    res: dict = {"bench": "overhead", "clients": args.clients, "rounds": args.rounds, "repeats": args.repeats,
                 "size_sigma": args.skew}
    for algo in args.algos.split(","):
        # SplitFed v2 also with its server block in the pool's process (cluster.exchange=in_pool)
        ways = (("ray", "ray_unbalanced", "local", "floor", "floor2") if algo == "fedavg"
                else ("ray", "ray_in_pool", "local", "floor"))
        rounds: dict[str, list[float]] = {w: [] for w in ways}
        per_repeat: dict[str, list[float]] = {w: [] for w in ways}
        first: dict[str, list[float]] = {w: [] for w in ways}  # each run's round 1, on its own too
        split: dict[str, list[dict]] = {w: [] for w in ways}  # FedAvg on Ray: rounds as Ray's timeline shows them
        for rep in range(args.repeats):
            for backend in ways:
                if backend == "floor":
                    times = floor_rounds(algo, args.clients, args.rounds)
                elif backend == "floor2":
                    times = floor2_rounds(algo, args.clients, args.rounds)
                else:
                    since = time.time()
                    rows, _ = run_job("quickstart", out, f"{algo}-{backend}-{rep}",
                                      overrides(algo, args.clients, args.rounds, backend))
                    times = [r["wall_s"] for r in rows]
                    if algo == "fedavg" and backend.startswith("ray"):  # the first round fills caches
                        split[backend] += pool_rounds(since, time.time())[1:]
                timed = times[:-1] or times  # the last round also evaluates
                rounds[backend] += timed
                first[backend].append(times[0])
                per_repeat[backend].append(median(timed))
                print(f"{algo:<12} {backend:<11} repeat {rep + 1}: rounds {' '.join(f'{t:.3f}' for t in timed)} s",
                      flush=True)
        t = {k: median(v) for k, v in rounds.items()}
        res[f"{'' if algo == 'fedavg' else 'splitfed_v2_'}first_round_s"] = {k: median(v) for k, v in first.items()}
        print(f"{algo:<12} median first round: " + ", ".join(f"{k} {median(v):.3f} s" for k, v in first.items()),
              flush=True)
        floor_ratio = [r / f for r, f in zip(per_repeat["ray"], per_repeat["floor"])]
        local_ratio = [r / lo for r, lo in zip(per_repeat["ray"], per_repeat["local"])]
        prefix = "" if algo == "fedavg" else "splitfed_v2_"
        res.update({f"{prefix}ray_s": t["ray"], f"{prefix}local_s": t["local"], f"{prefix}floor_s": t["floor"],
                    f"{prefix}ray_over_floor": t["ray"] / t["floor"], f"{prefix}ray_over_local": t["ray"] / t["local"],
                    f"{prefix}ray_over_floor_per_repeat": floor_ratio,
                    f"{prefix}ray_over_local_per_repeat": local_ratio})
        print(f"{algo:<12} median round: ray {t['ray']:.3f} s, local {t['local']:.3f} s, floor {t['floor']:.3f} s; "
              f"ray/floor {t['ray'] / t['floor']:.2f} (per repeat {' '.join(f'{x:.2f}' for x in floor_ratio)}), "
              f"ray/local {t['ray'] / t['local']:.2f} (per repeat {' '.join(f'{x:.2f}' for x in local_ratio)})",
              flush=True)
        for way, seen in split.items():
            if not seen:
                continue
            spans = [r["span_s"] for r in seen]
            # how long a round's pools wait for the busiest: its span less their mean busy time
            waiting = [r["span_s"] - sum(r["busy_s"]) / len(r["busy_s"]) for r in seen]
            gaps = [r["gap_before_s"] for r in seen if r["gap_before_s"] is not None]
            key = "" if way == "ray" else "unbalanced_"
            res.update({f"{key}pool_span_s": median(spans), f"{key}pool_wait_s": median(waiting),
                        f"{key}pool_wait_share": median([w / s for w, s in zip(waiting, spans)]),
                        f"{key}between_rounds_s": median(gaps) if gaps else None})
            print(f"{algo:<12} {way}: Ray's timeline, {len(seen)} rounds: pools' span {median(spans):.3f} s, of "
                  f"which pools wait for the busiest {median(waiting):.3f} s "
                  f"({100 * res[f'{key}pool_wait_share']:.1f}%); between rounds the pools idle "
                  + (f"{median(gaps) * 1e3:.0f} ms" if gaps else "-"), flush=True)
        if "floor2" in t:
            f2 = [r / f for r, f in zip(per_repeat["ray"], per_repeat["floor2"])]
            res.update({"floor2_s": t["floor2"], "floor2_over_floor": t["floor2"] / t["floor"],
                        "ray_over_floor2": t["ray"] / t["floor2"], "ray_over_floor2_per_repeat": f2})
            print(f"{algo:<12} the floor's loop in two processes at once (floor2, no framework): {t['floor2']:.3f} s, "
                  f"floor2/floor {t['floor2'] / t['floor']:.2f}; ray/floor2 {t['ray'] / t['floor2']:.2f} "
                  f"(per repeat {' '.join(f'{x:.2f}' for x in f2)})", flush=True)
        if "ray_unbalanced" in t:
            bal = [b / u for b, u in zip(per_repeat["ray"], per_repeat["ray_unbalanced"])]
            res.update({"unbalanced_ray_s": t["ray_unbalanced"], "balanced_over_unbalanced": t["ray"] / t["ray_unbalanced"],
                        "balanced_over_unbalanced_per_repeat": bal})
            print(f"{algo:<12} every client on its own pool (cluster.balance_pools=false): {t['ray_unbalanced']:.3f} s; "
                  f"balanced/unbalanced {t['ray'] / t['ray_unbalanced']:.3f} "
                  f"(per repeat {' '.join(f'{x:.3f}' for x in bal)})", flush=True)
        if "ray_in_pool" in t:
            in_pool_ratio = [r / lo for r, lo in zip(per_repeat["ray_in_pool"], per_repeat["local"])]
            res.update({f"{prefix}ray_in_pool_s": t["ray_in_pool"],
                        f"{prefix}ray_in_pool_over_local": t["ray_in_pool"] / t["local"],
                        f"{prefix}ray_in_pool_over_local_per_repeat": in_pool_ratio})
            print(f"{algo:<12} server block in the pool (cluster.exchange=in_pool): {t['ray_in_pool']:.3f} s, "
                  f"ray/local {t['ray_in_pool'] / t['local']:.2f} "
                  f"(per repeat {' '.join(f'{x:.2f}' for x in in_pool_ratio)})", flush=True)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
