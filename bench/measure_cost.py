"""What measuring device cost costs: the quickstart job (SplitFed v2, built-in MNIST, 20 clients,
10 per round) with metrics.measure = off, sampled (the default) and exact, run side by side,
interleaved, in one process.

    python bench/measure_cost.py [--rounds 4] [--repeats 2] [--backend local|ray]

Prints the median round time per mode, the ratios against off, and whether sampled reported the
FLOPs that exact did; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import tempfile

from _jobs import median, run_job, start_local_ray

MODES = ("off", "sampled", "exact")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2, help="runs per mode, interleaved")
    ap.add_argument("--backend", choices=("local", "ray"), default="local")
    args = ap.parse_args()
    if args.backend == "ray":
        start_local_ray()
    out = tempfile.mkdtemp(prefix="sfl_bench_measure")
    times: dict[str, list[float]] = {m: [] for m in MODES}
    flops: dict[str, list] = {}
    for rep in range(args.repeats):
        for mode in MODES:
            rows, _ = run_job("quickstart", out, f"{mode}-{rep}", [
                f"metrics.measure={mode}", f"stop.rounds={args.rounds}", "stop.target_metric=null",
                f"cluster.backend={args.backend}"])
            times[mode] += [r["wall_s"] for r in rows]
            flops[mode] = [r["device_flops"] for r in rows]
            print(f"repeat {rep} {mode:<8} rounds {[round(r['wall_s'], 2) for r in rows]}", flush=True)
    med = {m: median(times[m]) for m in MODES}
    print(f"{'mode':<8} {'median round s':>14} {'vs off':>7}")
    for m in MODES:
        print(f"{m:<8} {med[m]:>14.3f} {med[m] / med['off']:>7.3f}")
    print(json.dumps({"bench": "measure_cost", "backend": args.backend, "rounds": args.rounds,
                      "repeats": args.repeats, **{f"{m}_s": med[m] for m in MODES},
                      "sampled_over_off": med["sampled"] / med["off"], "exact_over_off": med["exact"] / med["off"],
                      "sampled_flops_equal_exact": flops["sampled"] == flops["exact"]}))


if __name__ == "__main__":
    main()
