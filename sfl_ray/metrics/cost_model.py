"""Turn measured FLOPs and bytes into a simulated round time under device/network profiles.

A client's time = its FLOPs / its FLOP/s + uplink bytes / its uplink + downlink bytes / its
downlink + latency per message. Profiles may differ per client (heterogeneity by a seeded
lognormal draw or by a list). Clients dispatched together in parallel take the time of the
slowest; clients run in sequence add up. The server's FLOPs / server FLOP/s is added.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from sfl_ray.seeding import np_rng


class DeviceProfiles:
    """Per-client compute and network speed multipliers on top of the default profile."""

    def __init__(self, cfg, num_clients: int, seed: int):
        self.cfg = cfg
        if cfg.heterogeneity == "lognormal":
            rng = np_rng(seed, "device_profiles")
            self.compute = np.exp(rng.normal(0.0, cfg.sigma, num_clients))
            self.network = np.exp(rng.normal(0.0, cfg.sigma, num_clients))
        elif cfg.heterogeneity == "list":
            def cycled(v):
                return np.resize(np.asarray(v or [1.0], float), num_clients)
            self.compute, self.network = cycled(cfg.compute_speed), cycled(cfg.network_speed)
        else:
            self.compute = self.network = np.ones(num_clients)

    def client_time(self, client: int, flops: int, bytes_up: int, bytes_down: int, messages: int) -> float:
        """Seconds one client spends on one program run."""
        c, n, p = self.compute[client], self.network[client], self.cfg
        return float(flops / (p.device_flops_per_s * c) + bytes_up / (p.uplink_bytes_per_s * n)
                + bytes_down / (p.downlink_bytes_per_s * n) + messages * p.latency_s)


def group_time(times: Sequence[float], parallel: bool) -> float:
    """Clients dispatched together: the slowest if parallel, the sum if sequential."""
    if not times:
        return 0.0
    return max(times) if parallel else float(sum(times))


def server_time(flops: int, profile) -> float:
    return flops / profile.server_flops_per_s
