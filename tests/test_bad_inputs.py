"""Bad inputs: one line on stderr naming the key or path, exit 2, nothing written. Non-finite
numbers stop a run with exit 1. Run directories are never mixed, escaped or left half-made."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import stat
import tarfile
from pathlib import Path

import numpy as np
import pytest

# Nothing may try the network: set before `datasets` / `huggingface_hub` are first imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from sfl_ray.config import load_config  # noqa: E402
from sfl_ray.config_base import ConfigError  # noqa: E402
from sfl_ray.data.sources import BUILTIN  # noqa: E402
from sfl_ray.metrics.keys import ROW_METRICS  # noqa: E402
from sfl_ray.metrics.run_dir import claim_run_dir  # noqa: E402
from sfl_ray.metrics.writer import RunWriter  # noqa: E402
from sfl_ray.run import main  # noqa: E402
from sfl_ray.runtime.finite import NonFiniteError, check_client_reply  # noqa: E402

TINY = ["cluster.backend=local", "data.max_train_samples=200", "data.max_test_samples=100", "train.num_clients=2",
        "train.batch_size=50", "stop.rounds=1", "stop.target_metric=null", "output.progress=false",
        "partition.name=iid"]
E2E = ["data.name=e2e", "model.name=gpt2", "model.cut=block1", "model.transformer.n_layer=2",
       "model.transformer.n_embd=16", "model.transformer.n_head=2", "data.max_train_samples=20",
       "data.max_test_samples=10"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """Hub offline even if `datasets` was imported before this module set the environment."""
    for mod, attr in (("huggingface_hub.constants", "HF_HUB_OFFLINE"), ("datasets.config", "HF_HUB_OFFLINE"),
                      ("datasets.config", "HF_DATASETS_OFFLINE")):
        module = pytest.importorskip(mod)
        monkeypatch.setattr(module, attr, True, raising=False)


# ------------------------------------------------------------------------------ bad files

def _idx_folder(tmp: Path, truncate: bool) -> Path:
    """MNIST idx .gz files of random pixels; `truncate` cuts the training images' gzip short."""
    d = tmp / "idx"
    d.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 60), ("t10k", 20)):
        images = np.array([0, 0, 8, 3, 0, 0, 0, n, 0, 0, 0, 28, 0, 0, 0, 28], np.uint8).tobytes()
        images += rng.integers(0, 255, n * 784, dtype=np.uint8).tobytes()
        labels = np.array([0, 0, 8, 1, 0, 0, 0, n], np.uint8).tobytes()
        labels += rng.integers(0, 10, n, dtype=np.uint8).tobytes()
        (d / f"{split}-images-idx3-ubyte.gz").write_bytes(gzip.compress(images))
        (d / f"{split}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels))
    if truncate:
        f = d / "train-images-idx3-ubyte.gz"
        f.write_bytes(f.read_bytes()[: 2000])
    return d


def _image_folder(tmp: Path) -> Path:
    """train/ and test/ with two classes of 8x8 PNGs (the `imagefolder` layout)."""
    from PIL import Image

    d = tmp / "images"
    for split in ("train", "test"):
        for label in ("cat", "dog"):
            (d / split / label).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (8, 8), (40 * i, 100, 200)).save(d / split / label / f"{i}.png")
    return d


def _corrupt_parquet(tmp: Path) -> Path:
    d = tmp / "pq"
    d.mkdir()
    (d / "mnist_train.parquet").write_bytes(b"PAR1" + os.urandom(300))
    shutil.copy(BUILTIN / "mnist_small_test.parquet", d / "mnist_test.parquet")  # the good one is not blamed
    return d


def _truncated_tarball(tmp: Path) -> Path:
    src = _image_folder(tmp)
    tgz = tmp / "cifar.tar.gz"
    with tarfile.open(tgz, "w:gz") as tf:
        tf.add(src, arcname=".")
    tgz.write_bytes(tgz.read_bytes()[: 300])
    return tgz


