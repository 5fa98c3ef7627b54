"""Bytes on the link equal the analytic count: activations + labels up, gradients down, weights both ways."""

import math

import pytest

from tests.helpers import local_coordinator, small_config


@pytest.mark.parametrize("algo", ["splitfed_v1", "splitfed_v2", "sl"])
def test_split_bytes_match_the_analytic_count(run_dir, algo):
    cfg = small_config(run_dir, f"algorithm.name={algo}", "train.num_clients=3", "stop.rounds=1",
                       "data.max_train_samples=310", "train.batch_size=32")
    coord, ex = local_coordinator(cfg)
    coord.algorithm.init_global(coord.evaluator.parts)
    row = coord.run_one_round(1)
    parts = coord.evaluator.parts
    act_bytes = 4 * math.prod(parts.act_shape)  # fp32 per sample
    w_bytes = sum(v.numel() * v.element_size() for v in parts.device.state_dict().values())
    n = [len(ex.pool.shards[c]) for c in range(3)]
    assert sum(n) == 310
    N = sum(n)
    expect_up = N * act_bytes + N * 8 + 3 * w_bytes   # activations, int64 labels, device weights up
    expect_down = N * act_bytes + 3 * w_bytes          # gradients (same shape), device weights down
    assert row["bytes_up"] == expect_up
    assert row["bytes_down"] == expect_down
    assert row["bytes_by_kind"]["up/activations"] == N * act_bytes
    assert row["bytes_by_kind"]["down/gradients"] == N * act_bytes
    assert row["bytes_by_kind"]["up/labels"] == N * 8
    assert sum(row["bytes_by_kind"].values()) == row["bytes_up"] + row["bytes_down"]
    assert row["bytes_cum"] == expect_up + expect_down


def test_fedavg_moves_only_whole_model_weights(run_dir):
    cfg = small_config(run_dir, "algorithm.name=fedavg", "train.num_clients=3", "stop.rounds=1")
    coord, _ = local_coordinator(cfg)
    coord.algorithm.init_global(coord.evaluator.parts)
    row = coord.run_one_round(1)
    full = sum(v.numel() * 4 for v in coord.evaluator.parts.full().state_dict().values())
    assert row["bytes_by_kind"] == {"down/weights": 3 * full, "up/weights": 3 * full}


def test_device_cost_is_measured(run_dir):
    cfg = small_config(run_dir, "algorithm.name=splitfed_v2", "train.num_clients=2", "stop.rounds=1")
    coord, _ = local_coordinator(cfg)
    coord.algorithm.init_global(coord.evaluator.parts)
    row = coord.run_one_round(1)
    parts = coord.evaluator.parts
    params = sum(p.numel() * 4 for p in parts.device.parameters())
    # weights + grads at least, plus the activations saved for backward of one batch
    assert row["device_peak_mem_bytes"] > 2 * params
    assert row["device_flops"] > 0 and row["server_flops"] > 0
    assert row["sim_s"] > 0


def test_memory_tracker_counts_live_activations_and_releases_them():
    import torch
    import torch.nn as nn
    from sfl_ray.metrics.device_cost import MemoryTracker

    lin = nn.Linear(1000, 1000, bias=False)
    tr = MemoryTracker()
    tr.track_module(lin)
    x = torch.randn(64, 1000)
    with tr.watching(), torch.no_grad():
        for _ in range(3):  # each output dies before the next: the peak is one output, not three
            y = lin(x)
            del y
    assert tr.weights_bytes == 1000 * 1000 * 4
    assert tr.live_peak == 64 * 1000 * 4
    assert tr.live == 0 and tr.saved_count == 0
    tr2 = MemoryTracker()
    tr2.track_module(lin)
    with tr2.watching():
        lin(x).sum().backward()  # the grad (weight-sized) and the saved input are live
    assert tr2.saved_count >= 1
    assert tr2.live_peak >= 1000 * 1000 * 4
