"""Stop conditions, failures as values, image folders through `datasets`, the CNN zoo's cuts."""

import numpy as np
import pytest
import torch

from sfl_ray.config import DataConfig
from sfl_ray.data.sources import load_source
from sfl_ray.models.split import build_model, split_model
from sfl_ray.run import main
from sfl_ray.runtime.coordinator import ClientFailed
from tests.helpers import local_coordinator, small_config


def test_comm_budget_stops_the_run(run_dir):
    budget = 0.025  # GiB: a few rounds of this small job
    cfg = small_config(run_dir, "algorithm.name=splitfed_v2", "stop.rounds=10", f"stop.comm_budget_gib={budget}")
    coord, _ = local_coordinator(cfg)
    summary = coord.run()
    rows = coord.writer.rows
    assert summary["stop_reason"] == "comm_budget" and 1 < len(rows) < 10
    assert rows[-1]["bytes_cum"] >= budget * 2**30 > rows[-2]["bytes_cum"]
    assert rows[-1]["eval_accuracy"] is not None  # the last row is always evaluated


def test_target_metric_stops_the_run(run_dir):
    cfg = small_config(run_dir, "algorithm.name=fedavg", "stop.rounds=10", "stop.target_metric.name=eval_loss",
                       "stop.target_metric.value=100.0", "stop.target_metric.mode=min")
    coord, _ = local_coordinator(cfg)
    summary = coord.run()
    assert summary["stop_reason"] == "target_metric" and summary["rounds"] == 1


def test_a_client_failure_names_client_and_round_and_stops(run_dir):
    cfg = small_config(run_dir, "algorithm.name=splitfed_v2", "stop.rounds=2")
    coord, ex = local_coordinator(cfg)
    real = ex.pool.algorithm.client_program

    def boom(ctx, down):
        if ctx.client == 2:
            raise RuntimeError("device fell off the table")
        return real(ctx, down)

    ex.pool.algorithm.client_program = boom
    with pytest.raises(ClientFailed, match=r"client 2 failed in round 1: RuntimeError: device fell off the table"):
        coord.run()
    assert coord.state.value == "ERRORED"


def test_cli_exits_1_on_a_failure_while_running(tmp_path, capsys):
    # a failure while running (here: every client program fails) is exit 1, not 2
    import sfl_ray.runtime.pool as pool_mod
    orig = pool_mod.ClientPool.run

    def failing(self, program, client, rnd, down):
        reply = orig(self, program, client, rnd, down)
        reply.error = "Traceback (most recent call last):\nRuntimeError: injected"
        return reply

    pool_mod.ClientPool.run = failing
    try:
        code = main(["--config", "jobs/quickstart.yaml", "--set", "cluster.backend=local", "--set", "stop.rounds=1",
                     "--set", f"output.dir={tmp_path}", "--set", "data.max_train_samples=200",
                     "--set", "train.num_clients=4"])
    finally:
        pool_mod.ClientPool.run = orig
    assert code == 1


def _write_image_folder(root):
    """40 train and 20 test MNIST digits as root/{train,test}/digit<y>/<i>.png."""
    from PIL import Image

    src = load_source(DataConfig(max_train_samples=40, max_test_samples=20))
    raw = ((src.train_x * 0.3081 + 0.1307).clip(0, 1) * 255).astype(np.uint8)
    for split, xs, ys in (("train", raw[:40], src.train_y[:40]), ("test", raw[:20], src.train_y[:20])):
        for i, (x, y) in enumerate(zip(xs, ys)):
            d = root / split / f"digit{y}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(x[0]).save(d / f"{i}.png")
    return src


def test_image_folder_through_datasets(tmp_path):
    src = _write_image_folder(tmp_path)
    data = load_source(DataConfig(name="hf", path=str(tmp_path)))
    assert data.train_x.shape == (40, 1, 28, 28) and data.test_x.shape == (20, 1, 28, 28)
    assert len(np.unique(data.train_y)) == len(np.unique(src.train_y[:40]))


def test_image_tarball_is_packed_once_and_subsets_span_the_classes(tmp_path, monkeypatch):
    """The CIFAR-10 jpg tarball's layout (split/class/image), built here from MNIST digits:
    it reads the same as the unpacked folder, is packed to parquet once, and a
    max_train_samples subset is not the first (class-sorted) files."""
    import tarfile

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    _write_image_folder(tmp_path / "folder")
    tarball = tmp_path / "digits.tar.gz"
    with tarfile.open(tarball, "w:gz") as tf:
        for split in ("train", "test"):
            tf.add(tmp_path / "folder" / split, arcname=split)
    from_tar = load_source(DataConfig(name="hf", path=str(tarball)))
    from_folder = load_source(DataConfig(name="hf", path=str(tmp_path / "folder")))
    np.testing.assert_array_equal(from_tar.train_x, from_folder.train_x)
    np.testing.assert_array_equal(from_tar.test_y, from_folder.test_y)
    packed = sorted(p.name for p in (tmp_path / "cache" / "sfl_ray").glob("digits-*/*.parquet"))
    assert packed == ["test.parquet", "train.parquet"]
    sub = load_source(DataConfig(name="hf", path=str(tarball), max_train_samples=8))
    prefix = from_folder.train_y[:8]
    assert np.all(np.diff(prefix) >= 0)  # files come class by class
    assert len(sub.train_y) == 8 and len(np.unique(sub.train_y)) > len(np.unique(prefix))


@pytest.mark.parametrize("name, cut", [("resnet18", "layer2"), ("vgg11", "pool2"), ("cnn", "pool1")])
def test_cnn_zoo_splits_match_the_unsplit_model(name, cut):
    model = build_model(name, (3, 32, 32), 10, seed=0).eval()
    device, server = split_model(build_model(name, (3, 32, 32), 10, seed=0), cut)
    device.eval(), server.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(server(device(x)), model(x))
