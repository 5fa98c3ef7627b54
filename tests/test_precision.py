"""train.precision and host->device copies, through their CPU fallback (no GPU here).

bf16 autocast runs on the CPU exactly as the runtime applies it on a GPU (around client
programs, server block calls, evaluation and the Ray Train fit), so its numbers, FLOPs, bytes
and determinism are tested here; the pinned, non-blocking copy to a GPU is tested only for
what it calls, and is the identity on a CPU."""

import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

from sfl_ray.config import load_config
from sfl_ray.config_base import ConfigError
from sfl_ray.metrics.device_cost import FlopCounter
from sfl_ray.models.split import build_parts
from sfl_ray.models.task import task_loss
from sfl_ray.run import prepare
from sfl_ray.runtime.launch import run_experiment
from sfl_ray.runtime.precision import autocast
from sfl_ray.runtime.wire import load_weights, module_weights, pack, to_device, to_numpy, to_tensor
from tests.helpers import local_coordinator, small_config, without_timing
from tests.test_gpt2_e2e import TINY

CNN_JOB = ["train.optimizer=adam", "train.lr=0.003", "stop.rounds=3"]
GPT2_ONE_ROUND = TINY + ["algorithm.name=splitfed_v2", "stop.rounds=1", "data.max_train_samples=24",
                         "data.max_test_samples=8"]


def _rows(cfg):
    with open(f"{cfg.run_dir()}/metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def _finite(rows, *keys):
    return all(math.isfinite(r[k]) for r in rows for k in keys if r.get(k) is not None)


# -- config ---------------------------------------------------------------------------------
def test_precision_defaults_to_fp32_and_takes_bf16():
    assert load_config(None, []).train.precision == "fp32"
    assert load_config(None, ["train.precision=bf16"]).train.precision == "bf16"
    with pytest.raises(ConfigError, match="allowed: 'fp32' or 'bf16'"):
        load_config(None, ["train.precision=fp8"])


def test_fp16_is_refused_before_anything_runs_and_says_why(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.precision='fp16': fp16 needs loss scaling.*use bf16"):
        load_config(None, ["train.precision=fp16"])
    out = subprocess.run([sys.executable, "-m", "sfl_ray.run", "--config", "jobs/quickstart.yaml", "--set",
                          "train.precision=fp16", "--set", f"output.dir={tmp_path}"],
                         capture_output=True, text=True, cwd=Path(__file__).parents[1], timeout=120)
    assert out.returncode == 2, out.stderr
    assert "loss scaling" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())  # nothing written


# -- host <-> device copies -----------------------------------------------------------------
def test_to_device_on_a_cpu_is_the_tensor_itself():
    x = torch.randn(4, 5)
    for t in (x, x.t(), torch.arange(6), x.to(torch.bfloat16)):
        for dev in ("cpu", torch.device("cpu")):
            assert to_device(t, dev) is t
    a = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    a.setflags(write=False)  # as arrays read from the object store are
    t = to_tensor(a)
    assert np.shares_memory(t.numpy(), a) and np.array_equal(t.numpy(), a)


def test_to_tensor_silences_only_the_read_only_warning_and_leaves_the_filters_alone(monkeypatch):
    writable = np.arange(6, dtype=np.float32)
    read_only = writable.copy()
    read_only.setflags(write=False)
    swaps = []  # the process-wide filters are swapped (what other threads see) only for read-only arrays
    real = warnings.catch_warnings
    monkeypatch.setattr(warnings, "catch_warnings", lambda *a, **k: swaps.append(1) or real(*a, **k))
    to_tensor(writable)
    assert swaps == []
    to_tensor(read_only)
    assert swaps == [1]
    monkeypatch.undo()
    before = list(warnings.filters)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for a in (writable, read_only):
            t = to_tensor(a)
            assert np.shares_memory(t.numpy(), a) and np.array_equal(t.numpy(), a)
        warnings.warn("still heard", UserWarning)  # the filters in force are the caller's again
    assert [str(w.message) for w in seen] == ["still heard"]
    assert warnings.filters == before


def test_to_device_to_a_gpu_pins_then_copies_without_blocking():
    calls = []

    class HostTensor:  # records what to_device asks of a CPU tensor bound for a GPU
        device = torch.device("cpu")

        def pin_memory(self):
            calls.append("pin_memory")
            assert _get_current_dispatch_mode() is None  # not measured as the device's memory
            return self

        def to(self, device, non_blocking=False):
            calls.append((str(device), non_blocking))
            return "on the gpu"

    with FlopCounter(on_output=lambda t: None):  # inside a measured client program
        assert to_device(HostTensor(), "cuda") == "on the gpu"
    assert calls == ["pin_memory", ("cuda", True)]
    calls.clear()
    assert to_device(HostTensor(), "cuda:1") == "on the gpu" and calls == ["pin_memory", ("cuda:1", True)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on the test machine)")
def test_on_a_gpu_a_non_blocking_round_trip_is_exact():
    a = np.random.default_rng(0).standard_normal((256, 1024)).astype(np.float32)
    t = to_tensor(a, "cuda")
    assert t.is_cuda and np.array_equal(to_numpy(t * 1), a)  # .cpu() waits for the async copy


def test_bf16_tensors_cross_the_wire_as_float32():
    z = torch.randn(3, 7).to(torch.bfloat16)
    a = to_numpy(z)
    assert a.dtype == np.float32 and np.array_equal(a, z.float().numpy())  # every bf16 is a float32
    wire = pack({"activations": z, "state": {"w": z}, "labels": torch.arange(3)})
    assert wire["activations"].dtype == wire["state"]["w"].dtype == np.float32
    assert wire["labels"].dtype == np.int64


# -- autocast as the runtime applies it -----------------------------------------------------
def _gpt2_parts():
    cfg = load_config(None, TINY)
    return build_parts("gpt2", "block1", (16,), 512, 0, cfg.model)  # a small vocabulary: fast


def _train(parts, x, region: str) -> list[torch.Tensor]:
    """Three Adam steps of the unsplit model: the whole loop inside one autocast region (as a
    client program runs), or autocast around each forward only (torch's recipe)."""
    model = nn.Sequential(parts.device, parts.server)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)

    def step():
        if region == "forward":
            with autocast("bf16", "cpu"):
                loss = task_loss(model(x), x)
        else:
            loss = task_loss(model(x), x)
        opt.zero_grad()
        loss.backward()
        opt.step()

    if region == "program":
        with autocast("bf16", "cpu"):
            for _ in range(3):
                step()
    elif region == "program_with_cache":  # what autocast's default weight cache would do
        with torch.autocast("cpu", dtype=torch.bfloat16):
            for _ in range(3):
                step()
    else:
        for _ in range(3):
            step()
    return [p.detach().clone() for p in model.parameters()]


