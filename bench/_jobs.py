"""What the bench scripts share: run a job with overrides on the package's own code path and
read back its rows. Run the scripts from the repository root (they read jobs/*.yaml)."""

from __future__ import annotations

import json
import os
import statistics
from typing import Sequence

from sfl_ray.config import load_config
from sfl_ray.run import prepare
from sfl_ray.runtime.launch import run_experiment


def run_job(job: str, out: str, name: str, overrides: Sequence[str]) -> tuple[list[dict], dict]:
    """Run `jobs/<job>.yaml` with overrides in `out/<name>`; returns (rows, summary)."""
    cfg = load_config(os.path.join("jobs", f"{job}.yaml"), [
        *overrides, f"output.dir={out}", f"output.name={name}", "output.progress=false",
        "output.checkpoint_every=0", "output.overwrite=true"])
    algorithm_cls, data, shards, _ = prepare(cfg)
    summary = run_experiment(algorithm_cls, cfg, data, shards)
    with open(os.path.join(cfg.run_dir(), "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return rows, summary


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def start_local_ray() -> None:
    import ray
    ray.init(address="local", include_dashboard=False, logging_level="WARNING", log_to_driver=False)
