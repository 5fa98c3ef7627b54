"""Checkpoint and resume: a driver killed after round r, resumed with --resume, ends with the
same metrics.jsonl as an uninterrupted run (Adam, an aux algorithm with server state), on the
local and the Ray backend; SIGTERM stops cleanly (exit 143, summary 'interrupted', checkpoint
kept); a corrupt checkpoint is refused, the previous one offered; nothing is unpickled."""

from __future__ import annotations

import io
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sfl_ray.run import main

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--set", "data.max_train_samples=600", "--set", "data.max_test_samples=200", "--set", "train.num_clients=4",
        "--set", "train.clients_per_round=3", "--set", "stop.target_metric=null", "--set", "train.optimizer=adam",
        "--set", "train.lr=0.003", "--set", "output.progress=false", "--set", "algorithm.name=fsl_sage",
        "--set", "algorithm.align_every=2", "--set", "algorithm.align_epochs=3", "--set", "stop.rounds=4"]


def _rows(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "wall_s"}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "sfl_ray.run", "--config", "jobs/quickstart.yaml", *TINY, *args]


def _kill_after_checkpoint(cmd: list[str], run: Path, rnd: int, sig: int) -> int:
    """Start the driver, send `sig` once the checkpoint of round `rnd` is in the manifest."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    manifest = run / "checkpoints" / "manifest.json"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if manifest.exists() and any(e["round"] >= rnd for e in json.loads(manifest.read_text())["checkpoints"]):
            proc.send_signal(sig)
            break
        time.sleep(0.05)
    try:
        return proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.slow
def test_killed_driver_resumes_to_the_same_metrics_local(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    common = ["--set", "cluster.backend=local", "--set", f"output.dir={tmp_path}"]
    assert main(["--config", "jobs/quickstart.yaml", *TINY, *common, "--set", "output.name=full"]) == 0
    code = _kill_after_checkpoint(_cli(*common, "--set", "output.name=part"), part, 2, signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert len(_rows(part)) < 4  # it really stopped early
    assert main(["--resume", str(part)]) == 0
    assert _rows(part) == _rows(full)
    summary = json.loads((part / "summary.json").read_text())
    assert summary["stop_reason"] == "rounds" and summary["rounds"] == 4


@pytest.mark.slow
def test_killed_driver_resumes_to_the_same_metrics_on_ray(tmp_path, ray_cluster):
    address = ray_cluster["cluster"].address
    full, part = tmp_path / "full", tmp_path / "part"
    common = ["--set", "cluster.backend=ray", "--set", f"cluster.address={address}", "--set", f"output.dir={tmp_path}",
              "--set", "cluster.num_pools=2"]
    assert main(["--config", "jobs/quickstart.yaml", *TINY, *common, "--set", "output.name=full"]) == 0
    code = _kill_after_checkpoint(_cli(*common, "--set", "output.name=part"), part, 2, signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert main(["--resume", str(part), "--set", f"cluster.address={address}"]) == 0
    assert _rows(part) == _rows(full)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["local", "ray"])  # ray.init installs a SIGTERM handler of its own
def test_sigterm_stops_cleanly_and_keeps_the_checkpoint(tmp_path, backend):
    run = tmp_path / "run"
    code = _kill_after_checkpoint(_cli("--set", f"cluster.backend={backend}", "--set", f"output.dir={tmp_path}",
                                       "--set", "output.name=run", "--set", "stop.rounds=50"), run, 1, signal.SIGTERM)
    assert code == 143
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stop_reason"] == "interrupted" and summary["error"] == "SIGTERM"
    assert summary["last_checkpoint_round"] >= 1 and summary["rounds"] >= summary["last_checkpoint_round"]


def _two_checkpoints(tmp_path) -> Path:
    assert main(["--config", "jobs/quickstart.yaml", *TINY, "--set", "cluster.backend=local",
                 "--set", f"output.dir={tmp_path}", "--set", "output.name=run", "--set", "stop.rounds=2",
                 "--set", "train.num_clients=2", "--set", "train.clients_per_round=2"]) == 0
    summary = tmp_path / "run" / "summary.json"
    summary.write_text(json.dumps({"stop_reason": "interrupted"}))  # as if stopped: resumable
    return tmp_path / "run"


def test_a_corrupt_checkpoint_is_refused_and_the_previous_offered(tmp_path, capsys):
    run = _two_checkpoints(tmp_path)
    newest = run / "checkpoints" / "round-000002.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated
    assert main(["--resume", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "corrupt or truncated" in err[0] and "--resume-round 1" in err[0], err
    assert main(["--resume", str(run), "--resume-round", "1"]) == 0  # continues from round 1
    assert [r["round"] for r in _rows(run)] == [1, 2]


def test_loading_never_unpickles_code(tmp_path, capsys):
    """A checkpoint file that would run code when unpickled, with a matching checksum, is refused."""
    import hashlib

    run = _two_checkpoints(tmp_path)

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path}/pwned",))

    data = io.BytesIO()
    pickle.dump({"format": 1, "round": 2, "x": Evil()}, data)
    blob = data.getvalue()
    (run / "checkpoints" / "round-000002.pt").write_bytes(blob)
    manifest = run / "checkpoints" / "manifest.json"
    m = json.loads(manifest.read_text())
    m["checkpoints"][-1].update(bytes=len(blob), sha256=hashlib.sha256(blob).hexdigest())
    manifest.write_text(json.dumps(m))
    assert main(["--resume", str(run)]) == 2
    assert "cannot be read" in capsys.readouterr().err
    assert not (tmp_path / "pwned").exists()


def test_a_finished_run_is_not_resumed_and_experiment_keys_are_fixed(tmp_path, capsys):
    assert main(["--config", "jobs/quickstart.yaml", *TINY, "--set", "cluster.backend=local",
                 "--set", f"output.dir={tmp_path}", "--set", "output.name=run", "--set", "stop.rounds=1"]) == 0
    assert main(["--resume", str(tmp_path / "run")]) == 2
    assert "has finished" in capsys.readouterr().err
    assert main(["--resume", str(tmp_path / "run"), "--set", "train.lr=0.1"]) == 2
    assert "keeps its experiment" in capsys.readouterr().err


def test_checkpoints_hold_the_optimizer_moments_and_keep_the_newest(tmp_path):
    import torch

    from sfl_ray.metrics.writer import RunWriter
    from sfl_ray.runtime.checkpoint import Checkpointer

    assert main(["--config", "jobs/quickstart.yaml", *TINY, "--set", "cluster.backend=local",
                 "--set", f"output.dir={tmp_path}", "--set", "output.name=run", "--set", "stop.rounds=3",
                 "--set", "output.keep_checkpoints=2"]) == 0
    ck = Checkpointer(RunWriter(str(tmp_path / "run")))
    assert ck.rounds() == [2, 3]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("*.pt")) == ["round-000002.pt",
                                                                                        "round-000003.pt"]
    state = ck.load()
    client = next(iter(state["clients"].values()))
    _, opt = client["optim/device"]
    moments = next(iter(opt["state"].values()))
    assert int(moments["step"]) > 0 and torch.count_nonzero(moments["exp_avg_sq"]) > 0
    assert "aux_weights" in client  # FSL-SAGE's estimator is client state too
    server = state["servers"][0]
    assert set(server["aux"]) == {0, 1, 2, 3} and "__optim__" in server["opt"]
    assert oct((tmp_path / "run" / "checkpoints" / "round-000003.pt").stat().st_mode & 0o777) == "0o600"


def test_a_nan_in_round_2_exits_1_and_keeps_the_round_1_checkpoint(tmp_path, monkeypatch, caplog):
    from sfl_ray.algorithms.splitfed_v2 import SplitFedV2

    real = SplitFedV2.client_program

    def diverge(self, ctx, down):
        up, info = real(self, ctx, down)
        if ctx.round == 2:
            info["loss_sum"] = float("nan")
        return up, info

    monkeypatch.setattr(SplitFedV2, "client_program", diverge)
    sfl2 = [a for a in TINY if not a.startswith("algorithm.")]
    sfl2 = [a for i, a in enumerate(sfl2) if not (a == "--set" and i + 1 < len(sfl2) and sfl2[i + 1] == "--set")]
    code = main(["--config", "jobs/quickstart.yaml", *sfl2, "--set", "algorithm.name=splitfed_v2",
                 "--set", "cluster.backend=local", "--set", f"output.dir={tmp_path}", "--set", "output.name=run"])
    assert code == 1
    failed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("run failed")]
    assert failed and "round 2" in failed[0] and "non-finite train loss" in failed[0], failed
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stop_reason"] == "failed" and summary["last_checkpoint_round"] == 1
    assert "round 2" in summary["error"]
    monkeypatch.setattr(SplitFedV2, "client_program", real)
    assert main(["--resume", str(run)]) == 0  # the last good checkpoint carries on


def test_a_signal_surfacing_through_a_c_extension_is_still_an_interruption(tmp_path, monkeypatch):
    """SIGTERM's handler raising while Ray's Cython code runs comes out as a SystemError caused by
    the handler's exception (CI saw exit 1 and `failed` this way): the run still exits 143 and
    says `interrupted`."""
    from sfl_ray.run import Interrupted, signal_behind
    from sfl_ray.runtime import launch

    def wait_interrupted(*args, **kwargs):
        try:
            raise Interrupted()
        except Interrupted as sig:
            raise SystemError("<cyfunction CoreWorker.wait> returned a result with an exception set") from sig

    monkeypatch.setattr(launch, "run_experiment", wait_interrupted)
    code = main(["--config", "jobs/quickstart.yaml", *TINY, "--set", "cluster.backend=local",
                 "--set", f"output.dir={tmp_path}", "--set", "output.name=run"])
    assert code == 143
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stop_reason"] == "interrupted" and summary["error"] == "SIGTERM"
    # and a failure that is just a failure stays one, also one raised while handling another
    assert signal_behind(RuntimeError("boom")) is None
    try:
        try:
            raise ValueError("first")
        except ValueError:
            raise RuntimeError("second")
    except RuntimeError as err:
        assert signal_behind(err) is None
    try:
        try:
            raise KeyboardInterrupt()
        except KeyboardInterrupt:
            raise RuntimeError("while stopping")
    except RuntimeError as err:
        assert isinstance(signal_behind(err), KeyboardInterrupt)
