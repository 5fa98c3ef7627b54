"""The Python API `sfl_ray.run(config_or_path, **overrides) -> Run`: callable whatever was imported
first, the same code path and numbers as the command line, errors as exceptions."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

import sfl_ray
from sfl_ray.api import Run, override_items, resolve_config
from sfl_ray.config import load_config
from sfl_ray.config_base import ConfigError

ROOT = Path(__file__).resolve().parents[1]
TINY = {"cluster.backend": "local", "stop.rounds": 2, "stop.target_metric": None, "data.max_train_samples": 200,
        "data.max_test_samples": 100, "train.num_clients": 2, "output.progress": False, "output.checkpoint_every": 0}


@pytest.mark.parametrize("first", [
    "import sfl_ray",
    "from sfl_ray.run import main; import sfl_ray",
    "import sfl_ray.run",
    "import sfl_ray.api, sfl_ray",
])
def test_sfl_ray_run_is_callable_whatever_was_imported_first(first):
    """A fresh interpreter: the package attribute `run` is also the submodule `sfl_ray.run`;
    calling it must reach the API (a bad config raises ConfigError, no job is run)."""
    code = f"""{first}
import sfl_ray, sfl_ray.run as module
from sfl_ray import run
from sfl_ray.config_base import ConfigError
assert sfl_ray.run is module is run and callable(run)
assert module.main is not None
try:
    sfl_ray.run({{"train": {{"lr": -1}}}})
except ConfigError as err:
    print(err)
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "config error: train.lr=-1: must be > 0"


def test_the_api_run_equals_the_cli_run(tmp_path):
    from sfl_ray.run import main

    run = sfl_ray.run("quickstart", **TINY, output__dir=str(tmp_path), output__name="api")
    assert isinstance(run, Run) and run.dir == tmp_path / "api"
    assert main(["--config", "jobs/quickstart.yaml", *[a for k, v in TINY.items()
                                                       for a in ("--set", f"{k}={json.dumps(v)}")],
                 "--set", f"output.dir={tmp_path}", "--set", "output.name=cli"]) == 0

    def rows(name):
        return [{k: v for k, v in json.loads(x).items() if k != "wall_s"}
                for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    assert rows("api") == rows("cli") and len(rows("api")) == 2  # one code path, the same numbers
    assert run.summary == json.loads((run.dir / "summary.json").read_text())
    assert run.config == load_config(str(run.dir / "config.yaml"))
    assert run.config.train.num_clients == 2 and run.config.stop.target_metric is None
    frame = run.rows
    assert list(frame["round"]) == [1, 2]
    assert list(frame["eval_accuracy"]) == [r["eval_accuracy"] for r in rows("api")]


def test_overrides_both_spellings_and_every_kind_of_source(tmp_path):
    a = resolve_config("quickstart", train__lr=0.01, algorithm__name="fedavg")
    b = resolve_config("jobs/quickstart.yaml", **{"train.lr": 0.01, "algorithm.name": "fedavg"})
    assert a == b and a.train.lr == 0.01 and a.algorithm.name == "fedavg"
    assert resolve_config(a, seed=3) == a.model_copy(update={"seed": 3})  # an ExperimentConfig, overridden
    d = resolve_config({"train": {"lr": 0.2}, "model": a.model}, stop__rounds=2)  # a dict, sections as objects
    assert (d.train.lr, d.stop.rounds, d.model) == (0.2, 2, a.model)
    # Values keep their Python type: the string "null" is a name, None is null, a list a list.
    c = resolve_config("quickstart", output__name="null", stop__target_metric=None,
                       model__name="gpt2", model__lora={"r": 4, "target_modules": ["c_attn"]})
    assert c.output.name == "null" and c.stop.target_metric is None and c.model.lora.r == 4
    assert override_items({"train__lr": 1e-05}) == ["train.lr=1e-05"]
    with pytest.raises(TypeError):
        resolve_config(42)


def test_errors_are_exceptions_and_a_bad_config_writes_nothing(tmp_path):
    with pytest.raises(ConfigError, match="train.lr=-0.1"):
        sfl_ray.run("quickstart", **TINY, train__lr=-0.1, output__dir=str(tmp_path))
    with pytest.raises(ConfigError, match="data.path='./no/such/folder'"):
        sfl_ray.run("quickstart", **TINY, data__path="./no/such/folder", output__dir=str(tmp_path))
    assert not any(tmp_path.iterdir())
    with pytest.raises(Exception, match="non-finite") as failure:  # a run that diverges raises its error
        sfl_ray.run("quickstart", **TINY, train__lr=1e20, output__dir=str(tmp_path), output__name="nan")
    assert not isinstance(failure.value, SystemExit)
    summary = json.loads((tmp_path / "nan" / "summary.json").read_text())
    assert summary["stop_reason"] == "failed" and "non-finite" in summary["error"]


def test_rows_turn_the_files_nonfinite_strings_into_floats(tmp_path):
    from sfl_ray.metrics.writer import RunWriter

    cfg = load_config("quickstart", [f"output.dir={tmp_path}", "output.name=r"])
    RunWriter(cfg.run_dir()).append_row({"round": 1, "train_loss": float("nan"), "eval_loss": float("inf"),
                                         "phase": "train"})
    frame = Run(dir=Path(cfg.run_dir()), config=cfg, summary={}).rows
    assert math.isnan(frame["train_loss"][0]) and frame["eval_loss"][0] == math.inf and frame["phase"][0] == "train"