def test_a_program_under_autocast_equals_autocast_around_each_forward():
    """Autocast wraps whole programs (forward, backward and optimizer steps): with its weight
    cache off this is bit-identical to torch's forward-only recipe. With the cache on, later
    forwards would use the first step's weights: this test would catch it."""
    x = torch.randint(0, 512, (4, 16), generator=torch.Generator().manual_seed(0))
    start = _gpt2_parts()
    params = {}
    for region in ("program", "forward", "program_with_cache", "fp32"):
        parts = _gpt2_parts()
        parts.device.load_state_dict(start.device.state_dict())
        parts.server.load_state_dict(start.server.state_dict())
        params[region] = _train(parts, x, region if region != "fp32" else "none")

    def same(a, b):
        return all(torch.equal(p, q) for p, q in zip(params[a], params[b]))

    assert same("program", "forward")
    assert not same("program", "program_with_cache")
    assert not same("program", "fp32")
    assert all(torch.isfinite(p).all() for p in params["program"])


def test_flops_are_counted_the_same_under_bf16():
    """FLOPs come from shapes (torch's formulas); autocast only adds casts, which cost none."""
    parts = build_parts("cnn", None, (1, 28, 28), 10, 0)
    model = parts.full()
    x, y = torch.randn(8, 1, 28, 28), torch.arange(8)
    flops, losses = {}, {}
    for precision in ("fp32", "bf16"):
        model.zero_grad()
        counter = FlopCounter()
        with counter, autocast(precision, "cpu"):
            loss = task_loss(model(x), y)
            loss.backward()
        flops[precision], losses[precision] = counter.flops, float(loss.detach())
    assert flops["bf16"] == flops["fp32"] > 0
    assert losses["bf16"] != losses["fp32"]  # autocast did run in bf16


