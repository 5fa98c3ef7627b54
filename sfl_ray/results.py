"""Load finished (or failed) runs back as pandas DataFrames.

    run = sfl_ray.load_run("runs/quickstart")            # one run directory
    runs = sfl_ray.load_runs(["runs/compare_mnist"])     # every run below these folders
    runs.summary.groupby("algorithm")["final_metric"].mean()

A run directory is a folder with a `metrics.jsonl` (see `sfl_ray/metrics/writer.py`); a path
given to `load_runs` may be one, or a folder holding run directories at any depth (a compare
root `<root>/<algorithm>/[s<seed>/]`, a sweep root). The report (`sfl_ray.report`) is built on
these frames only.

The metric of a run is `eval_accuracy` (classification, higher is better) or `eval_perplexity`
(language models, lower is better). Values written as "NaN"/"Infinity" come back as floats:
a non-finite metric is a failure of the run and stays visible.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import pandas as pd
import yaml

GIB = 1024 ** 3
PathLike = Union[str, "os.PathLike[str]"]
FINISHED = ("rounds", "target_metric", "comm_budget")  # summary.json stop reasons of a run that ended well
_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
# Keys that never make two runs different experiments: where they were written, and the seed
# (runs that differ only in seed are repetitions of one experiment).
IGNORED_KEYS_PREFIXES = ("output.",)
SEED_KEY = "seed"


def _decode(v: Any) -> Any:
    """JSON as the writer encoded it, with "NaN"/"Infinity"/"-Infinity" back as floats."""
    if isinstance(v, str):
        return _NONFINITE.get(v, v)
    if isinstance(v, dict):
        return {k: _decode(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_decode(x) for x in v]
    return v


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """A nested mapping as one level with dotted keys: {"a": {"b": 1}} -> {"a.b": 1}."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


@dataclass
class RunResult:
    """One run directory, read back.

    dir: the run directory. config: config.yaml as written (nested). flat_config: the same as
    one Series with dotted keys ("partition.alpha"). rows: metrics.jsonl, one row per round
    (nested keys flattened, e.g. "bytes_by_kind.up/activations"; NaN where a row says null or
    NaN). summary: summary.json, or {} if the run never wrote one (still running, or killed
    hard). records: the rows as read (None = not evaluated / not measured, float NaN = NaN),
    which the totals are computed from.
    """

    dir: Path
    config: dict
    flat_config: pd.Series
    rows: pd.DataFrame
    summary: dict
    records: list[dict] = field(default_factory=list)
    _totals: Optional[dict] = field(default=None, repr=False, compare=False)

    @property
    def algorithm(self) -> str:
        return str(self.config.get("algorithm", {}).get("name") or self.summary.get("algorithm") or "?")

    @property
    def seed(self) -> Optional[int]:
        return self.config.get(SEED_KEY)

    @property
    def status(self) -> str:
        """"finished", "failed", "interrupted", or "incomplete" (no summary.json)."""
        reason = self.summary.get("stop_reason")
        if reason is None:
            return "incomplete"
        return "finished" if reason in FINISHED else str(reason)

    @property
    def metric(self) -> str:
        """The headline metric: eval_perplexity for language models, else eval_accuracy."""
        if any(r.get("eval_perplexity") is not None for r in self.records):
            return "eval_perplexity"
        return "eval_accuracy"

    @property
    def higher_is_better(self) -> bool:
        return self.metric != "eval_perplexity"

    def evaluated(self) -> list[dict]:
        """The records of the rounds that were evaluated (a NaN metric counts: it was evaluated)."""
        return [r for r in self.records if r.get(self.metric) is not None]

    def totals(self) -> dict[str, Any]:
        """The run's headline numbers, from its rows (the same for finished and failed runs).

        None where nothing was measured (metrics.measure=off: FLOPs, memory, simulated time).
        A NaN metric anywhere makes the best NaN too: the run failed, which is not hidden.
        """
        if self._totals is None:
            self._totals = self._compute_totals()
        return dict(self._totals)

    def _compute_totals(self) -> dict[str, Any]:
        recs, ev, m = self.records, self.evaluated(), self.metric
        values = [r[m] for r in ev]
        best = None
        if values:
            best = math.nan if any(_isnan(v) for v in values) else (max if self.higher_is_better else min)(values)

        def col(name: str) -> list:
            return [r.get(name) for r in recs]

        def measured(name: str) -> Optional[list]:  # None: not measured in some round
            vs = col(name)
            return None if not vs or any(v is None for v in vs) else vs

        flops, server, sim = (measured(k) for k in ("device_flops", "server_flops", "sim_cum_s"))
        # Memory may be tracked in some rounds only (metrics.memory_every): the peak of those, as summary.json.
        peaks = [v for v in col("device_peak_mem_bytes") if v is not None] or None
        up, down = sum(v or 0 for v in col("bytes_up")), sum(v or 0 for v in col("bytes_down"))
        moved = recs[-1].get("bytes_cum") or 0 if recs else 0
        return {
            "rounds": max((r.get("round") or 0 for r in recs), default=0),
            "evaluations": len(values),
            "final_metric": values[-1] if values else None,
            "final_round": ev[-1].get("round") if ev else None,
            "best_metric": best,
            "bytes_up": up, "bytes_down": down, "bytes": moved,
            "gib_up": up / GIB, "gib_down": down / GIB, "gib": moved / GIB,
            "device_flops": sum(flops) if flops is not None else None,
            "server_flops": sum(server) if server is not None else None,
            "device_peak_mem_bytes": max(peaks) if peaks is not None else None,
            "wall_s": float(sum(v or 0.0 for v in col("wall_s"))),
            "sim_s": sim[-1] if sim is not None else None,
        }

    def bytes_to_reach(self, target: float) -> Optional[int]:
        """Cumulative bytes at the first evaluated round whose metric reaches `target`; None if none does."""
        for r in self.evaluated():
            v = r[self.metric]
            if not _isnan(v) and (v >= target if self.higher_is_better else v <= target):
                return int(r["bytes_cum"])
        return None


