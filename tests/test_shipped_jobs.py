"""Every job shipped with the package runs: one round at a tiny scale, through the command line's
own entry point, keeping the job's algorithm, model, cut and kind of data. Jobs whose data a user
fetches (CIFAR-10) get a tiny synthetic copy in the layout their header describes; jobs that name
a Hub data set run on the slice built into the package (no network here)."""

from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest

from sfl_ray.config import load_config
from sfl_ray.job_files import JOBS_DIR, shipped_jobs

JOBS = shipped_jobs()


def _png(rng: np.random.Generator, label: int) -> bytes:
    from PIL import Image

    pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    pixels[..., label % 3] //= 2  # a faint class signal; learning is not the point, running is
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def cifar_like(root: Path, as_tarball: bool) -> Path:
    """train/<class>/<image>.png and test/<class>/<image>.png, 10 classes of 32x32 RGB: an image
    folder, or the same files in a .tar.gz."""
    rng = np.random.default_rng(0)
    files = {f"{split}/class{c}/{i}.png": _png(rng, c)
             for split, n in (("train", 8), ("test", 4)) for c in range(10) for i in range(n)}
    if as_tarball:
        path = root / "cifar10.tar.gz"
        with tarfile.open(path, "w:gz") as tf:
            for name, data in sorted(files.items()):
                info = tarfile.TarInfo(f"cifar10/{name}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
        return path
    for name, data in files.items():
        (root / "cifar10" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "cifar10" / name).write_bytes(data)
    return root / "cifar10"


def tiny_overrides(job: str, tmp: Path) -> list[str]:
    """What shrinks `job` to seconds on a CPU, derived from its own config (so a new job is covered)."""
    cfg = load_config(job)
    out = ["cluster.backend=local", "cluster.num_pools=null", "cluster.client_gpus=0", "cluster.server_gpus=0",
           "cluster.num_servers=1", "stop.rounds=1", "stop.target_metric=null", "stop.comm_budget_gib=null",
           "train.num_clients=2", "train.clients_per_round=1.0", "train.batch_size=16", "train.eval_batch_size=64",
           "data.max_train_samples=64", "data.max_test_samples=32", "output.checkpoint_every=0",
           "output.progress=false", f"output.dir={tmp / 'runs'}"]
    if cfg.model.name in ("gpt2", "vit"):
        out += ["model.transformer.n_layer=2", "model.transformer.n_embd=16", "model.transformer.n_head=2",
                "model.cut=block1"]
    if cfg.model.name == "gpt2":
        out += ["model.transformer.n_positions=64", "data.max_length=64", "data.max_train_samples=96"]
    if cfg.model.name == "vit":
        out += ["model.transformer.patch_size=8"]
    if cfg.data.name == "e2e" and cfg.data.path is not None:
        out += ["data.path=null"]  # the slice built into the package instead of the Hub
    if cfg.data.name in ("cifar10", "hf"):
        as_tarball = JOBS.index(job) % 2 == 0  # both layouts the headers name, over the jobs
        out += [f"data.path={cifar_like(tmp, as_tarball)}"]
    algo = cfg.algorithm
    if algo.name == "fsl_sage":
        out += ["algorithm.align_epochs=1", "algorithm.align_batch_size=16", "algorithm.buffer_size=32"]
    if algo.name == "ampere":
        # Ray Train needs the Ray backend (tested in test_ampere / test_precision); the actor runs the same fit.
        out += ["algorithm.server_epochs=1", "algorithm.server_trainer=actor"]
    return out


def _finite_eval(row: dict) -> float:
    value = row.get("eval_perplexity") if row.get("eval_perplexity") is not None else row.get("eval_accuracy")
    assert isinstance(value, (int, float)) and math.isfinite(value), row
    return value


@pytest.mark.parametrize("job", JOBS)
def test_shipped_job_runs_tiny(job, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # a tarball is packed into parquet there
    header = (JOBS_DIR / f"{job}.yaml").read_text().splitlines()[0]
    overrides = [a for o in tiny_overrides(job, tmp_path) for a in ("--set", o)]
    before = load_config(job)
    if header.startswith("# sfl-ray compare"):  # the command its header gives
        from sfl_ray.compare import main as compare
        assert compare(["--config", job, "--algorithms", "fedavg,splitfed_v2", *overrides]) == 0
        results = json.loads((tmp_path / "runs" / before.run_name() / "compare.json").read_text())
        assert [r["algorithm"] for r in results] == ["fedavg", "splitfed_v2"]
        for r in results:
            _finite_eval(r["final"])
        return
    from sfl_ray.run import main
    assert main(["--config", job, *overrides]) == 0, capsys.readouterr().err[-2000:]
    run = tmp_path / "runs" / before.run_name()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows and rows[-1]["algorithm"] == before.algorithm.name
    _finite_eval(rows[-1])
    ran = load_config(str(run / "config.yaml"))
    assert (ran.model.name, ran.model.cut, ran.data.name, ran.data.augment) == (
        before.model.name, "block1" if before.model.name in ("gpt2", "vit") else before.model.cut,
        before.data.name, before.data.augment)