def _sites(precision: str) -> dict:
    """What each runtime site computes from the same inputs: a server block's step on fixed
    activations, one FedAvg client program (no server block), an evaluation."""
    from sfl_ray.metrics.evaluate import Evaluator
    from sfl_ray.runtime.launch import make_blueprint
    from sfl_ray.runtime.pool import ClientPool
    from sfl_ray.runtime.server import ServerBlock

    out = {}
    for algo in ("splitfed_v2", "fedavg"):
        cfg = small_config("unused", f"algorithm.name={algo}", f"train.precision={precision}")
        algorithm_cls, data, shards, _ = prepare(cfg)
        bp = make_blueprint(cfg, data)
        parts = bp.build_parts()
        if algo == "splitfed_v2":
            z = np.random.default_rng(0).standard_normal((50, *parts.act_shape)).astype(np.float32)
            reply, info = ServerBlock(algorithm_cls, bp, 0).call(
                "train_step", 0, {"activations": z, "labels": data.train_y[:50]}, {})
            out["server_gradients"], out["server_loss"] = reply["gradients"], info["loss"]
            out["eval"] = Evaluator(parts, data.test_x, data.test_y, 500, bp.precision).evaluate(
                module_weights(parts.device), module_weights(parts.server))
        else:
            pool = ClientPool(algorithm_cls, bp, data.train_x, data.train_y, {0: shards[0]}, [])
            r = pool.run("client_program", 0, 1, {"weights": module_weights(parts.full())})
            assert r.error is None, r.error
            out["client_weights"], out["client_loss"], out["client_flops"] = r.up["weights"], r.info["loss_sum"], r.flops
    return out


def test_client_pools_server_blocks_and_evaluation_each_apply_train_precision():
    fp32, bf16 = _sites("fp32"), _sites("bf16")
    assert bf16["server_gradients"].dtype == np.float32 and np.isfinite(bf16["server_gradients"]).all()
    assert not np.array_equal(bf16["server_gradients"], fp32["server_gradients"])
    assert bf16["server_loss"] != fp32["server_loss"]
    assert bf16["client_loss"] != fp32["client_loss"] and math.isfinite(bf16["client_loss"])
    assert all(w.dtype == fp32["client_weights"][k].dtype for k, w in bf16["client_weights"].items())
    assert any(not np.array_equal(w, fp32["client_weights"][k]) for k, w in bf16["client_weights"].items())
    assert bf16["client_flops"] == fp32["client_flops"] > 0
    assert bf16["eval"]["eval_loss"] != fp32["eval"]["eval_loss"]
    assert abs(bf16["eval"]["eval_loss"] - fp32["eval"]["eval_loss"]) < 0.01  # same weights, rounding only


# -- whole jobs -----------------------------------------------------------------------------
def test_cnn_job_in_bf16_trains_deterministically_with_fp32_bytes_and_flops(run_dir):
    rows, initial = {}, None
    for name, precision in (("fp32", "fp32"), ("bf16", "bf16"), ("bf16_again", "bf16")):
        cfg = small_config(run_dir, *CNN_JOB, f"train.precision={precision}", f"output.name={name}")
        coord, _ = local_coordinator(cfg)
        if precision == "bf16":
            p = coord.evaluator.parts
            initial = coord.evaluator.evaluate(module_weights(p.device), module_weights(p.server))
        coord.run()
        rows[name] = coord.writer.rows
    fp32, bf16 = rows["fp32"], rows["bf16"]
    assert _finite(bf16, "train_loss", "eval_loss", "eval_accuracy")
    assert without_timing(bf16) == without_timing(rows["bf16_again"])
    assert [r["eval_loss"] for r in bf16] != [r["eval_loss"] for r in fp32]
    assert [r["train_loss"] for r in bf16] != [r["train_loss"] for r in fp32]
    assert bf16[-1]["eval_accuracy"] > initial["eval_accuracy"] + 0.2  # it learns
    assert abs(bf16[-1]["eval_accuracy"] - fp32[-1]["eval_accuracy"]) < 0.05  # as fp32 does
    # float32 on the wire, the same ops counted
    for key in ("bytes_by_kind", "bytes_cum", "device_flops", "server_flops"):
        assert [r[key] for r in bf16] == [r[key] for r in fp32], key


