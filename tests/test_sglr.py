"""SGLR: SplitLr (server lr = client lr x N^alpha), SplitAvg (one mean cut gradient for the
active clients, during the averaging phase only), separate device blocks, no weights on the link."""

import math

import numpy as np
import pytest
import torch

import sfl_ray.data
from sfl_ray.algorithms.sglr import SGLR
from tests.helpers import local_coordinator, small_config


@pytest.fixture(autouse=True, scope="module")
def _load_each_data_set_once():
    """Decoding the built-in MNIST takes seconds; these tests build many small experiments on it."""
    real, cache = sfl_ray.data.load_source, {}

    def load(cfg):
        key = cfg.model_dump_json()
        if key not in cache:
            cache[key] = real(cfg)
        return cache[key]

    sfl_ray.data.load_source = load
    yield
    sfl_ray.data.load_source = real


def _sglr(run_dir, *overrides):
    """4 clients x 200 samples (iid), batch 50: 4 full batches per client per round."""
    cfg = small_config(run_dir, "algorithm.name=sglr", "partition.name=iid", *overrides)
    coord, ex = local_coordinator(cfg)
    coord.algorithm.init_global(coord.evaluator.parts)
    return cfg, coord, ex


def _spy_downs(ex, program="sglr_backward"):
    """Record (client, down) of every run of `program`, in order; what came by reference
    (the server's gradients, runtime.bulk) as the pool fetches it."""
    from sfl_ray.runtime.bulk import local_fetch, resolve
    seen, real = [], ex.pool.run

    def run(prog, client, rnd, down, *measure):
        if prog == program:
            seen.append((client, resolve(down, local_fetch, decoded=False)))
        return real(prog, client, rnd, down, *measure)

    ex.pool.run = run
    return seen


def _iterations(seen, n):
    return [seen[i:i + n] for i in range(0, len(seen), n)]


def _act_bytes(coord):
    return 4 * math.prod(coord.evaluator.parts.act_shape)


def test_phi_one_broadcasts_one_mean_gradient(run_dir):
    cfg, coord, ex = _sglr(run_dir, "algorithm.phi=1.0", "algorithm.averaging_fraction_of_training=1.0",
                           "algorithm.weighted=false")
    program = ex.servers[0].program
    slices, real_step = [], program.step

    def step(batches, lr):
        out = real_step(batches, lr)
        slices.append(out[0])
        return out

    program.step = step
    seen = _spy_downs(ex)
    row = coord.run_one_round(1)
    assert row["phase"] == "splitavg" and row["iterations"] == 4
    assert len(slices) == 4 and len(seen) == 16
    for it, own in zip(_iterations(seen, 4), slices):
        assert [c for c, _ in it] == [0, 1, 2, 3]
        first = it[0][1]["gradients"]
        assert all(d["gradients"] is first for _, d in it)  # one tensor, sent to every active client
        np.testing.assert_allclose(first, np.mean([own[c] for c in range(4)], axis=0), rtol=1e-5, atol=1e-9)
        assert not np.array_equal(own[0], own[1])  # the server's own slices did differ
    # each client still downloads the whole slice-shaped gradient of every batch
    assert row["bytes_by_kind"]["down/gradients"] == 4 * 4 * cfg.train.batch_size * _act_bytes(coord)
    # the server sends the mean once per iteration
    assert row["server_gradient_send_bytes"] == 4 * cfg.train.batch_size * _act_bytes(coord)


def test_without_averaging_every_client_gets_its_own_gradient(run_dir):
    _, coord, ex = _sglr(run_dir, "algorithm.phi=0.5", "algorithm.averaging_fraction_of_training=0.0")
    seen = _spy_downs(ex)
    row = coord.run_one_round(1)
    assert row["phase"] == "own_gradients"
    for it in _iterations(seen, 4):
        g = [d["gradients"] for _, d in it]
        assert all(not np.array_equal(g[i], g[j]) for i in range(4) for j in range(i + 1, 4))


