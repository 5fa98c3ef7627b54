"""One colour per algorithm, the same in every plot and every report.

The built-in algorithms have fixed colours (matplotlib's tab10). A name not listed (a plug-in)
gets a colour from a second palette chosen by a stable hash of its name, moved on to the next
free one if another name in the same report already has it; so it keeps its colour from report
to report unless two plug-ins collide. Groups of one algorithm (e.g. two alphas) share the
colour and differ in line style and marker.
"""

from __future__ import annotations

import zlib

# tab10, in its order; the built-ins in the registry's order.
_TAB10 = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
          "#bcbd22", "#17becf"]
ALGORITHM_COLORS = {
    "fedavg": _TAB10[7], "sl": _TAB10[5], "splitfed_v1": _TAB10[0], "splitfed_v2": _TAB10[1],
    "sglr": _TAB10[8], "cse_fsl": _TAB10[2], "heron_sfl": _TAB10[4], "fsl_sage": _TAB10[3], "ampere": _TAB10[6],
}
# For other names: tab10's unused cyan, then Dark2 (distinct from tab10 and from each other).
EXTRA_COLORS = [_TAB10[9], "#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d",
                "#666666", "#000000"]
LINESTYLES = ["-", "--", ":", "-."]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]


def algorithm_colors(names: list[str]) -> dict[str, str]:
    """The colour of each algorithm name (see the module docstring)."""
    colors = {n: ALGORITHM_COLORS[n] for n in names if n in ALGORITHM_COLORS}
    taken = set(colors.values())
    for n in sorted(set(names) - set(colors)):
        i = zlib.crc32(n.encode()) % len(EXTRA_COLORS)
        for step in range(len(EXTRA_COLORS)):
            c = EXTRA_COLORS[(i + step) % len(EXTRA_COLORS)]
            if c not in taken:
                break
        colors[n] = c
        taken.add(c)
    return colors


def group_styles(algorithms: list[str]) -> list[dict]:
    """Colour, line style and marker of each group, given the algorithm of each group in order."""
    colors = algorithm_colors(algorithms)
    seen: dict[str, int] = {}
    out = []
    for a in algorithms:
        k = seen.get(a, 0)
        seen[a] = k + 1
        out.append({"color": colors[a], "linestyle": LINESTYLES[k % len(LINESTYLES)], "marker": MARKERS[k % len(MARKERS)]})
    return out
