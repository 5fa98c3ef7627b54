"""`sfl-ray sweep`: a grid x seeds as Ray Tune trials, one whole experiment per trial.

A two-point sweep runs through Ray Tune (its experiment state on disk, both trials side by side on
2 CPUs) and each trial's metrics.jsonl is the one a direct `python -m sfl_ray.run` of the same
settings writes; a sweep stopped by SIGINT resumes with the same command: the finished trial is
not run again and the interrupted one continues from its checkpoint to the uninterrupted rows.
A Ray-backend trial whose placement group holds every CPU of the cluster finishes, so its pools,
server block and coordinator ran inside the group. Bad input: one line, exit 2, nothing written.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sfl_ray.run import main as run_main
from sfl_ray.sweep import main as sweep_main, split_values, trial_bundles, trial_name

ROOT = Path(__file__).resolve().parents[1]
POINTS = ("0.1", "1")  # the grid: partition.alpha
NAMES = [f"partition.alpha={a}-s0" for a in POINTS]
SETTINGS = ["data.max_train_samples=800", "data.max_test_samples=300", "train.num_clients=4",
            "train.clients_per_round=4", "stop.rounds=5", "stop.target_metric=null", "output.progress=false"]


def _sets(*extra: str) -> list[str]:
    return [a for s in (*SETTINGS, *extra) for a in ("--set", s)]


def _sweep_cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "sfl_ray.sweep", "--config", "jobs/quickstart.yaml",
            "--grid", f"partition.alpha={','.join(POINTS)}", *_sets("cluster.backend=local"), "--out", str(out), *extra]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _rows(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "wall_s"}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def direct(tmp_path_factory) -> dict:
    """Each grid point run directly with `python -m sfl_ray.run` (local backend): its rows."""
    out = tmp_path_factory.mktemp("direct")
    rows = {}
    for alpha, name in zip(POINTS, NAMES):
        assert run_main(["--config", "jobs/quickstart.yaml", *_sets("cluster.backend=local", f"partition.alpha={alpha}",
                                                                   f"output.dir={out}", f"output.name={name}")]) == 0
        rows[name] = _rows(out / name)
    assert rows[NAMES[0]] != rows[NAMES[1]]  # the grid point matters: a mix-up of trials would show
    return rows


@pytest.mark.slow
def test_a_two_point_sweep_runs_through_tune_and_matches_direct_runs(tmp_path, direct):
    from ray.tune import ExperimentAnalysis

    out = tmp_path / "sweep"
    t0 = time.time()
    proc = subprocess.run(_sweep_cmd(out), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    took = time.time() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in NAMES:
        assert _rows(out / name) == direct[name], name
        assert json.loads((out / name / "summary.json").read_text())["stop_reason"] == "rounds"
    # Tune's own experiment state: both trials, finished, reporting every round and then the summary.
    analysis = ExperimentAnalysis(str(out / "tune"))
    assert sorted(t.config["run"] for t in analysis.trials) == sorted(NAMES)
    assert {t.status for t in analysis.trials} == {"TERMINATED"}
    for t in analysis.trials:
        reported = [r["round"] for r in map(json.loads, (out / "tune" / t.config["run"] / "result.json")
                                            .read_text().splitlines()) if not r.get("sweep_final")]
        assert reported == [1, 2, 3, 4, 5]
    # One CPU bundle per local-backend trial, two CPUs: Tune ran them side by side.
    lines = proc.stdout.splitlines()
    started = [i for i, line in enumerate(lines) if line.startswith("sweep: started ")]
    finished = [i for i, line in enumerate(lines) if line.startswith("sweep: finished ")]
    assert len(started) == 2 and len(finished) == 2 and max(started) < min(finished), proc.stdout
    report = Path(next(line for line in lines if line.startswith("sweep: report: ")).split(": ", 2)[2])
    assert report.parent == out and report.name == "report.md" and report.is_file()
    assert (out / "report.html").is_file() and (out / "plots" / "metric_vs_gib.png").is_file()
    assert all(f"| {name} |" in (out / "report.md").read_text() for name in NAMES)  # a row per trial
    print(f"two-point sweep: {took:.1f} s")


@pytest.mark.slow
def test_an_interrupted_sweep_resumes_without_rerunning_finished_trials(tmp_path, direct):
    out = tmp_path / "sweep"
    cmd = _sweep_cmd(out, "--max-concurrent", "1")  # one after the other: one finished, one mid-way
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own process group, as a terminal's Ctrl-C reaches
    first = second = None
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            done = [n for n in NAMES if (out / n / "summary.json").exists()]
            if len(done) == 1:
                first, second = done[0], next(n for n in NAMES if n not in done)
                manifest = out / second / "checkpoints" / "manifest.json"
                if manifest.exists() and json.loads(manifest.read_text())["checkpoints"]:
                    os.killpg(proc.pid, signal.SIGINT)
                    break
            time.sleep(0.05)
        stdout, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, stdout[-3000:]
    assert len(_rows(out / second)) < 5 and not (out / second / "summary.json").exists()  # really stopped mid-way
    kept = {p: os.stat(out / first / p) for p in ("metrics.jsonl", "summary.json")}

    # Continued, and stopped once more, now by SIGTERM to the sweep alone (as `kill` does) as soon
    # as the trial is back: Ray's own SIGTERM handler must not take it.
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    try:
        for line in proc.stdout:
            if line.startswith("sweep: started "):
                proc.send_signal(signal.SIGTERM)
                break
        stdout2, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143, stdout2[-3000:]
    assert line == f"sweep: started {second}\n"  # only the unfinished trial was started again

    again = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    for p, st in kept.items():  # the finished trial was not run again
        now = os.stat(out / first / p)
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns), p
    assert f"sweep: started {first}" not in again.stdout
    assert f"sweep: {second} round 1:" not in again.stdout  # continued from its checkpoint, not from round 1
    for name in NAMES:
        assert _rows(out / name) == direct[name], name


@pytest.mark.slow
def test_a_ray_trial_runs_inside_its_placement_group(tmp_path, ray_cluster, direct):
    """The trial reserves the whole cluster (driver 1 + 2 pools + 1 server block = 4 CPUs): had a
    pool, the server block or the coordinator been placed outside its group, it could not start."""
    import ray

    assert ray.cluster_resources()["CPU"] == 4
    code = sweep_main(["--config", "jobs/quickstart.yaml", "--grid", "partition.alpha=0.1",
                       *_sets("cluster.backend=ray", "cluster.num_pools=2", "cluster.task_timeout_s=60"),
                       "--out", str(tmp_path / "sweep")])
    assert code == 0
    assert _rows(tmp_path / "sweep" / NAMES[0]) == direct[NAMES[0]]  # same numbers as the local backend


@pytest.mark.parametrize("grid, says", [
    (["partition.alfa=0.1,1"], "partition.alfa"),
    (["partition.alpha=0.1,-1"], "partition.alpha"),
    (["train.lr"], "--grid"),
    (["output.name=a,b"], "output.name"),
    (["algorithm.name=fedavg,nope"], "algorithm.name"),
])
def test_bad_grid_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, grid, says):
    out = tmp_path / "sweep"
    args = ["--config", "jobs/quickstart.yaml", *[a for g in grid for a in ("--grid", g)], *_sets(), "--out", str(out)]
    assert sweep_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0], err
    assert list(tmp_path.iterdir()) == []


def test_a_folder_holding_something_else_is_refused(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert sweep_main(["--config", "jobs/quickstart.yaml", "--grid", "partition.alpha=0.1,1", *_sets(),
                       "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds no sweep" in err[0], err
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_trial_names_are_plain_distinct_folder_names():
    from sfl_ray.config import OutputConfig

    names = [trial_name({"data.path": "/data/a"}, 0), trial_name({"data.path": "/data_a"}, 0),
             trial_name({"data.path": "../x"}, 1), trial_name({"k": "v" * 300}, 2), trial_name({}, 3)]
    assert len(set(names)) == len(names)
    for n in names:
        OutputConfig(name=n)  # the config's own rule for a run directory name
        assert len(n) <= 120
    assert trial_name({"algorithm.name": "fedavg", "partition.alpha": "0.1"}, 0) == \
        "algorithm.name=fedavg,partition.alpha=0.1-s0"
    assert split_values("a, b,[1,2],{x: 1, y: 2}") == ["a", "b", "[1,2]", "{x: 1, y: 2}"]


def test_trial_bundles_hold_what_the_experiment_starts():
    from sfl_ray.algorithms import get_algorithm
    from sfl_ray.config import load_config
    from sfl_ray.config_base import ConfigError

    cfg = load_config(None, ["algorithm.name=splitfed_v2", "cluster.pool_cpus=2", "cluster.client_gpus=0.5",
                             "cluster.server_gpus=1", "train.num_clients=10"])
    bundles, pools = trial_bundles(cfg, get_algorithm("splitfed_v2"), 10, {"CPU": 8.0, "GPU": 2.0})
    # num_pools unset: fit the cluster minus the driver's CPU and the server block (7 CPUs / 2, 1 GPU / 0.5)
    assert pools == 2
    assert bundles == [{"CPU": 1.0}, {"CPU": 2.0, "GPU": 0.5}, {"CPU": 2.0, "GPU": 0.5}, {"CPU": 1.0, "GPU": 1.0}]
    fedavg = load_config(None, ["algorithm.name=fedavg", "cluster.num_pools=2", "cluster.pool_cpus=0.5"])
    assert trial_bundles(fedavg, get_algorithm("fedavg"), 10, {"CPU": 2.0})[0] == [{"CPU": 1.0}] + [{"CPU": 0.5}] * 2
    in_pool = load_config(None, ["algorithm.name=splitfed_v2", "cluster.exchange=in_pool", "cluster.num_servers=2",
                                 "cluster.client_gpus=0.5", "cluster.server_gpus=1"])
    # a pool per server block, each holding its block's GPU: what start_actors asks for
    assert trial_bundles(in_pool, get_algorithm("splitfed_v2"), 10, {"CPU": 8.0, "GPU": 2.0}) == (
        [{"CPU": 1.0}] + [{"CPU": 1.0, "GPU": 1.0}] * 2, 2)
    local = load_config(None, ["cluster.backend=local", "cluster.torch_threads=2"])
    assert trial_bundles(local, get_algorithm("splitfed_v2"), 10, {"CPU": 2.0}) == ([{"CPU": 2.0}], None)
    with pytest.raises(ConfigError, match="one trial needs 3 CPU"):
        trial_bundles(load_config(None, ["cluster.num_pools=1"]), get_algorithm("splitfed_v2"), 10, {"CPU": 2.0})
