"""Plug-ins: an algorithm, a model and a data source defined outside sfl_ray (here, in this test
module; and the FedProx example under examples/) register, are validated by the config, and run
with the same numbers on both backends. Entry points are found without pip (docs/extending.md)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from collections import OrderedDict
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
import torch.nn as nn
from pydantic import Field

from sfl_ray import registry
from sfl_ray.algorithms.splitfed_v2 import SingleServer, SplitFedV2
from sfl_ray.config import ExperimentConfig, dump_config, load_config
from sfl_ray.config_base import ConfigError, Section
from sfl_ray.data.sources import ArrayDataset
from sfl_ray.run import main, prepare
from sfl_ray.runtime.protocol import Algorithm
from sfl_ray.runtime.launch import run_experiment
from tests.helpers import small_config, without_timing

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "fedprox"


# -- a plug-in algorithm, model and data source, defined here (registered by the fixture) ------
class ClippedConfig(Section):
    name: Literal["clipped_sfl"] = Field("clipped_sfl", description="SplitFed v2, cut gradients norm-clipped.")
    clip: float = Field(1.0, gt=0, description="Largest L2 norm of a cut-layer gradient the server sends down.")
    weighted: bool = Field(True, description="Sample-weighted FedAvg of the device blocks.")


class ClippingServer(SingleServer):
    """SplitFed v2's server block; the gradient it returns is clipped to algorithm.clip."""

    def train_step(self, client: int, arrays: dict, info: dict) -> tuple[dict, dict]:
        reply, out = super().train_step(client, arrays, info)
        g, clip = reply["gradients"], self.ctx.config.clip
        norm = float(g.norm())
        return ({"gradients": g * (clip / norm)} if norm > clip else reply), out


class ClippedSFL(SplitFedV2):
    name = "clipped_sfl"
    config_cls = ClippedConfig
    server_cls = ClippingServer


class MLPOptions(Section):
    hidden: int = Field(32, gt=0, description="Hidden units.")


def mlp(in_shape: tuple[int, ...], num_classes: int, options: MLPOptions) -> nn.Sequential:
    return nn.Sequential(OrderedDict([
        ("flatten", nn.Flatten()), ("fc1", nn.Linear(math.prod(in_shape), options.hidden)),
        ("relu1", nn.ReLU()), ("fc2", nn.Linear(options.hidden, num_classes))]))


class BlobOptions(Section):
    train: int = Field(400, gt=0, description="Training samples.")
    test: int = Field(100, gt=0, description="Test samples.")
    classes: int = Field(4, ge=2, description="Classes (Gaussian blobs).")
    spread: float = Field(1.0, gt=0, description="Standard deviation around each class centre.")


def blobs(cfg) -> ArrayDataset:
    """Gaussian blobs as 1x4x4 images, from a fixed seed."""
    o = cfg.options
    rng = np.random.default_rng(7)
    centres = 2.0 * rng.normal(size=(o.classes, 1, 4, 4))

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, o.classes, n)
        return (centres[y] + o.spread * rng.normal(size=(n, 1, 4, 4))).astype(np.float32), y.astype(np.int64)

    (tx, ty), (vx, vy) = draw(o.train), draw(o.test)
    return ArrayDataset("blobs", tx, ty, vx, vy, o.classes)


@pytest.fixture
def plugins():
    saved = registry.snapshot()
    registry.register_algorithm(ClippedSFL)
    registry.register_model("mlp", MLPOptions, default_cut="relu1")(mlp)
    registry.register_data("blobs", BlobOptions)(blobs)
    yield
    registry.restore(saved)


@pytest.fixture
def fedprox():
    """The example plug-in, imported from its file (as SFL_RAY_PLUGINS does): Ray workers cannot
    import it, so on Ray it only works if its module travels by value."""
    saved = registry.snapshot()
    sys.modules.pop("sfl_fedprox", None)
    yield registry.load_module(str(EXAMPLE / "sfl_fedprox.py"))
    registry.restore(saved)
    sys.modules.pop("sfl_fedprox", None)


PLUGIN_RUN = ["algorithm.name=clipped_sfl", "model.name=mlp", "data.name=blobs", "train.batch_size=40",
              "train.lr=0.1", "partition.name=iid"]


