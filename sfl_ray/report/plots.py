"""The report's PNG plots (matplotlib, no pyplot: no global backend, no display needed).

Each curve is a group's mean over its seeds at each evaluated round, with a ±1 std band when
the group has two or more seeds there. A value that was not measured (metrics.measure=off:
null FLOPs, memory, simulated time) is left out, never drawn as zero; a plot with nothing to
show is not drawn and the report says why.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from matplotlib.figure import Figure

from sfl_ray.report.groups import Group, Stat
from sfl_ray.report.style import group_styles
from sfl_ray.report.tables import MIB, METRIC_NAMES, flop_unit
from sfl_ray.results import GIB

DPI = 120
ALPHA_KEY = "partition.alpha"


@dataclass
class Plot:
    file: str      # relative to the report's folder
    title: str
    caption: str


def metric_label(metric: str) -> str:
    name = METRIC_NAMES.get(metric, metric)
    return f"test {name}" + (" (lower is better)" if metric == "eval_perplexity" else "")


def _legend_label(g: Group) -> str:
    bad = g.not_finished
    return g.label + (f" ({len(bad)} of {len(g.runs)} did not finish)" if bad else "")


def _curve(g: Group, metric: str, x_key: str, x_scale: float) -> list[tuple[float, float, Optional[float], int]]:
    """(x mean, metric mean, metric std or None, seeds) per evaluated round, over the runs that
    evaluated it and measured x there."""
    by_round: dict[int, list[tuple[float, float]]] = {}
    for r in g.runs:
        for rec in r.evaluated():
            x = rec.get(x_key)
            if x is not None:
                by_round.setdefault(rec["round"], []).append((x / x_scale, rec[metric]))
    out = []
    for rnd in sorted(by_round):
        xs, ys = zip(*by_round[rnd])
        y_std = statistics.stdev(ys) if len(ys) > 1 and all(math.isfinite(y) for y in ys) else None
        out.append((sum(xs) / len(xs), sum(ys) / len(ys), y_std, len(ys)))
    return out


def _plain_log_ticks(axis) -> None:
    """Log-axis tick labels as plain numbers (0.002, 0.01) rather than 2×10⁻³."""
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")
    axis.set_major_formatter(plain)
    axis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if v > 0 and round(
        v / 10 ** math.floor(math.log10(v))) in (2, 5) else ""))  # 2 and 5 of each decade: readable, not crowded


def _figure(wide: bool = False) -> Figure:
    return Figure(figsize=(9.5 if wide else 8, 4.8), dpi=DPI, layout="constrained")


def _legend(ax, n: int) -> None:
    if n > 6:  # many groups: beside the axes, not over the curves
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    else:
        ax.legend(loc="best", fontsize="small")


def _save(fig: Figure, out: Path, name: str) -> str:
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / name, dpi=DPI)
    return name


def line_plot(groups: list[Group], metric: str, x_key: str, x_scale: float, xlabel: str, title: str,
              out: Path, name: str, logx: Optional[bool] = False,
              integer_x: bool = False) -> tuple[Optional[str], list[str]]:
    """Metric against x for every group; returns the file name (None if nothing to draw) and
    the groups that had no x values. logx None: log scale when x spans 100x or more (e.g.
    simulated times of algorithms that differ by orders of magnitude); "{log}" in xlabel says which."""
    styles = group_styles([g.algorithm for g in groups])
    fig = _figure(wide=len(groups) > 6)
    ax = fig.add_subplot()
    curves = [_curve(g, metric, x_key, x_scale) for g in groups]
    if logx is None:
        xs = [p[0] for c in curves for p in c if p[0] > 0]
        logx = bool(xs) and max(xs) / min(xs) >= 100
        xlabel = xlabel.replace("{log}", ", log scale" if logx else "")
    missing, drawn = [], 0
    for g, st, pts in zip(groups, styles, curves):
        if logx:
            pts = [p for p in pts if p[0] > 0]
        if not pts:
            missing.append(g.label)
            continue
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        ax.plot(xs, ys, color=st["color"], linestyle=st["linestyle"], marker=st["marker"], markersize=4,
                linewidth=1.8, label=_legend_label(g))
        banded = [p for p in pts if p[2] is not None]
        if banded:
            ax.fill_between([p[0] for p in banded], [p[1] - p[2] for p in banded], [p[1] + p[2] for p in banded],
                            color=st["color"], alpha=0.18, linewidth=0)
        drawn += 1
    if not drawn:
        return None, missing
    if logx:
        ax.set_xscale("log")
        _plain_log_ticks(ax.xaxis)
    if integer_x:
        from matplotlib.ticker import MaxNLocator
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(metric_label(metric))
    ax.set_title(title)
    ax.grid(True, which="major", alpha=0.3)
    _legend(ax, drawn)
    return _save(fig, out, name), missing


def device_bars(groups: list[Group], out: Path, name: str) -> tuple[Optional[str], list[str]]:
    """Two bar panels, device peak memory (MiB) and device FLOPs per group, mean ± std."""
    styles = group_styles([g.algorithm for g in groups])
    scale, unit = flop_unit(groups)
    panels: list[tuple[str, str, Callable]] = [
        ("peak memory of one device", "MiB", lambda r: _div(r.totals()["device_peak_mem_bytes"], MIB)),
        ("compute of all devices, all rounds", unit, lambda r: _div(r.totals()["device_flops"], scale))]
    measured = [g for g in groups if all(Stat([get(r) for r in g.runs]).n for _, _, get in panels)]
    missing = [g.label for g in groups if g not in measured]
    if not measured:
        return None, missing
    fig = Figure(figsize=(max(8.0, 1.1 * len(measured) + 3), 4.8), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, 2)
    fig.suptitle("device cost per group (bars: mean over seeds; error bars: ±1 std)")
    for ax, (what, u, get) in zip(axes, panels):
        for i, g in enumerate(measured):
            st = styles[groups.index(g)]
            s = Stat([get(r) for r in g.runs])
            ax.bar(i, s.mean, yerr=s.std if s.std is not None else None, color=st["color"], capsize=4,
                   edgecolor="black", linewidth=0.6, hatch=_HATCH[st["linestyle"]], label=_legend_label(g))
        ax.set_xticks(range(len(measured)), [g.label for g in measured], rotation=30, ha="right",
                      fontsize="small")
        ax.set_ylabel(f"{what} ({u})")
        ax.set_title(what, fontsize="medium")
        ax.grid(True, axis="y", alpha=0.3)
    return _save(fig, out, name), missing


_HATCH = {"-": "", "--": "//", ":": "..", "-.": "xx"}


def _div(v: Optional[float], by: float) -> Optional[float]:
    return None if v is None else v / by


def alpha_plot(groups: list[Group], metric: str, out: Path, name: str) -> Optional[str]:
    """Final metric against the Dirichlet alpha: one line per group-without-alpha."""
    series: dict[str, list[tuple[float, Stat, Group]]] = {}
    for g in groups:
        a = g.settings.get(ALPHA_KEY)
        if isinstance(a, (int, float)):
            series.setdefault(g.label_without(ALPHA_KEY), []).append(
                (float(a), Stat([r.totals()["final_metric"] for r in g.runs]), g))
    if not series:
        return None
    firsts = [pts[0][2] for pts in series.values()]
    styles = dict(zip(series, group_styles([g.algorithm for g in firsts])))
    fig = _figure(wide=len(series) > 6)
    ax = fig.add_subplot()
    alphas = []
    for label, pts in series.items():
        pts = sorted((p for p in pts if p[1].mean is not None), key=lambda p: p[0])
        if not pts:
            continue
        st = styles[label]
        xs, means = [p[0] for p in pts], [p[1].mean for p in pts]
        stds = [p[1].std for p in pts]
        alphas += xs
        ax.errorbar(xs, means, yerr=[s if s is not None else 0.0 for s in stds], color=st["color"],
                    linestyle=st["linestyle"], marker=st["marker"], capsize=3, linewidth=1.8, label=label)
        banded = [(x, m, s) for x, m, s in zip(xs, means, stds) if s is not None]
        if len(banded) > 1:
            ax.fill_between([b[0] for b in banded], [b[1] - b[2] for b in banded], [b[1] + b[2] for b in banded],
                            color=st["color"], alpha=0.18, linewidth=0)
    if alphas and min(alphas) > 0 and max(alphas) / min(alphas) >= 10:
        ax.set_xscale("log")
        _plain_log_ticks(ax.xaxis)
    ax.set_xlabel("Dirichlet α of the partition (smaller = more non-IID)")
    ax.set_ylabel(f"final {metric_label(metric)}")
    ax.set_title(f"final {METRIC_NAMES.get(metric, metric)} vs data heterogeneity (mean ± std over seeds)")
    ax.grid(True, alpha=0.3)
    _legend(ax, len(series))
    return _save(fig, out, name)


def make_plots(groups: list[Group], metric: str, varying: list[str], out: Path) -> tuple[list[Plot], list[str]]:
    """Every plot the runs allow, into `out`; and notes on what was left out and why."""
    plots, notes = [], []
    n = METRIC_NAMES.get(metric, metric)
    band = "lines: mean over seeds; bands: ±1 std where a group has two or more seeds"

    f, missing = line_plot(groups, metric, "bytes_cum", GIB, "data moved, up + down, cumulative (GiB, log scale)",
                           f"{n} vs data moved", out, "metric_vs_gib.png", logx=True)
    if f:
        plots.append(Plot(f, f"{n} vs data moved", f"Test {n} at each evaluated round against the bytes moved "
                          f"between devices and servers so far (log x); {band}."))
    f, _ = line_plot(groups, metric, "round", 1.0, "round", f"{n} vs round", out, "metric_vs_round.png",
                     integer_x=True)
    if f:
        plots.append(Plot(f, f"{n} vs round", f"Test {n} at each evaluated round; {band}."))
    f, missing = line_plot(groups, metric, "sim_cum_s", 1.0, "simulated time, cumulative (s{log})",
                           f"{n} vs simulated time", out, "metric_vs_sim_time.png", logx=None)
    if f:
        plots.append(Plot(f, f"{n} vs simulated time", f"Test {n} against the simulated wall-clock time of the "
                          f"rounds (cost_model: device and link speeds); {band}."))
    if missing:
        notes.append(f"{n} vs simulated time: not drawn for {', '.join(missing)}: simulated time was not "
                     "measured (metrics.measure=off)" if f else
                     "No plot against simulated time: it was not measured in these runs (metrics.measure=off).")
    f, missing = device_bars(groups, out, "device_cost.png")
    if f:
        plots.append(Plot(f, "device memory and compute", "Peak memory of one device (the largest of the "
                          "clients tracked) and the FLOPs of all devices over the run; error bars: ±1 std over seeds."))
    if missing:
        notes.append(f"Device memory and FLOPs: not shown for {', '.join(missing)}: not measured "
                     "(metrics.measure=off)" if f else
                     "No device memory/FLOPs plot: they were not measured in these runs (metrics.measure=off).")
    if ALPHA_KEY in varying:
        f = alpha_plot(groups, metric, out, "metric_vs_alpha.png")
        if f:
            plots.append(Plot(f, f"{n} vs Dirichlet α", f"Final test {n} of each group against its partition's "
                              "Dirichlet α; error bars and bands: ±1 std over seeds."))
    return plots, notes