def _isnan(v: Any) -> bool:
    return isinstance(v, float) and math.isnan(v)


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(_decode(json.loads(line)))
        except json.JSONDecodeError:
            raise ValueError(f"{path}: line {n} is not JSON") from None
    return rows


def _rows_frame(records: list[dict]) -> pd.DataFrame:
    """metrics.jsonl as a frame: nested keys flattened; a numeric column with gaps is float64
    (NaN where the row says null: not evaluated / not measured)."""
    frame = pd.DataFrame([flatten(r) for r in records])
    for c in frame.columns:
        values = [v for v in frame[c] if v is not None and not _isnan(v)]
        if values and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values) \
                and frame[c].dtype == object:
            frame[c] = pd.to_numeric(frame[c].astype(object).where(frame[c].notna(), None), errors="coerce")
    return frame


def load_run(path: PathLike) -> RunResult:
    """Read one run directory (config.yaml, metrics.jsonl, summary.json). Raises ValueError
    naming the path if it is not one."""
    d = Path(path)
    if not (d / "metrics.jsonl").is_file():
        raise ValueError(f"{d}: not a run directory (no metrics.jsonl)")
    try:
        config = yaml.safe_load((d / "config.yaml").read_text(encoding="utf-8")) if (d / "config.yaml").is_file() else {}
    except yaml.YAMLError:
        raise ValueError(f"{d / 'config.yaml'}: not valid YAML") from None
    if not isinstance(config, dict):
        raise ValueError(f"{d / 'config.yaml'}: not a mapping")
    summary: dict = {}
    if (d / "summary.json").is_file():
        try:
            summary = _decode(json.loads((d / "summary.json").read_text(encoding="utf-8")))
        except json.JSONDecodeError:
            raise ValueError(f"{d / 'summary.json'}: not JSON") from None
    records = _read_jsonl(d / "metrics.jsonl")
    return RunResult(dir=d, config=config, flat_config=pd.Series(flatten(config), dtype=object),
                     rows=_rows_frame(records), summary=summary, records=records)


