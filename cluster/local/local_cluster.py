#!/usr/bin/env python
"""A multi-node Ray cluster on one machine, for trying the job path without Kubernetes.

    python cluster/local/local_cluster.py start --workers 2     # a head + 2 workers
    python cluster/local/local_cluster.py status                # nodes, PIDs, dashboard address
    python cluster/local/local_cluster.py status --address      # only the dashboard URL
    python cluster/local/local_cluster.py stop                  # ends exactly what start started

Every node is its own `ray start --block` process in its own process group, with its own
ports, temp dir, CPUs, (declared) GPUs and a custom resource `sfl_node_<i>` (0 = head). The
PIDs, process groups and start times go to a state file; `stop` signals only those groups
and their descendants, never `ray stop` (which ends every Ray process on the machine).
Token authentication is on (RAY_AUTH_MODE=token; with no token around, one is made in
~/.ray/auth_token, mode 0600, and an existing one is tightened to 0600), and the dashboard (the
job API) listens on 127.0.0.1 only. The GCS, raylets and object managers listen on all interfaces: Ray offers no
loopback-only mode for them (it even turns `--node-ip-address=127.0.0.1` into the machine's
address), so on a shared host they are guarded by the token alone; firewall their ports.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

HOST = "127.0.0.1"
DEFAULT_DIR = Path("/tmp/sfl_ray_local")  # short: Ray's unix socket paths live under it
HEAD_PORTS = ("port", "dashboard-port", "ray-client-server-port")
NODE_PORTS = ("node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
              "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port")


@dataclass
class Node:
    """One `ray start --block` process we started."""
    name: str
    pid: int
    pgid: int
    start_ticks: int  # /proc start time: tells our process from a later one with a reused PID
    temp_dir: str
    log: str
    ports: dict[str, int] = field(default_factory=dict)


@dataclass
class State:
    dashboard: str
    gcs: str
    nodes: list[Node]


# ---------------------------------------------------------------- processes (Linux /proc)

def _stat(pid: int) -> Optional[list[str]]:
    """Fields of /proc/<pid>/stat after the command name, or None if there is no such process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return raw[raw.rindex(")") + 2:].split()  # the name may hold spaces and parentheses


def _alive(pid: int, start_ticks: Optional[int] = None) -> bool:
    """Running (zombies count as gone: nobody may reap a re-parented process here)."""
    st = _stat(pid)
    if st is None or st[0] in ("Z", "X"):
        return False
    return start_ticks is None or int(st[19]) == start_ticks


def _all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _group_and_descendants(node: Node) -> set[int]:
    """Live processes of the node's group, plus descendants that made a group of their own."""
    parents: dict[int, int] = {}
    found: set[int] = set()
    for pid in _all_pids():
        st = _stat(pid)
        if st is None or st[0] in ("Z", "X"):
            continue
        parents[pid] = int(st[1])
        if int(st[2]) == node.pgid:
            found.add(pid)
    grew = True
    while grew:  # close over children: Ray's worker processes may leave the group
        extra = {p for p, pp in parents.items() if pp in found and p not in found}
        found |= extra
        grew = bool(extra)
    return found


def _ours(node: Node) -> bool:
    """Is the group still the one we started? While any member of group G lives, Linux does
    not reuse G as a PID, so a live leader with another start time means our group is gone."""
    st = _stat(node.pid)
    if st is not None and st[0] not in ("Z", "X"):
        return int(st[19]) == node.start_ticks
    return True  # leader gone: whatever is left in the group is our orphans


def _signal(pids: set[int], node: Node, sig: int) -> None:
    try:
        os.killpg(node.pgid, sig)
    except ProcessLookupError:
        pass
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _wait_gone(pids: set[int], seconds: float) -> set[int]:
    end = time.monotonic() + seconds
    while time.monotonic() < end and any(_alive(p) for p in pids):
        time.sleep(0.2)
    return {p for p in pids if _alive(p)}


def stop_node(node: Node, grace_s: float = 10.0) -> set[int]:
    """End the node: SIGTERM its `ray start` (which shuts its daemons down in order), then
    SIGTERM and at last SIGKILL whatever of its group and descendants is left.
    Returns every PID it found."""
    if not _ours(node):
        print(f"{node.name}: pid {node.pid} is another process now; nothing of ours to stop")
        return set()
    pids = _group_and_descendants(node)
    if _alive(node.pid, node.start_ticks):
        # Signalling the whole group at once leaves the GCS waiting out its own grace period.
        os.kill(node.pid, signal.SIGTERM)
        _wait_gone(pids, grace_s)
    left = {p for p in pids if _alive(p)} | _group_and_descendants(node)
    for sig, wait_s in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 3.0)):
        if not left:
            break
        _signal(left, node, sig)
        left = _wait_gone(left, wait_s) | _group_and_descendants(node)
        pids |= left
    return pids