def _no_images(tmp: Path) -> Path:
    d = tmp / "empty_images" / "train" / "cat"
    d.mkdir(parents=True)
    (d / "README.txt").write_text("no pictures here")
    return d.parent.parent


def _garbage_csv(tmp: Path) -> Path:
    d = tmp / "e2e"
    d.mkdir()
    (d / "trainset.csv").write_bytes(b"\x00\xff\xfe garbage \x00" + os.urandom(200))
    shutil.copy(BUILTIN / "e2e_slice" / "devset.csv", d / "devset.csv")
    return d


def _not_utf8(tmp: Path) -> Path:
    f = tmp / "latin1.yaml"
    f.write_bytes("train:\n  lr: 0.05  # d\xe9j\xe0 vu\n".encode("latin-1"))
    return f


def _a_file(tmp: Path) -> Path:
    f = tmp / "a_file"
    f.write_text("I am not a folder")
    return f


def _taken_run_dir(tmp: Path) -> None:
    d = tmp / "runs" / "taken"
    d.mkdir(parents=True)
    (d / "metrics.jsonl").write_text("{}\n")


# (id, --set overrides (a function of tmp_path for files made there), what the line must name)
CASES = [
    ("lr_inf", lambda t: ["train.lr=.inf"], "train.lr=inf"),
    ("lr_overflow", lambda t: ["train.lr=1e308"], "train.lr=1e+308"),
    ("lr_nan", lambda t: ["train.lr=.nan"], "train.lr=nan"),
    ("alpha_inf", lambda t: ["partition.name=dirichlet", "partition.alpha=.inf"], "partition.alpha=inf"),
    ("speed_nan", lambda t: ["cost_model.heterogeneity=list", "cost_model.compute_speed=[1.0, .nan]"],
     "cost_model.compute_speed.1=nan"),
    ("batch_bool", lambda t: ["train.batch_size=true"], "train.batch_size=True"),
    ("clients_bool", lambda t: ["train.clients_per_round=true"], "train.clients_per_round=True"),
    ("target_typo", lambda t: ["stop.target_metric.name=eval_acc", "stop.target_metric.value=0.9"],
     "stop.target_metric.name='eval_acc'"),
    ("pool_cpus_0", lambda t: ["cluster.pool_cpus=0"], "cluster.pool_cpus=0"),
    ("sglr_alpha", lambda t: ["algorithm.name=sglr", "algorithm.alpha=1000"], "algorithm.alpha=1000"),
    ("bad_yaml", lambda t: ["train.lr=[0.1"], "train.lr"),
    ("name_escape", lambda t: ["output.name=../../x"], "output.name='../../x'"),
    ("name_absolute", lambda t: ["output.name=/tmp/x"], "output.name='/tmp/x'"),
    ("name_dotdot", lambda t: ["output.name=.."], "output.name='..'"),
    ("name_taken", lambda t: (_taken_run_dir(t), ["output.name=taken"])[1], "output.overwrite=true"),
    ("outdir_is_file", lambda t: [f"output.dir={_a_file(t)}/runs"], "output.dir="),
    ("outdir_unwritable", lambda t: ["output.dir=/proc/sfl_ray_runs"], "output.dir='/proc/sfl_ray_runs'"),
    ("path_missing_rel", lambda t: ["data.path=./no/such/folder"], "data.path='./no/such/folder'"),
    ("path_missing_abs", lambda t: [f"data.path={t}/nothing_here"], "no such file or folder"),
    ("path_missing_file", lambda t: ["data.name=cifar10", "data.path=cifar-10.tar.gz"], "data.path='cifar-10.tar.gz'"),
    ("hub_offline", lambda t: ["data.path=nobody-sfl/no_such_dataset"], "data.path='nobody-sfl/no_such_dataset'"),
    ("parquet_corrupt", lambda t: [f"data.path={_corrupt_parquet(t)}"], "mnist_train.parquet"),
    ("idx_truncated", lambda t: [f"data.path={_idx_folder(t, truncate=True)}"], "train-images-idx3-ubyte.gz"),
    ("tar_truncated", lambda t: ["data.name=cifar10", f"data.path={_truncated_tarball(t)}"], "cifar.tar.gz"),
    ("no_images", lambda t: ["data.name=cifar10", f"data.path={_no_images(t)}"], "no images found"),
    ("hf_image_column", lambda t: ["data.name=hf", f"data.path={_image_folder(t)}", "data.image_column=img"],
     "data.image_column='img'"),
    ("hf_label_column", lambda t: ["data.name=hf", f"data.path={_image_folder(t)}", "data.label_column=target"],
     "data.label_column='target'"),
    ("e2e_garbage_csv", lambda t: E2E + [f"data.path={_garbage_csv(t)}"], "trainset.csv"),
    ("e2e_max_length", lambda t: E2E + ["data.max_length=9"], "data.max_length=9"),
    ("pretrained_missing", lambda t: ["model.name=vit", "model.cut=block1", "model.transformer.pretrained=./no/vit"],
     "model.transformer.pretrained='./no/vit'"),
]