def test_phi_half_averages_a_fresh_random_half_each_iteration(run_dir):
    _, coord, ex = _sglr(run_dir, "algorithm.phi=0.5", "algorithm.averaging_fraction_of_training=1.0")
    seen = _spy_downs(ex)
    coord.run_one_round(1)
    actives = []
    for it in _iterations(seen, 4):
        g = {c: d["gradients"] for c, d in it}
        shared = sorted(c for c in g if sum(g[c] is g[o] for o in g) == 2)
        assert len(shared) == 2  # ceil(0.5 x 4) active clients share one array
        others = [c for c in g if c not in shared]
        assert not np.array_equal(g[others[0]], g[others[1]])
        actives.append(tuple(shared))
    assert len(set(actives)) > 1  # resampled every iteration


def test_averaging_phase_is_a_fraction_of_total_rounds(run_dir):
    cfg, coord, _ = _sglr(run_dir, "algorithm.total_rounds=10")
    # the default is the official code's schedule: lr_pow 1, every client averaged for comm_flag=0.6
    assert cfg.algorithm.schedule == "official"
    assert cfg.algorithm.averaging_fraction_of_training == 0.6 and cfg.algorithm.averaging_phase == "initial"
    assert cfg.algorithm.phi == 1.0 and cfg.algorithm.alpha == 1.0
    algo: SGLR = coord.algorithm
    assert [algo.averaging_in(r) for r in range(1, 11)] == [True] * 6 + [False] * 4
    algo.config.averaging_phase = "final"
    assert [algo.averaging_in(r) for r in range(1, 11)] == [False] * 4 + [True] * 6
    algo.config.total_rounds, algo.config.averaging_fraction_of_training = 5, 0.5  # ceil(2.5): 3 rounds
    assert [algo.averaging_in(r) for r in range(1, 6)] == [False] * 2 + [True] * 3
    algo.config.averaging_phase = "initial"
    assert [algo.averaging_in(r) for r in range(1, 6)] == [True] * 3 + [False] * 2
    algo.config.averaging_fraction_of_training = 0.0
    assert not any(algo.averaging_in(r) for r in range(1, 6))
    algo.config.averaging_fraction_of_training = 1.0
    assert all(algo.averaging_in(r) for r in range(1, 13))


@pytest.mark.parametrize("reduction", ["mean_over_concat", "mean_per_client"])
def test_one_client_sglr_equals_sl(run_dir, reduction):
    common = ["train.num_clients=1", "stop.rounds=2", "data.max_train_samples=300", "train.batch_size=32",
              "train.lr=0.1"]  # 300 = 9 x 32 + 12: a short last batch too
    sl_cfg = small_config(run_dir + "/sl", "algorithm.name=sl", *common)
    sl, sl_ex = local_coordinator(sl_cfg)
    sl.run()
    cfg = small_config(run_dir + "/sglr", "algorithm.name=sglr", "algorithm.alpha=0.7", "algorithm.phi=1.0",
                       f"algorithm.loss_reduction={reduction}", *common)
    sg, sg_ex = local_coordinator(cfg)
    sg.run()
    for k, v in sl.algorithm.global_device.items():
        torch.testing.assert_close(torch.from_numpy(sg.algorithm.global_device[k]), torch.from_numpy(v),
                                   rtol=1e-5, atol=1e-6)
    own = sg_ex.pool.state[0]["model"].state_dict()
    for k, v in sl.algorithm.global_device.items():
        torch.testing.assert_close(own[k], torch.from_numpy(v), rtol=1e-5, atol=1e-6)
    server_sl, server_sg = sl_ex.servers[0].program.model.state_dict(), sg_ex.servers[0].program.model.state_dict()
    for k, v in server_sl.items():
        torch.testing.assert_close(server_sg[k], v, rtol=1e-5, atol=1e-6)
    for a, b in zip(sl.writer.rows, sg.writer.rows):
        assert a["bytes_by_kind"]["up/activations"] == b["bytes_by_kind"]["up/activations"]
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)


