"""Bad configs exit 2 with one line naming the key, the value and what is allowed; no traceback."""

import glob
import os
import re

import pytest

from sfl_ray.config import load_config
from sfl_ray.run import main


@pytest.mark.parametrize("args, needle", [
    (["--config", "no/such/file.yaml"], "--config"),
    (["--config", "jobs/quickstart.yaml", "--set", "train.nonsense=1"], "train.nonsense"),
    (["--config", "jobs/quickstart.yaml", "--set", "algorithm.name=nope"], "algorithm.name='nope'"),
    (["--config", "jobs/quickstart.yaml", "--set", "train.lr=-0.1"], "train.lr=-0.1"),
    (["--config", "jobs/quickstart.yaml", "--set", "partition.alpha=0"], "partition.alpha=0"),
    (["--config", "jobs/quickstart.yaml", "--set", "model.cut=conv9"], "model.cut='conv9'"),
    (["--config", "jobs/quickstart.yaml", "--set", "train.num_clients=100",
      "--set", "data.max_train_samples=50"], "train.num_clients=100"),
    (["--config", "jobs/quickstart.yaml", "--set", "cluster.backend=spark"], "cluster.backend='spark'"),
    (["--config", "jobs/quickstart.yaml", "--set", "bogus"], "bogus"),
    (["--config", "jobs/quickstart.yaml", "--set", "cluster.num_servers=2"], "cluster.num_servers=2"),
    (["--nonsense"], "arguments"),
])
def test_bad_config_exits_2_with_one_line(capsys, args, needle):
    try:
        code = main(args)
    except SystemExit as e:  # argparse errors
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert needle in err
    assert "Traceback" not in err


def test_unknown_algorithm_lists_what_is_allowed(capsys):
    main(["--config", "jobs/quickstart.yaml", "--set", "algorithm.name=nope"])
    err = capsys.readouterr().err
    for name in ("fedavg", "sl", "splitfed_v1", "splitfed_v2"):
        assert name in err


def test_set_overrides_are_typed():
    cfg = load_config("jobs/quickstart.yaml", ["train.lr=0.2", "train.clients_per_round=0.5", "stop.rounds=3"])
    assert cfg.train.lr == 0.2 and cfg.train.sampled_count() == 10 and cfg.stop.rounds == 3


@pytest.mark.parametrize("name", ["fedavg", "sl", "splitfed_v1", "splitfed_v2"])
def test_every_algorithm_runs_from_its_name_alone(name):
    cfg = load_config("jobs/quickstart.yaml", [f"algorithm.name={name}"])
    assert cfg.algorithm.name == name


@pytest.mark.parametrize("path", sorted(glob.glob("jobs/*.yaml")))
def test_every_job_file_parses_and_says_how_to_run_it(path):
    text = open(path).read()
    name = os.path.basename(path).removesuffix(".yaml")
    first = text.splitlines()[0]
    assert re.match(rf"# sfl-ray (run|compare) --config {name}\b", first), first  # a command that works anywhere
    assert "# Data:" in text.split("\n\n")[0].split("\nalgorithm:")[0]  # and where its data comes from
    load_config(path)


@pytest.mark.parametrize("text, key, lines", [
    # a second section: PyYAML keeps the last, so `backend: local` would be dropped without a word
    ("algorithm:\n  name: fedavg\ncluster:\n  backend: local\ntrain:\n  lr: 0.1\ncluster:\n  num_pools: 1\n",
     "cluster", "lines 3 and 7"),
    ("train:\n  lr: 0.1\n  batch_size: 8\n  lr: 0.2\n", "lr", "lines 2 and 4"),  # nested
    ("train: {lr: 0.1, lr: 0.2}\n", "lr", "lines 1 and 1"),  # flow style, one line
])
def test_a_key_given_twice_in_a_job_file_is_refused(tmp_path, capsys, text, key, lines):
    job = tmp_path / "job.yaml"
    job.write_text(text)
    out = tmp_path / "runs"
    assert main(["--config", str(job), "--set", f"output.dir={out}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert f"key {key!r} appears twice" in err and lines in err and str(job) in err, err
    assert not out.exists()  # refused before anything is written


def test_a_set_value_with_a_key_twice_is_refused(capsys):
    assert main(["--config", "jobs/quickstart.yaml", "--set", "train={lr: 0.1, lr: 0.2}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "train=" in err and "key 'lr' appears twice" in err, err


def test_merge_keys_and_distinct_keys_still_load():
    import yaml

    from sfl_ray.config import _Loader
    text = "base: &b\n  lr: 0.1\n  momentum: 0.9\ntrain:\n  <<: *b\n  lr: 0.2\n"
    assert yaml.load(text, Loader=_Loader) == {"base": {"lr": 0.1, "momentum": 0.9},
                                               "train": {"lr": 0.2, "momentum": 0.9}}