def _tree(root: Path) -> dict:
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*")} if root.exists() else {}


def _run(args: list[str]) -> int:
    try:
        return main(args)
    except SystemExit as e:  # argparse
        return int(e.code)


@pytest.mark.parametrize("make, needle", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, make, needle):
    overrides = make(tmp_path)
    before = _tree(tmp_path / "runs")
    args = ["--config", "jobs/quickstart.yaml"]
    for o in TINY + [f"output.dir={tmp_path / 'runs'}"] + overrides:
        args += ["--set", o]
    code = _run(args)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert needle in err and "Traceback" not in err, err
    assert _tree(tmp_path / "runs") == before  # nothing new, nothing changed


def test_target_metric_typo_lists_the_allowed_names(capsys):
    _run(["--config", "jobs/quickstart.yaml", "--set", "stop.target_metric.name=eval_acc"])
    err = capsys.readouterr().err
    for name in ("eval_accuracy", "eval_loss", "eval_perplexity", "train_loss"):
        assert name in err


def test_not_utf8_config_is_one_line(tmp_path, capsys):
    path = _not_utf8(tmp_path)
    assert _run(["--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--config" in err and "UTF-8" in err, err


def test_numbers_still_accepted():
    cfg = load_config(None, ["train.lr=1", "train.lr=1e-3", "train.clients_per_round=3", "cost_model.latency_s=0"])
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float) and cfg.train.clients_per_round == 3
    assert load_config(None, ["train.lr=1"]).train.lr == 1.0


# ------------------------------------------------------------------------- run directories

def _tiny_args(tmp_path: Path, *extra: str) -> list[str]:
    args = ["--config", "jobs/quickstart.yaml"]
    for o in TINY + [f"output.dir={tmp_path / 'runs'}", "output.name=r", *extra]:
        args += ["--set", o]
    return args


def test_overwrite_starts_afresh_and_outputs_are_private(tmp_path):
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / "old_metrics.jsonl").write_text("stale\n")
    assert _run(_tiny_args(tmp_path, "output.overwrite=true")) == 0
    names = sorted(p.name for p in run.iterdir())
    assert names == ["checkpoints", "config.yaml", "metrics.jsonl", "partition.json", "summary.json"]
    for p in [*run.iterdir(), *(run / "checkpoints").iterdir()]:
        assert stat.S_IMODE(p.stat().st_mode) == (0o700 if p.is_dir() else 0o600), p
    # Every numeric key of a real row is a name stop.target_metric accepts.
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    numeric = {k for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert numeric <= set(ROW_METRICS), numeric - set(ROW_METRICS)


def test_new_run_dirs_are_0700(tmp_path):
    assert _run(_tiny_args(tmp_path)) == 0
    for d in (tmp_path / "runs", tmp_path / "runs" / "r"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d


def test_an_existing_empty_run_dir_is_used(tmp_path):
    (tmp_path / "runs" / "r").mkdir(parents=True)
    assert _run(_tiny_args(tmp_path)) == 0
    assert (tmp_path / "runs" / "r" / "summary.json").exists()


def test_two_runs_with_one_name_cannot_both_claim_it(tmp_path):
    cfg = load_config(None, [f"output.dir={tmp_path / 'runs'}", "output.name=same"])
    first = claim_run_dir(cfg, "a: 1\n")
    with pytest.raises(ConfigError, match="output.name"):
        claim_run_dir(cfg, "a: 2\n")  # the second run, started before the first wrote anything else
    assert (Path(first.path) / "config.yaml").read_text() == "a: 1\n"
    # Even when the directory already existed empty, the exclusive config.yaml decides.
    cfg2 = load_config(None, [f"output.dir={tmp_path / 'runs'}", "output.name=empty"])
    (tmp_path / "runs" / "empty").mkdir()
    claim_run_dir(cfg2, "b: 1\n")
    with pytest.raises(ConfigError):
        claim_run_dir(cfg2, "b: 2\n")


def _race(out: str, barrier, results) -> None:
    cfg = load_config(None, [f"output.dir={out}", "output.name=race"])
    barrier.wait()
    try:
        claim_run_dir(cfg, f"pid: {os.getpid()}\n")
        results.put("won")
    except ConfigError:
        results.put("refused")


@pytest.mark.parametrize("pre_existing", [False, True], ids=["new", "empty_dir"])
def test_concurrent_processes_racing_for_one_name_only_one_wins(tmp_path, pre_existing):
    import multiprocessing as mp

    if pre_existing:
        (tmp_path / "runs" / "race").mkdir(parents=True)
    ctx = mp.get_context("fork")
    barrier, results = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(str(tmp_path / "runs"), barrier, results)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert sorted(results.get(timeout=5) for _ in procs) == ["refused", "refused", "refused", "won"]


def test_late_config_error_leaves_no_directory(tmp_path, capsys, monkeypatch):
    """A ConfigError from inside the running backend (e.g. a topology check) removes what the run made."""
    import sfl_ray.runtime.launch as launch

    def refuse(*a, **k):
        raise ConfigError("cluster.num_pools", 9, "more than the cluster holds")

    monkeypatch.setattr(launch, "run_experiment", refuse)
    assert _run(_tiny_args(tmp_path)) == 2
    assert "cluster.num_pools=9" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
    (tmp_path / "runs" / "r").mkdir(parents=True)  # a folder that was there before is kept, empty
    assert _run(_tiny_args(tmp_path)) == 2
    assert (tmp_path / "runs" / "r").is_dir() and not any((tmp_path / "runs" / "r").iterdir())


def test_topology_error_on_ray_comes_before_the_run_dir(tmp_path, capsys, monkeypatch):
    """On the Ray backend the topology is checked once Ray is up and before anything is written
    (Ray itself is stubbed out: no cluster is started)."""
    import sfl_ray.run as run
    import sfl_ray.runtime.ray_backend as ray_backend

    def refuse(cluster, num_clients, needs_server):
        raise ConfigError("cluster.num_pools", cluster.num_pools, "3 pools x 1 CPU > the cluster's 2 CPUs")

    monkeypatch.setattr(run, "_init_ray", lambda cfg: None)
    monkeypatch.setattr(ray_backend, "plan_topology", refuse)
    assert _run(_tiny_args(tmp_path, "cluster.backend=ray", "cluster.num_pools=3")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cluster.num_pools=3" in err
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------- non-finite numbers

def test_diverging_run_exits_1_naming_round_and_client(tmp_path, caplog):
    assert _run(_tiny_args(tmp_path, "train.lr=1e20")) == 1
    failed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("run failed")]
    assert failed and "round 1" in failed[0] and "client" in failed[0] and "non-finite" in failed[0], failed


def test_server_nan_exits_1_naming_round_and_server(tmp_path, caplog):
    code = _run(_tiny_args(tmp_path, "algorithm.name=cse_fsl", "algorithm.server_lr=1e20", "algorithm.upload_every=1"))
    assert code == 1
    failed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("run failed")]
    assert failed and "server round 1: non-finite" in failed[0], failed
    row = json.loads((tmp_path / "runs" / "r" / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["server_loss"] == "NaN"  # the row that shows it was written, not nulled


def test_client_check_names_the_quantity():
    w = {"weights": {"fc.weight": np.array([1.0, np.inf], np.float32)}}
    with pytest.raises(NonFiniteError, match=r"client 3 round 2: non-finite up/weights \(fc.weight\)"):
        check_client_reply(3, 2, w, {"num_samples": 10})
    with pytest.raises(NonFiniteError, match=r"client 3 round 2: non-finite train loss \(nan\)"):
        check_client_reply(3, 2, {}, {"loss_sum": float("nan"), "loss_count": 4})
    check_client_reply(3, 2, {"labels": np.array([1, 2])}, {"loss_sum": 1.0})  # finite, ints: fine


def test_metrics_writer_keeps_nan_visible(tmp_path):
    w = RunWriter(str(tmp_path / "run"))
    w.append_row({"round": 1, "train_loss": float("nan"), "eval_loss": float("inf"), "x": np.float32("-inf"),
                  "eval_accuracy": None, "by_kind": {"up/w": float("nan")}})
    w.write_json("summary.json", {"final": w.rows[-1], "list": [float("nan"), 1.0]})

    def strict(const):
        raise AssertionError(f"bare {const} in JSON")

    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text(), parse_constant=strict)
    assert row == {"round": 1, "train_loss": "NaN", "eval_loss": "Infinity", "x": "-Infinity",
                   "eval_accuracy": None, "by_kind": {"up/w": "NaN"}}
    summary = json.loads((tmp_path / "run" / "summary.json").read_text(), parse_constant=strict)
    assert summary["final"]["train_loss"] == "NaN" and summary["list"] == ["NaN", 1.0]


def test_a_one_sample_batch_that_batchnorm_cannot_train_is_refused_before_the_run(tmp_path, capsys):
    """resnet18 with the ImageNet stem ends in 1x1 maps on MNIST: its BatchNorm cannot train a
    batch of one sample, which a client of 65 samples forms with batch size 64 (mid-run, that
    was a client failure). It is a config error naming batch sizes that work, and they do."""
    import torch

    from sfl_ray.data.batches import client_batches
    from sfl_ray.models.split import build_parts
    from sfl_ray.run import prepare

    model = ["data.max_train_samples=65", "train.num_clients=1", "model.name=resnet18", "model.stem=imagenet",
             "model.cut=layer2", "cluster.backend=local", f"output.dir={tmp_path}"]
    cfg = load_config(None, model + ["train.batch_size=64"])
    with pytest.raises(ConfigError, match=r"client 0 holds 65 samples.*BatchNorm.*e\.g\. 63, 65"):
        prepare(cfg)
    # what it prevents: the client's last batch really has one sample, and training on it fails
    cfg_ok = load_config(None, model + ["train.batch_size=65"])
    _, data, shards, _ = prepare(cfg_ok)  # a batch size it names works
    parts = build_parts("resnet18", "layer2", data.input_shape, data.num_classes, 0, cfg.model)
    last = list(client_batches(data.train_x, data.train_y, shards[0], 64, cfg.seed, 1, 0))[-1][0]
    assert len(last) == 1
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        parts.full().train()(last)
    # the command line says it in one line, exit 2, before any round
    assert main(["--config", "jobs/quickstart.yaml", *[a for o in model + ["train.batch_size=64"]
                                                       for a in ("--set", o)]]) == 2
    assert "train.batch_size=64" in capsys.readouterr().err
    # a model without BatchNorm trains the same one-sample batch: nothing to refuse
    prepare(load_config(None, ["data.max_train_samples=65", "train.num_clients=1", "train.batch_size=64"]))