def test_one_gpt2_round_in_bf16_differs_from_fp32_only_in_its_numbers(run_dir):
    rows = {}
    for precision in ("fp32", "bf16"):
        cfg = load_config(None, GPT2_ONE_ROUND + ["cluster.backend=local", f"output.dir={run_dir}",
                                                  f"output.name={precision}", f"train.precision={precision}"])
        coord, _ = local_coordinator(cfg)
        coord.run()
        rows[precision] = coord.writer.rows
    fp32, bf16 = rows["fp32"][0], rows["bf16"][0]
    assert _finite([bf16], "train_loss", "eval_loss", "eval_perplexity")
    assert bf16["eval_loss"] != fp32["eval_loss"] and bf16["train_loss"] != fp32["train_loss"]
    assert abs(bf16["eval_loss"] - fp32["eval_loss"]) < 0.05 * fp32["eval_loss"]
    for key in ("bytes_by_kind", "device_flops", "server_flops"):
        assert bf16[key] == fp32[key], key


@pytest.mark.slow
def test_bf16_jobs_give_the_same_bits_on_both_backends(ray_cluster, run_dir):
    """The cnn job and a tiny GPT-2 (3 rounds, perplexity falling) in bf16, local vs Ray."""
    jobs = {"cnn": lambda b: small_config(run_dir, *CNN_JOB, "train.precision=bf16", f"cluster.backend={b}",
                                          "cluster.num_pools=2", f"output.name=cnn-{b}"),
            "gpt2": lambda b: load_config(None, TINY + ["algorithm.name=splitfed_v2", "train.precision=bf16",
                                                        f"cluster.backend={b}", "cluster.num_pools=1",
                                                        f"output.dir={run_dir}", f"output.name=gpt2-{b}"])}
    for job, make in jobs.items():
        rows = {}
        for backend in ("local", "ray"):
            cfg = make(backend)
            algorithm_cls, data, shards, _ = prepare(cfg)
            run_experiment(algorithm_cls, cfg, data, shards)
            rows[backend] = _rows(cfg)
        assert without_timing(rows["ray"]) == without_timing(rows["local"]), job
        assert _finite(rows["ray"], "train_loss", "eval_loss")
    ppl = [r["eval_perplexity"] for r in rows["ray"]]
    assert ppl[-1] < ppl[0]