# ---------------------------------------------------------------- state file

def _state_path(base: Path) -> Path:
    return base / "state.json"


def save_state(base: Path, state: State) -> None:
    tmp = _state_path(base).with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(state), indent=1))
    os.chmod(tmp, 0o600)
    tmp.replace(_state_path(base))


def load_state(base: Path) -> Optional[State]:
    try:
        raw = json.loads(_state_path(base).read_text())
    except FileNotFoundError:
        return None
    return State(raw["dashboard"], raw["gcs"], [Node(**n) for n in raw["nodes"]])


# ---------------------------------------------------------------- start

def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (held together so none is handed out twice)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind((HOST, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def ray_env() -> dict[str, str]:
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)  # never join whatever cluster the caller's shell points at
    return env


def _launch(name: str, args: list[str], base: Path, ports: dict[str, int]) -> Node:
    temp_dir = base / name
    temp_dir.mkdir(mode=0o700, exist_ok=True)
    log = base / f"{name}.log"
    # --temp-dir per node (Ray 2.60 allows it on workers): each node's sockets and logs apart.
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", f"--temp-dir={temp_dir}",
           "--disable-usage-stats", *[f"--{k}={v}" for k, v in ports.items()], *args]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                env=ray_env(), start_new_session=True)  # its own session and group
    st = _stat(proc.pid)
    return Node(name, proc.pid, os.getpgid(proc.pid), int(st[19]) if st else -1, str(temp_dir), str(log), ports)


def _wait_up(probe, what: str, node: Node, deadline_s: float) -> None:
    """Poll probe() (True once up) while the node's process lives, up to deadline_s."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if not _alive(node.pid, node.start_ticks):
            raise RuntimeError(f"{node.name} exited; see {node.log}")
        if probe():
            return
        time.sleep(0.5)
    raise TimeoutError(f"{what} did not answer within {deadline_s:.0f}s; see {node.log}")


def _tcp_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((HOST, port)) == 0


def _http_answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2)
        return True
    except urllib.error.HTTPError:
        return True  # it answered (401 without a token): it is up
    except OSError:
        return False


def token_file() -> Path:
    return Path.home() / ".ray" / "auth_token"  # Ray's default, shared by `ray job submit`


def ensure_token_file() -> None:
    """`ray start --head` under token auth needs a token but does not make one: make it, 0600
    from the first byte, unless the environment supplies one."""
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return
    path = token_file()
    path.parent.mkdir(mode=0o700, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))  # what Ray's own generator writes


def tighten_token_file() -> None:
    """Ray writes ~/.ray/auth_token world-readable (0644); the token is the cluster's only key."""
    try:
        os.chmod(token_file(), 0o600)
    except FileNotFoundError:
        pass  # the token came from RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH instead
    except PermissionError:
        print(f"warning: cannot chmod 0600 {token_file()} (not ours)", file=sys.stderr)


def alive_nodes(dashboard: str) -> list[dict]:
    """The cluster's ALIVE nodes as the state API sees them (sends the token)."""
    os.environ["RAY_AUTH_MODE"] = "token"
    from ray.util.state import list_nodes

    nodes = list_nodes(address=dashboard, filters=[("state", "=", "ALIVE")], raise_on_missing_output=False)
    return [dataclasses.asdict(n) if dataclasses.is_dataclass(n) else dict(n) for n in nodes]


def wait_for_nodes(state: State, deadline_s: float) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        for node in state.nodes:
            if not _alive(node.pid, node.start_ticks):
                raise RuntimeError(f"{node.name} exited; see {node.log}")
        try:
            if len(alive_nodes(state.dashboard)) >= len(state.nodes):
                return
        except Exception:  # the state API is not up yet
            pass
        time.sleep(1)
    raise TimeoutError(f"not all {len(state.nodes)} nodes joined within {deadline_s:.0f}s")


