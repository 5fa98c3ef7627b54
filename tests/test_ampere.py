"""Ampere: activations cross once per training sample, never a gradient, and the server's
batches mix devices."""

import math

from tests.helpers import local_coordinator, small_config


def test_one_transfer_no_gradients_mixed_server_batches(run_dir):
    cfg = small_config(run_dir, "algorithm.name=ampere", "stop.rounds=2", "algorithm.server_epochs=2",
                       "partition.name=shards", "partition.shards_per_client=1", "train.clients_per_round=2")
    coord, ex = local_coordinator(cfg)
    coord.run()
    rows = coord.writer.rows
    assert [r["phase"] for r in rows] == ["device", "device", "transfer", "server", "server"]
    act = 4 * math.prod(coord.evaluator.parts.act_shape)
    n_train = sum(len(s) for s in ex.pool.shards.values())
    up_act = sum(r["bytes_by_kind"].get("up/activations", 0) for r in rows)
    assert up_act == n_train * act  # every training sample's activations, exactly once
    assert rows[2]["bytes_by_kind"]["up/activations"] == up_act and rows[2]["clients"] == 4
    assert not any(k.endswith("gradients") for r in rows for k in r["bytes_by_kind"])
    # device phase: only weights; server phase: nothing crosses the link at all
    assert set(rows[0]["bytes_by_kind"]) == {"down/weights", "down/aux_weights", "up/weights", "up/aux_weights"}
    assert rows[3]["bytes_up"] == rows[3]["bytes_down"] == 0
    # label-sorted shards per device: a device-by-device batch holds one device; consolidated ones mix
    assert rows[3]["server_batch_devices_mean"] > 2.5
    assert rows[-1]["eval_accuracy"] is not None and rows[0]["eval_accuracy"] is None


def test_without_cross_device_shuffle_batches_stay_on_one_device(run_dir):
    cfg = small_config(run_dir, "algorithm.name=ampere", "stop.rounds=1", "algorithm.server_epochs=1",
                       "algorithm.shuffle_across_devices=false")
    coord, _ = local_coordinator(cfg)
    coord.run()
    assert coord.writer.rows[-1]["server_batch_devices_mean"] < 1.2  # the check above can fail


def test_aux_generator_respects_the_budget():
    from sfl_ray.models.aux import AuxConfig, build_aux, head_cost
    for budget in (500, 3000, 20000):
        head = build_aux(AuxConfig(kind="conv", max_params=budget), (32, 7, 7), 10, seed=0)
        params, flops = head_cost(head, (32, 7, 7))
        assert params <= budget
    small = head_cost(build_aux(AuxConfig(kind="conv", max_params=3000), (32, 7, 7), 10, 0), (32, 7, 7))
    big = head_cost(build_aux(AuxConfig(kind="conv", max_params=20000), (32, 7, 7), 10, 0), (32, 7, 7))
    assert big[0] > small[0]  # the widest head that fits is chosen
    flops_cap = build_aux(AuxConfig(kind="mlp", max_flops_per_sample=50000), (32, 7, 7), 10, 0)
    assert head_cost(flops_cap, (32, 7, 7))[1] <= 50000