def _fit_in_process(monkeypatch, precision: str) -> dict:
    """ray_train_fit._loop as a Train worker runs it, with ray.train's worker API stubbed (one
    worker, batches in order): what it reports for one epoch."""
    import ray.train
    import ray.train.torch

    from sfl_ray.runtime import ray_train_fit
    from sfl_ray.runtime.launch import make_blueprint
    from sfl_ray.runtime.server_fit import ServerFit

    cfg = small_config("unused", f"train.precision={precision}")
    _, data, _, _ = prepare(cfg)
    bp = make_blueprint(cfg, data)
    parts = bp.build_parts()
    rng = np.random.default_rng(0)
    z = rng.standard_normal((200, *parts.act_shape)).astype(np.float32)
    y = data.train_y[:200].astype(np.int64)
    owner = np.arange(200) % 4
    req = ServerFit(parts=[(z, y, 0)], init_weights=module_weights(parts.server), epochs=1,
                    batch_size=50, lr=0.1, shuffle=False, seed=0)

    class Shard:
        def iter_torch_batches(self, batch_size, device, **_):
            assert device == "cpu"  # the worker moves batches itself (to_device)
            for i in range(0, len(y), batch_size):
                yield {k: torch.from_numpy(v[i: i + batch_size]) for k, v in
                       (("z", z), ("y", y), ("owner", owner))}

    class Context:
        def get_world_size(self):
            return 1

        def get_world_rank(self):
            return 0

    reports = []
    monkeypatch.setattr(ray.train, "get_dataset_shard", lambda name: Shard())
    monkeypatch.setattr(ray.train, "get_context", lambda: Context())
    monkeypatch.setattr(ray.train, "report", lambda metrics, checkpoint=None: reports.append(metrics))
    monkeypatch.setattr(ray.train, "Checkpoint", type("Checkpoint", (), {"from_directory": staticmethod(str)}))
    monkeypatch.setattr(ray.train.torch, "get_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(ray.train.torch, "prepare_model", lambda m: m)
    ray_train_fit._loop({"blueprint": bp, "request": req})
    return reports[0]


def test_the_ray_train_worker_loop_trains_under_train_precision(monkeypatch):
    from sfl_ray.runtime.server_fit import train_epoch

    got = {p: _fit_in_process(monkeypatch, p) for p in ("fp32", "bf16")}
    assert got["bf16"]["loss_sum"] != got["fp32"]["loss_sum"] and math.isfinite(got["bf16"]["loss_sum"])
    assert got["bf16"]["flops"] == got["fp32"]["flops"] > 0
    # the same epoch outside the worker, under the runtime's autocast: the same bits
    cfg = small_config("unused", "train.precision=bf16")
    _, data, _, _ = prepare(cfg)
    parts = build_parts("cnn", None, data.input_shape, data.num_classes, cfg.seed)
    model = parts.server
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rng = np.random.default_rng(0)
    z = torch.from_numpy(rng.standard_normal((200, *parts.act_shape)).astype(np.float32))
    y = torch.from_numpy(data.train_y[:200].astype(np.int64))
    with autocast("bf16", "cpu"):
        stats = train_epoch(model, opt, ((z[i: i + 50], y[i: i + 50], np.arange(i, i + 50) % 4)
                                         for i in range(0, 200, 50)))
    assert stats["loss_sum"] == got["bf16"]["loss_sum"]


@pytest.mark.slow
def test_ray_train_server_fit_runs_under_bf16(ray_cluster, run_dir):
    """Ampere's server phase on Ray Train (DDP over 2 workers) in bf16: it learns, stays
    finite, and the link carries what it carries in fp32 (float32 activations)."""
    cfg = small_config(run_dir, "algorithm.name=ampere", "algorithm.server_trainer=ray_train",
                       "algorithm.server_epochs=2", "stop.rounds=1", "cluster.backend=ray",
                       "cluster.num_pools=1", "cluster.pool_cpus=1", "cluster.num_servers=2",
                       "cluster.server_cpus=1", "algorithm.server_lr=0.1", "cluster.task_timeout_s=300",
                       "train.precision=bf16", "output.name=ampere-bf16")
    algorithm_cls, data, shards, _ = prepare(cfg)
    run_experiment(algorithm_cls, cfg, data, shards)
    rows = _rows(cfg)
    server = [r["train_loss"] for r in rows if r["phase"] == "server"]
    assert len(server) == 2 and server[-1] < server[0] and _finite(rows, "train_loss", "eval_loss")
    n_train = sum(len(s) for s in shards)
    act = 4 * math.prod(build_parts("cnn", None, data.input_shape, data.num_classes, 0).act_shape)
    assert rows[1]["bytes_by_kind"]["up/activations"] == n_train * act  # float32 on the wire


def test_weights_move_in_and_out_without_a_torch_op_and_exactly():
    """module_weights / load_weights on host tensors go through numpy (no op, so nothing for a
    measuring dispatch mode to see), with copy_'s meaning: cast, in place, the optimizer's
    parameters still the module's; bfloat16 keeps the torch path."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    model(torch.randn(5, 4))  # running statistics and num_batches_tracked move
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen: list = []  # every op output the counter is shown
    counter = FlopCounter(on_output=seen.append)
    with counter:
        out = module_weights(model)
    assert seen == [] and counter.flops == 0
    assert set(out) == set(model.state_dict())
    assert out["1.num_batches_tracked"].dtype == np.int64 and int(out["1.num_batches_tracked"]) == 1
    for n, t in model.state_dict().items():
        assert np.array_equal(out[n], t.numpy()) and not np.shares_memory(out[n], t.numpy())  # a copy

    new = {n: (v + 1.5).astype(np.float64) if v.dtype == np.float32 else v + 2 for n, v in out.items()}
    with counter:
        load_weights(model, new)
    assert seen == []
    for n, t in model.state_dict().items():
        assert t.dtype in (torch.float32, torch.int64)
        assert np.array_equal(t.numpy(), new[n].astype(t.numpy().dtype))  # cast as copy_ casts
    assert opt.param_groups[0]["params"][0] is model[0].weight  # in place: the optimizer's own
    model[0].weight.grad = torch.ones_like(model[0].weight)
    opt.step()
    assert torch.equal(model[0].weight, torch.from_numpy(new["0.weight"].astype(np.float32)) - 0.1)

    half = nn.Linear(2, 2).to(torch.bfloat16)
    w = module_weights(half)
    assert w["weight"].dtype == np.float32  # numpy has no bfloat16: to_numpy's exact float32
    load_weights(half, {k: v * 2 for k, v in w.items()})
    assert half.weight.dtype == torch.bfloat16
    assert torch.equal(half.weight.float(), torch.from_numpy(w["weight"] * 2))
