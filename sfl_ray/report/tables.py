"""The report's tables: one row per run group (mean ± std over seeds) and one row per run.

Every cell is made from numbers that also go to report.json (`values` per run, `mean`, `std`),
so a program can check the table against metrics.jsonl without parsing markdown.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

from sfl_ray.report.groups import Group, Stat
from sfl_ray.results import GIB, RunResult

MIB = 1024 ** 2
FLOP_UNITS = [(1e15, "PFLOP"), (1e12, "TFLOP"), (1e9, "GFLOP"), (1e6, "MFLOP"), (1.0, "FLOP")]
METRIC_NAMES = {"eval_accuracy": "accuracy", "eval_perplexity": "perplexity"}


def num(v: Optional[float], digits: int = 4) -> str:
    """A number for a table cell: `digits` significant digits; NaN/inf spelled out."""
    if v is None:
        return "-"
    if isinstance(v, float) and math.isnan(v):
        return "NaN"
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return f"{v:.{digits}g}"


def mean_std(s: Stat, scale: float = 1.0) -> str:
    """"mean ± std" (std only with two or more different values); "-" when nothing was measured."""
    m = s.mean
    if m is None:
        return "-"
    sd = s.std
    if sd is None or len(set(s.present)) == 1:  # one seed, or all seeds agree exactly (rounds, bytes)
        return num(m / scale)
    return f"{num(m / scale)} ± {num(sd / scale, 2)}"


@dataclass
class Column:
    key: str        # the name in report.json
    header: str     # with its unit
    value: Callable[[RunResult], Optional[float]]
    scale: float = 1.0


def flop_unit(groups: list[Group]) -> tuple[float, str]:
    """One unit for the FLOPs column: the largest whose value for the biggest group is >= 1."""
    top = max((v for g in groups for r in g.runs if (v := r.totals()["device_flops"]) is not None
               and math.isfinite(v)), default=0)
    return next(((s, u) for s, u in FLOP_UNITS if top >= s), FLOP_UNITS[-1])


def group_columns(metric: str, groups: list[Group], target: Optional[float]) -> list[Column]:
    scale, unit = flop_unit(groups)
    name = METRIC_NAMES.get(metric, metric)

    def total(key: str) -> Callable[[RunResult], Optional[float]]:
        return lambda r: r.totals()[key]

    cols = [Column("final_metric", f"final {name}", total("final_metric")),
            Column("best_metric", f"best {name}", total("best_metric")),
            Column("rounds", "rounds", total("rounds")),
            Column("gib_up", "GiB up", total("gib_up")),
            Column("gib_down", "GiB down", total("gib_down")),
            Column("device_flops", f"device {unit}", total("device_flops"), scale),
            Column("device_peak_mem_bytes", "device peak MiB", total("device_peak_mem_bytes"), MIB),
            Column("wall_s", "wall s", total("wall_s")),
            Column("sim_s", "simulated s", total("sim_s"))]
    if target is not None:
        cols.append(Column("gib_to_target", f"GiB to {name} {num(target)}",
                           lambda r: (b / GIB if (b := r.bytes_to_reach(target)) is not None else None)))
    return cols


def _to_target_cell(s: Stat) -> str:
    if s.n == 0:
        return "not reached"
    cell = mean_std(s)
    return cell if s.n == len(s.values) else f"{cell} ({s.n}/{len(s.values)} reached)"


def group_table(metric: str, groups: list[Group], target: Optional[float]) -> tuple[list[str], list[list[str]], list[dict]]:
    """Headers, cells and the report.json entry of each group."""
    cols = group_columns(metric, groups, target)
    headers = ["group", "seeds"] + [c.header for c in cols]
    cells, entries = [], []
    for g in groups:
        stats = {c.key: Stat([c.value(r) for r in g.runs]) for c in cols}
        row = [g.label + _mark(g), str(len(g.runs))]
        for c in cols:
            s = stats[c.key]
            row.append(_to_target_cell(s) if c.key == "gib_to_target" else mean_std(s, c.scale))
        cells.append(row)
        entries.append({"label": g.label, "algorithm": g.algorithm, "settings": g.settings, "runs": g.names,
                        "seeds": g.seeds, "not_finished": dict(g.not_finished),
                        "columns": {c.key: {**stats[c.key].to_json(), "scale": c.scale, "header": c.header,
                                            "cell": row[i + 2]} for i, c in enumerate(cols)}})
    return headers, cells, entries


def _mark(g: Group) -> str:
    """A group with runs that did not finish says so where the numbers are."""
    bad = g.not_finished
    if not bad:
        return ""
    kinds = sorted({s for _, s in bad})
    return f" ⚠ {len(bad)} of {len(g.runs)} {'/'.join(kinds)}"


def run_table(metric: str, groups: list[Group]) -> tuple[list[str], list[list[str]], list[dict]]:
    """One row per run: where it is, its group and seed, how it ended, its final numbers."""
    name = METRIC_NAMES.get(metric, metric)
    headers = ["run", "group", "seed", "status", "rounds", f"final {name}", f"best {name}", "GiB moved", "note"]
    cells, entries = [], []
    for g in groups:
        for n, r in zip(g.names, g.runs):
            t = r.totals()
            note = r.summary.get("error") or ""
            if r.status == "incomplete":
                note = note or "no summary.json: still running, or stopped without writing one"
            cells.append([n, g.label, str(r.seed), r.status, str(t["rounds"]), num(t["final_metric"]),
                          num(t["best_metric"]), num(t["gib"]), note])
            entries.append({"run": n, "dir": str(r.dir), "group": g.label, "seed": r.seed, "status": r.status,
                            "stop_reason": r.summary.get("stop_reason"), "error": r.summary.get("error"),
                            **{k: v for k, v in t.items()}})
    return headers, cells, entries
