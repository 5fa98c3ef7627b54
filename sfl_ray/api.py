"""The Python API: `sfl_ray.run(config_or_path, **overrides) -> Run`.

    import sfl_ray
    run = sfl_ray.run("quickstart", train__lr=0.01, cluster__backend="local")
    run.summary["final"]["eval_accuracy"], run.rows[["round", "eval_accuracy", "bytes_cum"]]

The same code path as `sfl-ray run` (`sfl_ray.run.run_config`), in this process; errors are
exceptions, not exit codes.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Union

from sfl_ray.config import ExperimentConfig, load_config, validate_config

if TYPE_CHECKING:
    import pandas

ConfigSource = Union[str, Path, Mapping[str, Any], ExperimentConfig]
_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


@dataclass
class Run:
    """A finished run: its directory, its resolved config and its summary.json."""

    dir: Path
    config: ExperimentConfig
    summary: dict

    @property
    def rows(self) -> "pandas.DataFrame":
        """metrics.jsonl as a DataFrame, one row per round (non-finite values as float NaN/inf,
        not the strings the file holds)."""
        import pandas

        from sfl_ray.metrics.writer import RunWriter

        rows = RunWriter(self.config.run_dir()).read_rows()
        return pandas.DataFrame([{k: _NONFINITE.get(v, v) if isinstance(v, str) else v for k, v in r.items()}
                                 for r in rows])


def override_items(overrides: Mapping[str, Any]) -> list[str]:
    """Keyword overrides as `--set` items: `train__lr=0.01` and `{"train.lr": 0.01}` both give
    `train.lr=0.01`. Values keep their type: they are written as JSON, which the config loader
    reads back as YAML (so the string "null" stays a string, and 1e-05 a float)."""
    return [f"{key.replace('__', '.')}={json.dumps(value, default=_plain)}" for key, value in overrides.items()]


def _plain(value: Any) -> Any:
    """A config section object as its dict; a path as its string."""
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not a config value: {value!r}")


def resolve_config(config_or_path: ConfigSource, **overrides: Any) -> ExperimentConfig:
    """The validated config: from a YAML path, a shipped job's name (`quickstart`), a dict of
    sections, or an ExperimentConfig; then `overrides`. Raises ConfigError."""
    items = override_items(overrides)
    if isinstance(config_or_path, ExperimentConfig):
        return validate_config(config_or_path.model_dump(mode="json"), items)
    if isinstance(config_or_path, Mapping):
        return validate_config(json.loads(json.dumps(dict(config_or_path), default=_plain)), items)
    if isinstance(config_or_path, (str, Path)):
        return load_config(str(config_or_path), items)
    raise TypeError(f"config_or_path: a path, a job name, a dict or an ExperimentConfig, not {type(config_or_path)}")


def run(config_or_path: ConfigSource, **overrides: Any) -> Run:
    """Run one experiment in this process and return it when it ends.

    config_or_path: a YAML job file, the name of a job shipped with the package (`quickstart`,
    see `sfl-ray run --list-jobs`), a dict of config sections, or an ExperimentConfig.
    overrides: config keys, `train__lr=0.01` or `**{"train.lr": 0.01}` (as `--set` on the
    command line; values keep their Python type).

    The backend is the config's `cluster.backend`: `ray` joins `cluster.address`, RAY_ADDRESS or
    a Ray already initialised in this process, else starts a local Ray instance and stops it at
    the end; `local` runs everything in this process.

    Raises ConfigError (a bad config, data or model, or a taken run directory: nothing is
    written), the run's own exception if it fails while running (e.g. NonFiniteError or
    ClientFailed; summary.json says `failed`), KeyboardInterrupt (summary.json says
    `interrupted`; `sfl-ray run --resume <dir>` continues it).
    """
    from sfl_ray.run import run_config

    cfg = resolve_config(config_or_path, **overrides)
    summary = run_config(cfg)
    return Run(dir=Path(cfg.run_dir()), config=cfg, summary=summary)


__all__ = ["Run", "run", "resolve_config", "override_items"]
