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
