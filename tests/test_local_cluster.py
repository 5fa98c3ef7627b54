"""cluster/local/local_cluster.py end to end: a head and a worker as separate `ray start`
process groups, a tiny quickstart job through `ray job submit` with the token, then `stop`
ends exactly the processes `start` made (never `ray stop`)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "cluster" / "local" / "local_cluster.py"
TINY = ["data.max_train_samples=400", "data.max_test_samples=200", "train.num_clients=2",
        "train.clients_per_round=2", "stop.rounds=1", "cluster.num_pools=1", "output.progress=false"]


def _env() -> dict[str, str]:
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    return env


def _script(base: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args, "--dir", str(base)], env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def _ray(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ray.scripts.scripts", *args], env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def _processes_of(pgids: set[int]) -> set[int]:
    """Every live process in these process groups (read from /proc, not from the script)."""
    out = set()
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) in pgids:
            out.add(int(p))
    return out


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _module():
    spec = importlib.util.spec_from_file_location("local_cluster", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["local_cluster"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_token_file_is_made_0600_or_tightened(tmp_path, monkeypatch):
    lc = _module()
    monkeypatch.setenv("HOME", str(tmp_path))
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    lc.ensure_token_file()
    token = tmp_path / ".ray" / "auth_token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and re.fullmatch(r"[0-9a-f]{64}", token.read_text())
    first = token.read_text()
    lc.ensure_token_file()  # an existing token is kept: the cluster may be using it
    assert token.read_text() == first
    token.chmod(0o644)  # as Ray writes it
    lc.tighten_token_file()
    assert stat.S_IMODE(token.stat().st_mode) == 0o600


@pytest.fixture
def base():
    d = Path(tempfile.mkdtemp(prefix="sflc", dir="/tmp"))  # short: Ray's socket paths live under it
    yield d
    _script(d, "stop")  # a no-op when the test stopped it; ends a half-run cluster otherwise
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.slow
def test_head_and_worker_run_a_job_and_stop_ends_exactly_them(base):
    t0 = time.monotonic()
    started = _script(base, "start", "--workers", "1", "--worker-gpus", "1")
    assert started.returncode == 0, started.stdout + started.stderr
    t_start = time.monotonic() - t0
    state = json.loads((base / "state.json").read_text())
    dashboard = state["dashboard"]
    assert dashboard.startswith("http://127.0.0.1:")
    pgids = {n["pgid"] for n in state["nodes"]}
    assert len(pgids) == 2 and all(n["pid"] == n["pgid"] for n in state["nodes"])  # one group per node
    assert stat.S_IMODE((Path.home() / ".ray" / "auth_token").stat().st_mode) == 0o600

    nodes = json.loads(_ray("list", "nodes", "--address", dashboard, "--format", "json").stdout)
    assert sorted(n["state"] for n in nodes) == ["ALIVE", "ALIVE"]
    by_role = {n["is_head_node"]: n["resources_total"] for n in nodes}
    assert by_role[True]["sfl_node_0"] == 1 and "GPU" not in by_role[True]
    assert by_role[False]["sfl_node_1"] == 1 and by_role[False]["GPU"] == 1

    out_dir = base / "out"
    sid = f"sflc-{uuid.uuid4().hex[:8]}"
    t1 = time.monotonic()
    job = _ray("job", "submit", "--address", dashboard, "--submission-id", sid, "--working-dir", str(REPO),
               "--runtime-env-json", json.dumps({"excludes": [".git", "runs", "tests"]}), "--",
               "python", "-m", "sfl_ray.run", "--config", "jobs/quickstart.yaml",
               *[a for kv in TINY + [f"output.dir={out_dir}"] for a in ("--set", kv)], timeout=300)
    t_job = time.monotonic() - t1
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert f"Job '{sid}' succeeded" in _ray("job", "status", "--address", dashboard, sid).stdout
    rows = [json.loads(x) for x in (out_dir / "quickstart" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1]
    # 1 CPU per node, a pool and a server block of 1 CPU each: the job needed both nodes
    actors = json.loads(_ray("list", "actors", "--address", dashboard, "--detail", "--format", "json").stdout)
    placed = {a["class_name"]: a["node_id"] for a in actors if a["class_name"] in ("ChannelClientPool", "ChannelServerBlock")}
    assert set(placed.values()) == {n["node_id"] for n in nodes}

    ours = _processes_of(pgids)
    assert {n["pid"] for n in state["nodes"]} <= ours
    t2 = time.monotonic()
    stopped = _script(base, "stop")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    end = time.monotonic() + 15  # a killed process may stay a zombie until init reaps it
    while time.monotonic() < end and any(_running(p) for p in ours):
        time.sleep(0.2)
    assert not [p for p in ours if _running(p)]
    assert not _processes_of(pgids)
    assert not (base / "state.json").exists()
    print(f"timings: start {t_start:.1f}s, job {t_job:.1f}s, stop {time.monotonic() - t2:.1f}s, "
          f"total {time.monotonic() - t0:.1f}s")
