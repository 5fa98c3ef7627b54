"""Run every algorithm on one job (same model, cut, data, clients, split, seed) and write one table.

    sfl-ray compare --config compare_mnist [--algorithms fedavg,sl,...] [--set KEY=VALUE ...]
        [--algo-set NAME:KEY=VALUE ...] [--seeds N]
    (or python -m sfl_ray.compare ...)

Each algorithm runs with its own defaults (`--set algorithm.name=X` alone) into
`<output.dir>/<output.name>/<algorithm>/` (with `--seeds N`, N > 1: once per seed, seed ..
seed+N-1, into `<algorithm>/s<seed>/`). After every run the root `<output.dir>/<output.name>/`
gets the report (report.md, report.html, report.json, plots/: see sfl_ray.report) and the
plain table compare.md / compare.json: final accuracy, GiB moved, device FLOPs, device peak
memory, simulated and wall time.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from sfl_ray.algorithms import algorithm_names

GIB = 1024 ** 3


def table(results: list[dict]) -> str:
    """The comparison as a markdown table (accuracy for classification, perplexity for LMs)."""
    lm = any((r["final"] or {}).get("eval_perplexity") is not None for r in results)
    metric, label = ("eval_perplexity", "ppl") if lm else ("eval_accuracy", "acc")
    head = (f"| algorithm | rounds | first {label} | final {label} | GiB moved | device TFLOPs | device peak MiB "
            "| server TFLOPs | sim time s | wall s |\n|---|---|---|---|---|---|---|---|---|---|\n")

    def fmt(v, scale: float = 1.0, digits: int = 4):
        return "-" if v is None else f"{v / scale:.{digits}f}"  # not measured (metrics.measure=off)

    lines = []
    for r in results:
        t, f = r["totals"], r["final"] or {}
        first = r.get("first_eval", {}).get(metric)
        name = r["algorithm"] + (f" s{r['seed']}" if r.get("seeds", 1) > 1 else "")
        lines.append(f"| {name} | {r['rounds']} | {fmt(first)} | {fmt(f.get(metric))} | {t['gib']:.4f} | "
                     f"{fmt(t['device_flops'], 1e12, 3)} | {fmt(t['device_peak_mem_bytes'], 2**20, 2)} | "
                     f"{fmt(t['server_flops'], 1e12, 3)} | {fmt(t['sim_s'], 1, 1)} | {t['wall_s']:.1f} |")
    return head + "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None, prog: str = "python -m sfl_ray.compare") -> int:
    from sfl_ray.config import load_config
    from sfl_ray.config_base import ConfigError
    from sfl_ray.run import _init_ray

    ap = argparse.ArgumentParser(prog=prog, description="Run every algorithm on one job and write one table "
                                 "(<output.dir>/<output.name>/compare.md and compare.json).")
    ap.add_argument("--config", required=True, metavar="FILE_OR_NAME",
                    help="YAML job file, or the name of a shipped job (e.g. compare_mnist)")
    ap.add_argument("--algorithms", default=",".join(algorithm_names()), help="comma-separated (default: all)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key for every algorithm (repeatable)")
    ap.add_argument("--algo-set", dest="algo_overrides", action="append", default=[], metavar="NAME:KEY=VALUE",
                    help="an override for one algorithm only, e.g. fsl_sage:algorithm.align_every=2")
    ap.add_argument("--seeds", type=int, default=1, metavar="N",
                    help="run each algorithm with N seeds (seed .. seed+N-1); the report shows mean ± std")
    args = ap.parse_args(argv)
    try:
        base = load_config(args.config, args.overrides)
        names = [a.strip() for a in args.algorithms.split(",") if a.strip()]
        unknown = [a for a in names if a not in algorithm_names()]
        if unknown:
            raise ConfigError("--algorithms", ",".join(unknown), f"allowed: {', '.join(algorithm_names())}")
        if args.seeds < 1:
            raise ConfigError("--seeds", args.seeds, "at least 1")
    except ConfigError as err:
        print(str(err), file=sys.stderr)
        return 2
    root = f"{base.output.dir.rstrip('/')}/{base.run_name()}"
    runs = [(name, seed) for name in names for seed in range(base.seed, base.seed + args.seeds)]
    # One Ray instance for every run (each run_config would otherwise start and stop its own).
    started_ray = base.cluster.backend == "ray" and _init_ray(base)
    try:
        return _run_all(args, base, names, runs, root, prog)
    finally:
        if started_ray:
            import ray
            ray.shutdown()


def _run_all(args, base, names, runs, root: str, prog: str) -> int:
    from sfl_ray.config import load_config
    from sfl_ray.config_base import ConfigError
    from sfl_ray.run import run_config

    results = []
    for name, seed in runs:
        own = [o.split(":", 1)[1] for o in args.algo_overrides if o.split(":", 1)[0] == name]
        where = ([f"output.dir={root}", f"output.name={name}"] if args.seeds == 1
                 else [f"output.dir={root}/{name}", f"output.name=s{seed}", f"seed={seed}"])
        print(f"== {name}" + (f" seed {seed}" if args.seeds > 1 else ""), flush=True)
        try:  # the one code path of a run: checks first, run directory claimed, partition.json
            cfg = load_config(args.config, args.overrides + [f"algorithm.name={name}"] + where + own)
            summary = run_config(cfg, prog=prog)
        except ConfigError as err:
            print(str(err), file=sys.stderr)
            return 2
        with open(f"{cfg.run_dir()}/metrics.jsonl") as f:
            evaluated = [row for row in map(json.loads, f) if row.get("eval_loss") is not None]
        summary["first_eval"] = evaluated[0] if evaluated else {}
        summary.update(seed=seed, seeds=args.seeds)
        results.append(summary)
        Path(root).mkdir(parents=True, exist_ok=True)
        (Path(root) / "compare.md").write_text(table(results))  # rewritten after each: nothing lost
        (Path(root) / "compare.json").write_text(json.dumps(results, indent=2, default=str))
        _report(root)
    print(table(results))
    print(f"report: {root}/report.md (and report.html, plots/)")
    return 0


def _report(root: str) -> None:
    """The report of the runs so far; a report that cannot be made must not stop the comparison."""
    from sfl_ray.report import write_report

    try:
        write_report([root], root)
    except (ValueError, OSError) as err:
        print(f"sfl_ray.compare: no report: {err}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