def start(args: argparse.Namespace) -> int:
    base: Path = args.dir
    old = load_state(base)
    if old and any(_alive(n.pid, n.start_ticks) for n in old.nodes):
        print(f"a cluster from {_state_path(base)} is running; stop it first", file=sys.stderr)
        return 2
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    n_ports = len(HEAD_PORTS) + len(NODE_PORTS) * (1 + args.workers)
    pool = iter(free_ports(n_ports))
    head_ports = {k: next(pool) for k in HEAD_PORTS + NODE_PORTS}
    dashboard = f"http://{HOST}:{head_ports['dashboard-port']}"
    state = State(dashboard, f"{HOST}:{head_ports['port']}", [])
    mem = str(args.object_store_mb * 1024 * 1024)
    ensure_token_file()
    try:
        head = _launch("head", ["--head", "--include-dashboard=true", f"--dashboard-host={HOST}",
                                f"--num-cpus={args.head_cpus}", "--num-gpus=0", f"--object-store-memory={mem}",
                                "--resources=" + json.dumps({"sfl_node_0": 1})], base, head_ports)
        state.nodes.append(head)
        save_state(base, state)  # recorded at once, so `stop` can end a half-started cluster
        # Workers need only the GCS: they start while the head's dashboard is still coming up.
        _wait_up(lambda: _tcp_open(head_ports["port"]), f"GCS {state.gcs}", head, args.timeout)
        tighten_token_file()  # the head is up; whoever wrote the token, it is 0600 from now on
        for i in range(1, args.workers + 1):
            ports = {k: next(pool) for k in NODE_PORTS}
            state.nodes.append(_launch(f"worker{i}", [
                f"--address={state.gcs}", f"--num-cpus={args.worker_cpus}", f"--num-gpus={args.worker_gpus}",
                f"--object-store-memory={mem}", "--resources=" + json.dumps({f"sfl_node_{i}": 1})], base, ports))
            save_state(base, state)
        _wait_up(lambda: _http_answers(f"{dashboard}/api/version"), dashboard, head, args.timeout)
        wait_for_nodes(state, args.timeout)
    except (RuntimeError, TimeoutError) as e:
        print(f"start failed: {e}; stopping what was started", file=sys.stderr)
        stop(args)
        return 1
    print(f"dashboard {dashboard}\ngcs {state.gcs}")
    for n in state.nodes:
        print(f"{n.name} pid={n.pid} pgid={n.pgid} temp_dir={n.temp_dir}")
    return 0


# ---------------------------------------------------------------- stop / status

def stop(args: argparse.Namespace) -> int:
    state = load_state(args.dir)
    if state is None:
        print(f"no state file at {_state_path(args.dir)}: nothing to stop")
        return 0
    for node in reversed(state.nodes):  # workers first, the head (GCS) last
        pids = stop_node(node)
        print(f"{node.name}: stopped {len(pids)} process(es) of group {node.pgid}")
        shutil.rmtree(node.temp_dir, ignore_errors=True)
    _state_path(args.dir).unlink(missing_ok=True)
    return 0


def status(args: argparse.Namespace) -> int:
    state = load_state(args.dir)
    if state is None:
        print(f"no cluster recorded in {_state_path(args.dir)}", file=sys.stderr)
        return 1
    if args.address:
        print(state.dashboard)
        return 0
    print(f"dashboard {state.dashboard}\ngcs {state.gcs}")
    for n in state.nodes:
        print(f"{n.name} pid={n.pid} pgid={n.pgid} {'running' if _alive(n.pid, n.start_ticks) else 'gone'}")
    try:
        for n in alive_nodes(state.dashboard):
            print(f"  ray node {n['node_id'][:12]} {n['state']} resources={n['resources_total']}")
    except Exception as e:  # the processes may be up while the dashboard is not
        print(f"  state API: {e}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=["start", "stop", "status"])
    p.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="state file, logs and node temp dirs")
    p.add_argument("--workers", type=int, default=1, choices=range(0, 65), metavar="N")
    p.add_argument("--head-cpus", type=int, default=1)
    p.add_argument("--worker-cpus", type=int, default=1)
    p.add_argument("--worker-gpus", type=int, default=0, help="declared per worker (may exceed the real ones)")
    p.add_argument("--object-store-mb", type=int, default=200)
    p.add_argument("--timeout", type=float, default=90.0, help="seconds to wait for each step of start")
    p.add_argument("--address", action="store_true", help="status: print only the dashboard URL")
    args = p.parse_args(argv)
    args.dir = args.dir.resolve()
    return {"start": start, "stop": stop, "status": status}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