def _rows(cfg) -> list[dict]:
    algorithm_cls, data, shards, _ = prepare(cfg)
    run_experiment(algorithm_cls, cfg, data, shards)
    with open(f"{cfg.run_dir()}/metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def _without(rows: list[dict], *keys: str) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in keys} for r in without_timing(rows)]


# -- config ------------------------------------------------------------------------------------
def test_plugin_sections_are_validated_like_the_built_ins(plugins, tmp_path):
    cfg = load_config(None, PLUGIN_RUN + ["algorithm.clip=0.5", "model.options.hidden=16", "data.options.classes=3"])
    assert (cfg.algorithm.clip, cfg.model.options.hidden, cfg.data.options.classes) == (0.5, 16, 3)
    assert cfg.data.options.train == 400  # the plug-in's defaults fill what is not given
    again = tmp_path / "config.yaml"
    again.write_text(dump_config(cfg))
    assert load_config(str(again)) == cfg
    for overrides, message in [
        (["algorithm.clip=0"], "config error: algorithm.clip=0: must be > 0"),
        (["model.options.hiden=3"], "config error: model.options.hiden=3: unknown key"),
        (["data.options.classes=1"], "config error: data.options.classes=1: must be >= 2"),
        (["model.name=cnn", "model.options.hidden=8"], "config error: model.options='{...}': model 'cnn' takes no options"),
        (["model.name=nope"], "'vit' or 'mlp'"),
        (["data.name=nope"], "'e2e' or 'blobs'"),
        (["algorithm.name=nope"], "clipped_sfl"),
    ]:
        with pytest.raises(ConfigError) as err:
            load_config(None, PLUGIN_RUN + overrides)
        assert message in str(err.value) and len(str(err.value).splitlines()) == 1
    schema = ExperimentConfig.model_json_schema()
    assert schema["$defs"]["ClippedConfig"]["properties"]["clip"]["description"].startswith("Largest L2 norm")
    assert "mlp" in schema["$defs"]["ModelConfig"]["properties"]["name"]["enum"]
    assert "blobs" in schema["$defs"]["DataConfig"]["properties"]["name"]["enum"]
    assert {"MLPOptions", "BlobOptions"} <= set(schema["$defs"])


def test_restoring_the_registry_takes_the_plugins_out_of_the_config():
    saved = registry.snapshot()
    registry.register_algorithm(ClippedSFL)
    registry.register_model("mlp", MLPOptions, default_cut="relu1")(mlp)
    assert load_config(None, ["algorithm.name=clipped_sfl", "model.name=mlp"]).model.options == MLPOptions()
    shipped = registry.plugin_entries()
    assert [(e.kind, e.name) for e in shipped] == [("algorithm", "clipped_sfl"), ("model", "mlp")]
    registry.restore(saved)
    with pytest.raises(ConfigError, match="unknown algorithm"):
        load_config(None, ["algorithm.name=clipped_sfl"])
    schema = ExperimentConfig.model_json_schema()
    assert "ClippedConfig" not in schema["$defs"] and "mlp" not in schema["$defs"]["ModelConfig"]["properties"]["name"]["enum"]
    try:  # what another process does with the entries it was sent
        registry.adopt(shipped)
        registry.adopt(shipped)  # twice (a reused worker): replaced, not refused
        assert load_config(None, ["algorithm.name=clipped_sfl", "model.name=mlp"]).algorithm.clip == 1.0
    finally:
        registry.restore(saved)


def test_what_the_registry_refuses():
    saved = registry.snapshot()
    try:
        class Impostor(ClippedSFL):
            name = "fedavg"  # a built-in's name

            class config_cls(Section):
                name: Literal["fedavg"] = "fedavg"
        with pytest.raises(ValueError, match="algorithm 'fedavg' is already registered \\(built-in\\)"):
            registry.register_algorithm(Impostor)

        class Misnamed(ClippedSFL):
            name = "misnamed"  # its config still says clipped_sfl
        with pytest.raises(TypeError, match="needs name: Literal\\['misnamed'\\]"):
            registry.register_algorithm(Misnamed)

        class NoSchedule(Algorithm):  # nothing implemented
            name = "no_schedule"

            class config_cls(Section):
                name: Literal["no_schedule"] = "no_schedule"
        with pytest.raises(TypeError, match="missing its"):
            registry.register_algorithm(NoSchedule)

        class Loose(Section):
            model_config = {**Section.model_config, "extra": "allow"}
        with pytest.raises(TypeError, match="must refuse unknown keys"):
            registry.register_model("loose", Loose)
        with pytest.raises(TypeError, match="a model name is a letter"):
            registry.register_model("a/b")

        registry.register_algorithm(ClippedSFL)
        registry.register_algorithm(ClippedSFL)  # the same class again: nothing new
        registry.register_model("flat", default_cut=None)(lambda in_shape, n: nn.Sequential(nn.Flatten(), nn.Linear(16, n)))
        registry.register_model("not_sequential")(lambda in_shape, n: nn.Linear(16, n))
        registry.register_data("bad_labels")(lambda cfg: ArrayDataset("x", np.zeros((4, 1, 4, 4), np.float32),
                                                                     np.zeros(4, np.int32), np.zeros((2, 1, 4, 4), np.float32),
                                                                     np.zeros(2, np.int64), 2))
        for overrides, message in [
            (["model.name=flat"], "config error: model.cut=None: flat has no default cut"),
            (["model.name=not_sequential"], "returned Linear, not an nn.Sequential"),
            (["data.name=bad_labels"], "returned train_y of dtype int32 (labels are int64)"),
        ]:
            with pytest.raises(ConfigError) as err:
                prepare(load_config(None, ["data.max_train_samples=100", "data.max_test_samples=50",
                                           "train.num_clients=2", *overrides]))
            assert message in str(err.value) and len(str(err.value).splitlines()) == 1
    finally:
        registry.restore(saved)


# -- runs --------------------------------------------------------------------------------------
def test_a_plugin_algorithm_model_and_data_source_train_and_their_config_counts(plugins, run_dir):
    """clip huge: SplitFed v2's numbers to the bit (same halves, same schedule); clip tiny: others."""
    run = {}
    for tag, extra in [("huge", ["algorithm.clip=1e30"]), ("tiny", ["algorithm.clip=1e-4"]),
                       ("v2", ["algorithm.name=splitfed_v2"])]:
        cfg = small_config(run_dir, *PLUGIN_RUN, "cluster.backend=local", f"output.name={tag}", *extra)
        run[tag] = _rows(cfg)
    assert [r["algorithm"] for r in run["huge"]] == ["clipped_sfl"] * 2
    assert _without(run["huge"], "algorithm") == _without(run["v2"], "algorithm")
    assert run["huge"][1]["train_loss"] < run["huge"][0]["train_loss"]
    assert run["tiny"][1]["train_loss"] != run["huge"][1]["train_loss"]
    assert run["tiny"][0]["bytes_cum"] == run["huge"][0]["bytes_cum"]  # clipping changes values, not sizes


def test_fedprox_example_is_fedavg_at_mu_0_and_keeps_clients_closer_above(fedprox, run_dir):
    run = {}
    for tag, extra in [("mu0", ["algorithm.mu=0"]), ("mu1", ["algorithm.mu=1.0"]), ("fedavg", ["algorithm.name=fedavg"])]:
        cfg = small_config(run_dir, "algorithm.name=fedprox", "cluster.backend=local", f"output.name={tag}",
                           "train.local_epochs=2", *extra)
        run[tag] = _rows(cfg)
    assert _without(run["mu0"], "algorithm", "client_drift") == _without(run["fedavg"], "algorithm")
    assert all(r["client_drift"] > 0 for r in run["mu0"])
    # The proximal term: every round, the clients end nearer the global model they started from.
    assert all(p["client_drift"] < 0.9 * f["client_drift"] for p, f in zip(run["mu1"], run["mu0"]))
    assert run["mu1"][0]["train_loss"] != run["mu0"][0]["train_loss"]
    assert run["mu1"][1]["train_loss"] < run["mu1"][0]["train_loss"]


def test_fedprox_example_job_runs_through_the_cli(fedprox, run_dir, capsys):
    tiny = ["data.max_train_samples=400", "data.max_test_samples=100", "train.num_clients=4",
            "train.clients_per_round=4", "stop.rounds=1", "cluster.backend=local", f"output.dir={run_dir}"]
    args = ["--config", str(EXAMPLE / "fedprox.yaml")] + [a for t in tiny for a in ("--set", t)]
    assert main(args) == 0, capsys.readouterr().err
    (row,) = [json.loads(line) for line in open(Path(run_dir) / "fedprox" / "metrics.jsonl")]
    assert row["algorithm"] == "fedprox" and row["client_drift"] > 0
    assert "mu: 0.1" in (Path(run_dir) / "fedprox" / "config.yaml").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("which", ["test_module", "example_file"])
def test_plugins_give_the_same_numbers_on_ray_and_locally(ray_cluster, run_dir, request, which):
    """Registered only in this process: the actors get the plug-ins' code by value."""
    import ray

    if which == "test_module":
        request.getfixturevalue("plugins")
        extra = [*PLUGIN_RUN, "algorithm.clip=0.05", "model.options.hidden=24"]
    else:
        request.getfixturevalue("fedprox")
        extra = ["algorithm.name=fedprox", "algorithm.mu=0.5", "train.clients_per_round=3"]
        # The premise: a Ray worker cannot import the example's module by name.
        assert not ray.get(ray.remote(lambda: __import__("importlib.util").util.find_spec("sfl_fedprox")
                                      is not None).remote())
    rows = {}
    for backend in ("local", "ray"):
        cfg = small_config(run_dir, *extra, f"cluster.backend={backend}", f"output.name={which}-{backend}",
                           "cluster.num_pools=2")
        rows[backend] = _rows(cfg)
    assert len(rows["ray"]) == 2
    assert without_timing(rows["ray"]) == without_timing(rows["local"])
    assert rows["ray"][1]["train_loss"] < rows["ray"][0]["train_loss"]


# -- entry points, without pip -------------------------------------------------------------------
def _fake_install(tmp_path: Path, entry_points: str) -> dict:
    """A distribution as pip would leave it: a *.dist-info with entry_points.txt on sys.path."""
    site = tmp_path / "site"
    info = site / "sfl_plugins_demo-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: sfl-plugins-demo\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(entry_points))
    (site / "demo_models.py").write_text(textwrap.dedent("""
        from collections import OrderedDict

        import torch.nn as nn
        from sfl_ray import register_model

        def register():
            @register_model("tiny_linear", default_cut="flatten")
            def tiny_linear(in_shape, num_classes):
                return nn.Sequential(OrderedDict([("flatten", nn.Flatten()), ("fc", nn.Linear(784, num_classes))]))
        """))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(EXAMPLE), str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _python(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_entry_points_register_plugins_in_a_fresh_process(tmp_path):
    env = _fake_install(tmp_path, """
        [sfl_ray.plugins]
        fedprox = sfl_fedprox
        models = demo_models:register
        """)
    done = _python("""
        import sys
        from sfl_ray import registry
        from sfl_ray.config import ExperimentConfig, load_config
        from sfl_ray.run import main

        cfg = load_config("jobs/quickstart.yaml", ["algorithm.name=fedprox", "algorithm.mu=0.5",
                                                   "model.name=tiny_linear"])
        assert (cfg.algorithm.mu, cfg.model.name) == (0.5, "tiny_linear")
        assert "FedProxConfig" in ExperimentConfig.model_json_schema()["$defs"]
        print(registry.get("algorithm", "fedprox").source)
        sys.exit(main(["--config", "jobs/quickstart.yaml", "--set", "algorithm.name=fedprox",
                       "--set", "algorithm.mu=-1"]))
        """, env)
    assert done.returncode == 2, done.stderr
    assert done.stdout.strip() == "entry point sfl_ray.plugins:fedprox (sfl_fedprox)"
    assert done.stderr.strip().splitlines() == ["config error: algorithm.mu=-1: must be >= 0"]


def test_a_broken_entry_point_is_one_line_naming_it(tmp_path):
    env = _fake_install(tmp_path, """
        [sfl_ray.plugins]
        broken = no_such_plugin_module
        """)
    done = _python("""
        import sys
        from sfl_ray.run import main
        sys.exit(main(["--config", "jobs/quickstart.yaml"]))
        """, env)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "plugin error: entry point sfl_ray.plugins:broken='no_such_plugin_module': failed to load: "
        "ModuleNotFoundError: No module named 'no_such_plugin_module'"]
