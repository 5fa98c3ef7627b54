"""Run every algorithm on one job (same model, cut, data, clients, split, seed) and write one table.

    sfl-ray compare --config compare_mnist [--algorithms fedavg,sl,...] [--set KEY=VALUE ...]
        [--algo-set NAME:KEY=VALUE ...]
    (or python -m sfl_ray.compare ...)

Each algorithm runs with its own defaults (`--set algorithm.name=X` alone) into
`<output.dir>/<output.name>/<algorithm>/`; the table goes to `<output.dir>/<output.name>/compare.md`
and `compare.json`: final accuracy, GiB moved, device FLOPs, device peak memory, simulated and
wall time.
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
        lines.append(f"| {r['algorithm']} | {r['rounds']} | {fmt(first)} | {fmt(f.get(metric))} | {t['gib']:.4f} | "
                     f"{fmt(t['device_flops'], 1e12, 3)} | {fmt(t['device_peak_mem_bytes'], 2**20, 2)} | "
                     f"{fmt(t['server_flops'], 1e12, 3)} | {fmt(t['sim_s'], 1, 1)} | {t['wall_s']:.1f} |")
    return head + "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None, prog: str = "python -m sfl_ray.compare") -> int:
    from sfl_ray.config import dump_config, load_config
    from sfl_ray.metrics.writer import RunWriter
    from sfl_ray.config_base import ConfigError
    from sfl_ray.run import _init_ray, prepare
    from sfl_ray.runtime.launch import run_experiment

    ap = argparse.ArgumentParser(prog=prog, description="Run every algorithm on one job and write one table "
                                 "(<output.dir>/<output.name>/compare.md and compare.json).")
    ap.add_argument("--config", required=True, metavar="FILE_OR_NAME",
                    help="YAML job file, or the name of a shipped job (e.g. compare_mnist)")
    ap.add_argument("--algorithms", default=",".join(algorithm_names()), help="comma-separated (default: all)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key for every algorithm (repeatable)")
    ap.add_argument("--algo-set", dest="algo_overrides", action="append", default=[], metavar="NAME:KEY=VALUE",
                    help="an override for one algorithm only, e.g. fsl_sage:algorithm.align_every=2")
    args = ap.parse_args(argv)
    try:
        base = load_config(args.config, args.overrides)
        names = [a.strip() for a in args.algorithms.split(",") if a.strip()]
        unknown = [a for a in names if a not in algorithm_names()]
        if unknown:
            raise ConfigError("--algorithms", ",".join(unknown), f"allowed: {', '.join(algorithm_names())}")
    except ConfigError as err:
        print(str(err), file=sys.stderr)
        return 2
    root = f"{base.output.dir.rstrip('/')}/{base.run_name()}"
    results = []
    for name in names:
        own = [o.split(":", 1)[1] for o in args.algo_overrides if o.split(":", 1)[0] == name]
        cfg = load_config(args.config, args.overrides + [f"algorithm.name={name}", f"output.dir={root}",
                                                         f"output.name={name}"] + own)
        print(f"== {name}", flush=True)
        algorithm_cls, data, shards, _ = prepare(cfg)
        RunWriter(cfg.run_dir()).write_text("config.yaml", dump_config(cfg))
        if cfg.cluster.backend == "ray":
            _init_ray(cfg)
        summary = run_experiment(algorithm_cls, cfg, data, shards)
        with open(f"{cfg.run_dir()}/metrics.jsonl") as f:
            evaluated = [row for row in map(json.loads, f) if row.get("eval_loss") is not None]
        summary["first_eval"] = evaluated[0] if evaluated else {}
        results.append(summary)
        Path(root).mkdir(parents=True, exist_ok=True)
        (Path(root) / "compare.md").write_text(table(results))  # rewritten after each: nothing lost
        (Path(root) / "compare.json").write_text(json.dumps(results, indent=2, default=str))
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