def find_run_dirs(paths: Iterable[PathLike]) -> list[Path]:
    """Every run directory at or below `paths` (sorted within each path, duplicates dropped).
    Raises ValueError naming a path that does not exist or holds no run."""
    found: list[Path] = []
    for p in paths:
        root = Path(p)
        if not root.exists():
            raise ValueError(f"{root}: no such file or folder")
        if root.is_file():
            root = root.parent if root.name in ("metrics.jsonl", "summary.json", "config.yaml") else root
        here: list[Path] = []
        for folder, subdirs, files in os.walk(root, followlinks=False):
            if "metrics.jsonl" in files:
                here.append(Path(folder))
                subdirs[:] = []  # a run directory holds no other runs (checkpoints/, tensorboard/)
            else:
                subdirs[:] = sorted(s for s in subdirs if not s.startswith("."))
        if not here:
            raise ValueError(f"{root}: no run directory (a folder with metrics.jsonl) found there")
        found += [h for h in sorted(here) if h.resolve() not in {f.resolve() for f in found}]
    return found


def _run_names(dirs: list[Path]) -> list[str]:
    """Short unique names: each run's path relative to the deepest folder they share."""
    resolved = [d.resolve() for d in dirs]
    if len(resolved) == 1:
        return [resolved[0].name]
    common = Path(os.path.commonpath([str(r) for r in resolved]))
    return [str(r.relative_to(common)) for r in resolved]


@dataclass
class Runs:
    """Many runs, read back. `runs`: each RunResult; the frames, one for all:

    rows: every metrics row, with columns run, algorithm, seed and the config keys that differ
      between the runs (dotted, e.g. "partition.alpha") in front.
    summary: one row per run: run, algorithm, seed, status, stop_reason, metric, final_metric,
      best_metric, rounds, bytes, gib, gib_up, gib_down, device_flops, server_flops,
      device_peak_mem_bytes, wall_s, sim_s, dir, and the differing config keys.
    config: one row per run, every flattened config key (index: run).
    varying: the config keys that differ between the runs (seed and output.* left out).
    """

    runs: list[RunResult]
    names: list[str]
    rows: pd.DataFrame
    summary: pd.DataFrame
    config: pd.DataFrame
    varying: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.runs)


def varying_keys(config: pd.DataFrame) -> list[str]:
    """The config columns whose values differ between rows (a key missing in some runs differs)."""
    keys = []
    for c in config.columns:
        if c == SEED_KEY or c.startswith(IGNORED_KEYS_PREFIXES):
            continue
        values = {json.dumps(v, sort_keys=True, default=str) if not _isnan(v) else "null" for v in config[c]}
        if len(values) > 1:
            keys.append(c)
    return keys


def load_runs(paths: Union[PathLike, Iterable[PathLike]]) -> Runs:
    """Read every run directory at or below `paths` (see `find_run_dirs`). Raises ValueError
    naming the path when nothing is found or a file cannot be read."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    dirs = find_run_dirs(list(paths))
    runs = [load_run(d) for d in dirs]
    names = _run_names(dirs)
    config = pd.DataFrame([r.flat_config.to_dict() for r in runs], index=pd.Index(names, name="run"))
    varying = varying_keys(config.drop(columns=["algorithm.name"], errors="ignore"))

    def front(name: str, r: RunResult) -> dict:
        out = {"run": name, "algorithm": r.algorithm, "seed": r.seed}
        out.update({k: r.flat_config.get(k) for k in varying})
        return out

    frames = []
    for name, r in zip(names, runs):
        head = pd.DataFrame([front(name, r)] * len(r.rows), index=r.rows.index)
        frames.append(pd.concat([head, r.rows.drop(columns=[c for c in head if c in r.rows])], axis=1))
    rows = pd.concat(frames, ignore_index=True)
    summary = pd.DataFrame([{**front(name, r), "status": r.status, "stop_reason": r.summary.get("stop_reason"),
                             "error": r.summary.get("error"), "metric": r.metric, **r.totals(), "dir": str(r.dir)}
                            for name, r in zip(names, runs)])
    return Runs(runs=runs, names=names, rows=rows, summary=summary, config=config, varying=varying)