@pytest.mark.parametrize("alpha, factor", [(0.5, 2.0), (1.0, 4.0), (0.0, 1.0)])
def test_server_lr_is_client_lr_times_n_to_the_alpha(run_dir, alpha, factor):
    # momentum: the client's optimizer then has state, kept between programs (plain SGD keeps none)
    cfg, coord, ex = _sglr(run_dir, f"algorithm.alpha={alpha}", "data.max_train_samples=400", "train.momentum=0.9")
    row = coord.run_one_round(1)
    lrs = [g["lr"] for g in ex.servers[0].program.opt.param_groups]
    assert lrs == [pytest.approx(factor * cfg.train.lr)]
    assert row["server_lr"] == pytest.approx(factor * cfg.train.lr)
    _, client_opt = ex.pool.state[0]["optim/device"]
    assert client_opt["param_groups"][0]["lr"] == cfg.train.lr  # the client lr is unchanged


def test_bytes_are_activations_labels_and_gradients_only(run_dir):
    # unequal shards and short last batches (310 samples / 3 clients, batch 32), averaging on
    cfg = small_config(run_dir, "algorithm.name=sglr", "train.num_clients=3", "data.max_train_samples=310",
                       "train.batch_size=32", "algorithm.phi=1.0", "algorithm.averaging_fraction_of_training=1.0")
    coord, ex = local_coordinator(cfg)
    coord.algorithm.init_global(coord.evaluator.parts)
    row = coord.run_one_round(1)
    n = sum(len(ex.pool.shards[c]) for c in range(3))
    assert n == 310
    act = _act_bytes(coord)
    assert row["bytes_by_kind"] == {"up/activations": n * act, "up/labels": n * 8, "down/gradients": n * act}
    assert row["bytes_up"] == n * (act + 8) and row["bytes_down"] == n * act
    assert row["iterations"] == max(math.ceil(len(ex.pool.shards[c]) / 32) for c in range(3))


def test_clients_keep_separate_device_blocks(run_dir):
    _, coord, ex = _sglr(run_dir, "algorithm.phi=1.0", "algorithm.averaging_fraction_of_training=1.0",
                         "algorithm.eval_model=client0")
    init = {k: v.copy() for k, v in coord.algorithm.global_device.items()}
    coord.run_one_round(1)
    blocks = [ex.pool.state[c]["model"].state_dict() for c in range(4)]
    key = next(k for k in blocks[0] if k.endswith("weight"))
    assert not torch.equal(blocks[0][key], blocks[1][key])  # same mean gradient, own inputs
    assert not np.array_equal(blocks[0][key].numpy(), init[key])
    assert ex.pool.state[0]["model"] is not ex.pool.parts.device  # the pool's shared block stays untouched
    np.testing.assert_array_equal(ex.pool.parts.device.state_dict()[key].numpy(), init[key])
    # eval_model=client0 evaluates the round's first client's block
    np.testing.assert_array_equal(coord.algorithm.global_device[key], blocks[0][key].numpy())


def test_eval_model_mean_is_the_mean_of_the_clients_blocks(run_dir):
    _, coord, ex = _sglr(run_dir, "algorithm.eval_model=mean", "algorithm.weighted=false")
    coord.run_one_round(1)
    for k, v in coord.algorithm.global_device.items():
        if np.issubdtype(v.dtype, np.floating):
            expect = np.mean([ex.pool.state[c]["model"].state_dict()[k].double().numpy() for c in range(4)], axis=0)
            np.testing.assert_allclose(v, expect, rtol=1e-5, atol=1e-7)


