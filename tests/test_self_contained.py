"""Nothing in the repository refers to files outside it, and data a user must fetch is asked for in
one line (exit 2) that says how, quickly, even when the Hub cannot be reached."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sfl_ray.run import main

ROOT = Path(__file__).resolve().parents[1]
# The shared folder beside the repository, an absolute path of the machine this was written on, or
# a climb out of tests/ (spelt so that this file does not match itself)
OUTSIDE = re.compile(rb"\.\./shared|" + re.escape(b"/" + b"work/") + rb"|parents\[[2-9]\]")
TINY = ["--set", "cluster.backend=local", "--set", "stop.rounds=1", "--set", "output.progress=false"]


def test_no_file_refers_outside_the_repository():
    skip = {".git", "runs", "__pycache__", ".pytest_cache"}
    found = []
    for path in ROOT.rglob("*"):
        if path.is_file() and not skip.intersection(path.relative_to(ROOT).parts) and ".egg-info" not in str(path):
            found += [f"{path.relative_to(ROOT)}: {m.group().decode()}" for m in OUTSIDE.finditer(path.read_bytes())]
    assert not found


@pytest.mark.parametrize("overrides, needle", [
    (["data.name=e2e", "model.name=gpt2", "data.path=./no/e2e"], "data.path='./no/e2e'"),
    (["data.name=hf", "data.path=./no/images"], "data.path='./no/images'"),
    (["data.name=cifar10"], "--set data.path="),  # no path at all: how to give one
    (["data.name=hf"], "--set data.path="),
])
def test_missing_data_is_one_line_exit_2(tmp_path, capsys, overrides, needle):
    args = ["--config", "quickstart", *TINY, "--set", f"output.dir={tmp_path}"]
    assert main(args + [a for o in overrides for a in ("--set", o)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and "Traceback" not in err[0], err
    assert not any(tmp_path.iterdir())


def test_an_unreachable_hub_name_fails_fast_in_one_line(tmp_path):
    """No HF_HUB_OFFLINE: the libraries would retry for half a minute and print a screen of
    warnings; the probe sends the call to the cache at once. (With network, the Hub answers
    that there is no such repository: also one line, also quick.)"""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE",
                                                            "TRANSFORMERS_OFFLINE")}
    env["PYTHONPATH"] = str(ROOT)
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "sfl_ray.run", "--config", "quickstart", *TINY,
                          "--set", f"output.dir={tmp_path}", "--set", "data.path=nobody-sfl/no_such_dataset"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    elapsed = time.monotonic() - start
    err = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(err) == 1, out.stderr[-3000:]
    assert "data.path='nobody-sfl/no_such_dataset'" in err[0]
    assert elapsed < 25, elapsed
