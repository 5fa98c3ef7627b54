"""The job path end to end: `ray start --head` on loopback, `ray job submit` of the quickstart.

The head runs in its own process group and only that group is stopped at the end (never
`ray stop`, which would end every Ray process on the machine).
"""

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # starts Ray clusters

REPO = Path(__file__).resolve().parents[1]


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _wait_http(url: str, deadline_s: float) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return  # it answered (e.g. 401 without a token): it is up
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"{url} did not come up within {deadline_s}s")


def _token_env(tmp_path: Path) -> dict:
    """Token authentication on, with a token of this test's own. Ray 2.60's `ray start` turns
    it on only when RAY_AUTH_MODE=token is set or a token already exists (it makes none), and
    ~/.ray/auth_token belongs to the user: a fresh machine has none, and a test must not make
    or read one there."""
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    for key in ("RAY_ADDRESS", "RAY_AUTH_TOKEN"):
        env.pop(key, None)
    return env


@pytest.fixture
def ray_head(tmp_path):
    gcs, dash, client, agent, agent_grpc, env_agent, metrics = _free_ports(7)
    temp = tempfile.mkdtemp(prefix="sflr", dir="/tmp")  # short: unix socket paths are limited
    log = open(tmp_path / "head.log", "w")
    env = _token_env(tmp_path)
    head = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={gcs}", "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
         f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={env_agent}",
         f"--metrics-export-port={metrics}", "--num-cpus=2", f"--temp-dir={temp}"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    try:
        _wait_http(f"http://127.0.0.1:{dash}/api/version", 120)
        yield f"http://127.0.0.1:{dash}", env
    finally:
        try:
            os.killpg(head.pid, signal.SIGTERM)
            head.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(head.pid, signal.SIGKILL)
        log.close()


def test_quickstart_succeeds_under_ray_job_submit(ray_head, tmp_path):
    address, env = ray_head
    # Token authentication is on: the job API refuses a request that carries no token.
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{address}/api/jobs/", timeout=10)
    assert refused.value.code in (401, 403)
    out_dir = tmp_path / "out"
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "job", "submit", "--address", address,
           "--working-dir", str(REPO), "--runtime-env-json", json.dumps({"excludes": [".git", "runs", "tests"]}),
           "--", "python", "-m", "sfl_ray.run", "--config", "jobs/quickstart.yaml",
           "--set", "stop.rounds=2", "--set", f"output.dir={out_dir}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "succeeded" in (proc.stdout + proc.stderr).lower()
    rows = [json.loads(line) for line in (out_dir / "quickstart" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["algorithm"] == "splitfed_v2" and r["bytes_up"] > 0 for r in rows)
    assert "round 2/" in proc.stdout  # the driver's progress reached the submitter
