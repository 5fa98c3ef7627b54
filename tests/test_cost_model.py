"""Simulated time: per-client profiles, parallel = slowest, sequential = sum."""

import pytest

from sfl_ray.config import CostModelConfig
from sfl_ray.metrics.cost_model import DeviceProfiles, group_time
from tests.helpers import local_coordinator, small_config


def test_client_time_is_compute_plus_transfer_plus_latency():
    cfg = CostModelConfig(device_flops_per_s=1e9, uplink_bytes_per_s=1e6, downlink_bytes_per_s=2e6, latency_s=0.01)
    p = DeviceProfiles(cfg, 3, seed=0)
    assert p.client_time(1, 2e9, 3e6, 4e6, 5) == pytest.approx(2 + 3 + 2 + 0.05)
    slow = DeviceProfiles(cfg.model_copy(update={"heterogeneity": "list", "compute_speed": [1, 0.5],
                                                 "network_speed": [1, 0.25]}), 3, seed=0)
    assert slow.client_time(1, 2e9, 3e6, 4e6, 5) == pytest.approx(4 + 12 + 8 + 0.05)
    assert slow.client_time(2, 2e9, 3e6, 4e6, 5) == pytest.approx(2 + 3 + 2 + 0.05)  # cycled: client 2 = first entry


def test_lognormal_profiles_are_seeded_and_spread():
    cfg = CostModelConfig(heterogeneity="lognormal", sigma=0.8)
    a, b, c = DeviceProfiles(cfg, 50, 1), DeviceProfiles(cfg, 50, 1), DeviceProfiles(cfg, 50, 2)
    assert (a.compute == b.compute).all() and not (a.compute == c.compute).all()
    assert a.compute.max() / a.compute.min() > 3


def test_group_time_parallel_is_max_sequential_is_sum():
    assert group_time([1.0, 3.0, 2.0], parallel=True) == 3.0
    assert group_time([1.0, 3.0, 2.0], parallel=False) == 6.0


def test_a_slow_device_slows_a_parallel_round(run_dir):
    rows = {}
    for name, extra in (("even", []), ("slow", ["cost_model.heterogeneity=list", "cost_model.compute_speed=[1,1,1,0.01]"])):
        cfg = small_config(run_dir, "algorithm.name=fedavg", "stop.rounds=1", f"output.name={name}", *extra)
        coord, _ = local_coordinator(cfg)
        coord.run()
        rows[name] = coord.writer.rows[0]
    assert rows["slow"]["device_flops"] == rows["even"]["device_flops"]
    assert rows["slow"]["sim_s"] > 5 * rows["even"]["sim_s"]
