"""The report of one or more runs: tables (mean ± std over seeds) and plots.

    sfl-ray report RUN_DIR... [--out DIR] [--target VALUE]
    python -m sfl_ray.report RUN_DIR... [--out DIR] [--target VALUE]

writes DIR/report.md, DIR/report.html (plots embedded), DIR/report.json (the numbers behind
each table cell) and DIR/plots/*.png. A RUN_DIR may be a run directory or any folder holding
run directories (a compare or sweep root). Runs are grouped by their config minus the seed.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

from sfl_ray.results import PathLike, load_runs

__all__ = ["write_report", "main"]


def write_report(paths: Union[PathLike, Iterable[PathLike]], out_dir: PathLike, target: Optional[float] = None) -> Path:
    """Write report.md, report.html, report.json and plots/ into `out_dir` for the runs at or
    below `paths`; returns the path of report.md. `target`: the metric value for the "GiB to
    target" column (default: the runs' stop.target_metric, else 90% of the best final mean).
    Raises ValueError (naming the path) when no run is found or a run cannot be read."""
    from sfl_ray.report import render
    from sfl_ray.report.groups import group_runs, higher_is_better, report_metric, resolve_target
    from sfl_ray.report.plots import make_plots
    from sfl_ray.report.tables import METRIC_NAMES, group_table, num, run_table

    if target is not None and not math.isfinite(target):
        raise ValueError(f"--target {target}: not a finite number")
    runs = load_runs(paths)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metric = report_metric(runs)
    groups = group_runs(runs)
    target_value, target_source = resolve_target(runs, groups, metric, target)
    g_head, g_rows, g_json = group_table(metric, groups, target_value)
    r_head, r_rows, r_json = run_table(metric, groups)
    plots, notes = make_plots(groups, metric, runs.varying, out / "plots")

    name = METRIC_NAMES.get(metric, metric)
    better = "higher" if higher_is_better(metric) else "lower"
    bad = [(n, s) for g in groups for n, s in g.not_finished]
    seeds = sorted({len(g.runs) for g in groups})
    about = [f"{len(runs)} runs in {len(groups)} groups (same config but the seed); "
             f"{'/'.join(map(str, seeds))} seed(s) per group. Metric: test {name} ({metric}, {better} is better).",
             "Cells: mean ± sample std (n-1) over a group's seeds; no std with one seed or where all seeds agree. "
             "Totals are sums over the rows of metrics.jsonl; final = the last evaluated round.",
             (f"Target {name}: {num(target_value)}, {target_source}. GiB to target = the cumulative bytes "
              "at the first evaluated round that reaches it." if target_value is not None
              else f"No target {name}: {target_source}.")]
    told = sorted({k for g in groups for k in g.settings})
    if told:
        about.append("Groups differ in: algorithm.name, " + ", ".join(told) + ".")
    if bad:
        notes.insert(0, "Runs that did not finish (their numbers are in the tables, marked ⚠): "
                     + ", ".join(f"{n} ({s})" for n, s in bad) + ".")
    blocks: list = [render.Heading("sfl_ray report", 1), render.Bullets(about)]
    if notes:
        blocks += [render.Heading("Notes"), render.Bullets(notes)]
    blocks += [render.Heading("Groups"), render.Table(g_head, g_rows),
               render.Heading("Plots")]
    blocks += [render.Image(f"plots/{p.file}", p.title, p.caption) for p in plots]
    blocks += [render.Heading("Runs"), render.Table(r_head, r_rows)]

    (out / "report.md").write_text(render.to_markdown(blocks), encoding="utf-8")
    (out / "report.html").write_text(render.to_html(blocks, "sfl_ray report", out), encoding="utf-8")
    render.write_json(out / "report.json", {
        "metric": metric, "higher_is_better": higher_is_better(metric),
        "target": {"value": target_value, "source": target_source}, "varying": runs.varying,
        "group_table": {"headers": g_head, "rows": g_rows}, "groups": g_json, "runs": r_json,
        "plots": [{"file": f"plots/{p.file}", "title": p.title, "caption": p.caption} for p in plots],
        "notes": notes})
    return out / "report.md"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse would print the usage too)
        print(f"{self.prog}: {message}", file=sys.stderr)
        raise SystemExit(2)


def main(argv: Optional[Sequence[str]] = None, prog: str = "sfl-ray report") -> int:
    """`sfl-ray report RUN_DIR... [--out DIR] [--target VALUE]`; 0 on success, 2 on bad input."""
    p = _Parser(prog=prog, description="Tables and plots of finished runs (mean ± std over seeds).")
    p.add_argument("paths", nargs="+", metavar="RUN_DIR",
                   help="a run directory, or a folder holding run directories (compare or sweep root)")
    p.add_argument("--out", metavar="DIR", help="where report.md/.html/.json and plots/ go (default: the one "
                   "RUN_DIR given, else the folder the RUN_DIRs share)")
    p.add_argument("--target", type=float, metavar="VALUE",
                   help="metric value for 'GiB to target' (default: the runs' stop.target_metric, else 90%% "
                        "of the best final mean)")
    try:
        args = p.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    out = args.out or _default_out(args.paths)
    try:
        path = write_report(args.paths, out, args.target)
    except ValueError as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # e.g. the output folder is not writable
        print(f"{prog}: {err.filename or out}: {err.strerror or err}", file=sys.stderr)
        return 2
    print(f"report: {path} (and report.html, report.json, plots/)")
    return 0


def _default_out(paths: list[str]) -> str:
    import os

    folders = [str(Path(p).parent if Path(p).is_file() else Path(p)) for p in paths]
    if len(folders) == 1:
        return folders[0]
    return os.path.commonpath([os.path.abspath(f) for f in folders])