def test_mean_per_client_sends_each_client_its_own_mean_loss_gradient(run_dir):
    grads, servers = {}, {}
    for reduction in ("mean_over_concat", "mean_per_client"):
        _, coord, ex = _sglr(run_dir + reduction, f"algorithm.loss_reduction={reduction}")
        shape = coord.evaluator.parts.act_shape
        z = torch.randn(100, *shape, generator=torch.Generator().manual_seed(0))
        y = torch.arange(100) % 10
        program = ex.servers[0].program
        batches = {c: {"activations": z[c * 50:(c + 1) * 50].numpy(), "labels": y[c * 50:(c + 1) * 50].numpy()}
                   for c in range(2)}
        grads[reduction], _, _ = program.step(batches, 0.1)
        servers[reduction] = program.get_weights()
    for c in range(2):
        np.testing.assert_allclose(grads["mean_per_client"][c], 2 * grads["mean_over_concat"][c], rtol=1e-5, atol=1e-9)
    for k, v in servers["mean_over_concat"].items():  # equal batches: the same server step
        np.testing.assert_allclose(servers["mean_per_client"][k], v, rtol=1e-5, atol=1e-7)


def test_a_short_run_learns_and_is_deterministic(run_dir):
    args = ["algorithm.name=sglr", "train.optimizer=adam", "train.lr=0.003", "algorithm.total_rounds=2",
            "algorithm.averaging_fraction_of_training=0.5"]
    cfg = small_config(run_dir, *args)
    coord, _ = local_coordinator(cfg)
    coord.run()
    rows = coord.writer.rows
    assert rows[1]["train_loss"] < rows[0]["train_loss"]
    assert [r["phase"] for r in rows] == ["splitavg", "own_gradients"]  # the initial half of 2 rounds
    assert rows[-1]["eval_accuracy"] > 0.3
    again, _ = local_coordinator(small_config(run_dir + "2", *args))
    again.run()
    for a, b in zip(rows, again.writer.rows):
        assert a["train_loss"] == b["train_loss"] and a["eval_accuracy"] == b["eval_accuracy"]
        assert a["bytes_by_kind"] == b["bytes_by_kind"]


@pytest.mark.parametrize("schedule, expected", [
    ("official", (1.0, 1.0, 0.6, "initial")), ("table2", (0.5, 0.5, 1.0, "initial")),
    ("psl", (0.0, 0.0, 0.0, "initial"))])
def test_named_schedules(run_dir, schedule, expected):
    cfg = small_config(run_dir, "algorithm.name=sglr", f"algorithm.schedule={schedule}")
    a = cfg.algorithm
    assert (a.alpha, a.phi, a.averaging_fraction_of_training, a.averaging_phase) == expected


def test_setting_a_knob_alone_means_custom_and_a_conflict_is_refused(run_dir):
    from sfl_ray.config_base import ConfigError
    a = small_config(run_dir, "algorithm.name=sglr", "algorithm.phi=0.25").algorithm
    assert (a.schedule, a.phi, a.alpha) == ("custom", 0.25, 1.0)
    with pytest.raises(ConfigError, match="schedule=custom"):
        small_config(run_dir, "algorithm.name=sglr", "algorithm.schedule=table2", "algorithm.phi=1.0")


def test_rows_say_which_block_is_evaluated(run_dir):
    _, coord, _ = _sglr(run_dir)
    assert coord.run_one_round(1)["eval_model"] == "mean"


def test_device_memory_is_measured_over_a_whole_iteration_with_adam(run_dir):
    """Forward and backward are separate programs; measured as one iteration the peak holds the
    saved activations, the gradients and the (restored) Adam state together, so it is at least
    SplitFed v2's for the same model, batch and optimizer."""
    common = ["train.num_clients=2", "data.max_train_samples=200", "train.batch_size=50", "train.optimizer=adam",
              "train.lr=0.001", "stop.rounds=2"]
    peaks = {}
    for algo in ("splitfed_v2", "sglr"):
        coord, _ = local_coordinator(small_config(f"{run_dir}/{algo}", f"algorithm.name={algo}", *common))
        coord.run()
        peaks[algo] = [r["device_peak_mem_bytes"] for r in coord.writer.rows]
    assert all(s >= f for s, f in zip(peaks["sglr"], peaks["splitfed_v2"])), peaks
