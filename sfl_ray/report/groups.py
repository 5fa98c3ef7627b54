"""Runs grouped into experiments (same config but the seed), their labels, and mean ± std.

Two runs are one group when their configs agree on every key but `seed` and `output.*`. A
group's label is its algorithm and the keys that tell it from the other groups
(`fedavg α=0.1`): keys outside `algorithm.*` that differ between any groups, and an
algorithm's own keys where two groups of that algorithm differ.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Optional

from sfl_ray.algorithms import algorithm_names
from sfl_ray.results import IGNORED_KEYS_PREFIXES, SEED_KEY, RunResult, Runs

SHORT_NAMES = {"partition.alpha": "α"}


@dataclass
class Group:
    """Runs of one experiment over seeds."""

    algorithm: str
    label: str
    runs: list[RunResult]
    names: list[str]
    settings: dict[str, Any] = field(default_factory=dict)  # the keys in the label, with values
    label_parts: dict[str, str] = field(default_factory=dict)  # key -> its text in the label ("α=0.1")

    def label_without(self, key: str) -> str:
        """The label without one key's part (the alpha plot's series: α is its x axis)."""
        return " ".join([self.algorithm] + [t for k, t in self.label_parts.items() if k != key])

    @property
    def seeds(self) -> list[Optional[int]]:
        return [r.seed for r in self.runs]

    @property
    def not_finished(self) -> list[tuple[str, str]]:
        """(run name, status) of the runs that did not finish."""
        return [(n, r.status) for n, r in zip(self.names, self.runs) if r.status != "finished"]


def _identity(r: RunResult) -> str:
    flat = {k: v for k, v in r.flat_config.items() if k != SEED_KEY and not k.startswith(IGNORED_KEYS_PREFIXES)}
    return json.dumps(flat, sort_keys=True, default=str)


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return "none" if v is None else str(v)


def _label_keys(reps: list[RunResult]) -> set[str]:
    """The keys that tell the groups (given by one run each) apart; see the module docstring."""
    def differ(runs: list[RunResult], key: str) -> bool:
        return len({json.dumps(r.flat_config.get(key), default=str) for r in runs}) > 1

    keys = set()
    all_keys = sorted({k for r in reps for k in r.flat_config.index})
    for k in all_keys:
        if k == SEED_KEY or k.startswith(IGNORED_KEYS_PREFIXES) or k == "algorithm.name":
            continue
        if k.startswith("algorithm."):
            by_algo: dict[str, list[RunResult]] = {}
            for r in reps:
                by_algo.setdefault(r.algorithm, []).append(r)
            if any(differ(rs, k) for rs in by_algo.values() if len(rs) > 1):
                keys.add(k)
        elif differ(reps, k):
            keys.add(k)
    return keys


def _short(keys: set[str]) -> dict[str, str]:
    """Label name of each key: its last part, unless two keys share it (then the whole key)."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: SHORT_NAMES.get(k, k.rsplit(".", 1)[-1] if last.count(k.rsplit(".", 1)[-1]) == 1 else k)
            for k in keys}


def _order(algorithm: str) -> int:
    names = algorithm_names()
    return names.index(algorithm) if algorithm in names else len(names)


def group_runs(runs: Runs) -> list[Group]:
    """The runs grouped by config minus seed, ordered by algorithm (registry order, others
    after) and then by their label settings."""
    by_key: dict[str, tuple[list[RunResult], list[str]]] = {}
    for name, r in zip(runs.names, runs.runs):
        rs, ns = by_key.setdefault(_identity(r), ([], []))
        rs.append(r)
        ns.append(name)
    reps = [rs[0] for rs, _ in by_key.values()]
    keys = _label_keys(reps)
    short = _short(keys)
    groups = []
    for rs, ns in by_key.values():
        order = sorted(range(len(rs)), key=lambda i: (rs[i].seed is None, rs[i].seed or 0, ns[i]))
        rs, ns = [rs[i] for i in order], [ns[i] for i in order]
        settings = {k: rs[0].flat_config.get(k) for k in sorted(keys) if k in rs[0].flat_config.index}
        parts = {k: f"{short[k]}={_fmt_value(v)}" for k, v in settings.items()}
        groups.append(Group(algorithm=rs[0].algorithm, label=" ".join([rs[0].algorithm, *parts.values()]), runs=rs,
                            names=ns, settings=settings, label_parts=parts))

    def sort_key(g: Group):
        return (_order(g.algorithm), g.algorithm,
                [(0, v, "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, 0, str(v))
                 for v in g.settings.values()])
    return sorted(groups, key=sort_key)


@dataclass
class Stat:
    """A quantity over a group's runs: each run's value (None = not measured / not reached)."""

    values: list[Optional[float]]

    @property
    def present(self) -> list[float]:
        return [v for v in self.values if v is not None]

    @property
    def n(self) -> int:
        return len(self.present)

    @property
    def mean(self) -> Optional[float]:
        p = self.present
        if not p:
            return None
        if not all(math.isfinite(v) for v in p):  # a failed run shows (NaN; fsum refuses inf + -inf)
            return sum(p) / len(p)
        return math.fsum(p) / len(p)

    @property
    def std(self) -> Optional[float]:
        """Sample standard deviation (n - 1) over the runs with a value; None below two."""
        p = self.present
        if len(p) < 2:
            return None
        if any(math.isnan(v) or math.isinf(v) for v in p):
            return math.nan
        return statistics.stdev(p)

    def to_json(self) -> dict:
        return {"mean": self.mean, "std": self.std, "n": self.n, "values": self.values}


def higher_is_better(metric: str) -> bool:
    return metric != "eval_perplexity"


def report_metric(runs: Runs) -> str:
    """The one metric of a report; ValueError if classification and LM runs are mixed."""
    metrics = {r.metric for r in runs.runs}
    if len(metrics) > 1:
        raise ValueError("these runs mix classification (eval_accuracy) and language models (eval_perplexity): "
                         "report them separately")
    return metrics.pop()


def resolve_target(runs: Runs, groups: list[Group], metric: str, given: Optional[float]) -> tuple[Optional[float], str]:
    """The target metric for "bytes to reach" and where it came from (said in the report):
    --target; else the runs' stop.target_metric when all set the same one for this metric;
    else 90% of the best final mean accuracy (perplexity: 10% above the best final mean)."""
    if given is not None:
        return float(given), "given with --target"
    targets = {(r.flat_config.get("stop.target_metric.name"), r.flat_config.get("stop.target_metric.value"))
               for r in runs.runs}
    if len(targets) == 1:
        name, value = targets.pop()
        if name == metric and value is not None:
            return float(value), "from the runs' stop.target_metric"
    finals = [m for g in groups if (m := Stat([r.totals()["final_metric"] for r in g.runs]).mean) is not None
              and math.isfinite(m)]
    if not finals:
        return None, "none: no run has a finite final metric"
    if higher_is_better(metric):
        return 0.9 * max(finals), "90% of the best group's mean final value (no --target, no common stop.target_metric)"
    return 1.1 * min(finals), "10% above the best group's mean final value (no --target, no common stop.target_metric)"
