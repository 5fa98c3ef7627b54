"""Turn measured FLOPs and bytes into a simulated round time under a device/network profile.

A client's time = its FLOPs / device FLOP/s + uplink bytes / uplink + downlink bytes /
downlink + latency per message. Clients dispatched together in parallel take the time of the
slowest; clients run in sequence add up. The server's FLOPs / server FLOP/s is added.
"""

from __future__ import annotations

from typing import Sequence


def client_time(flops: int, bytes_up: int, bytes_down: int, messages: int, profile) -> float:
    """Seconds one client spends on one program run."""
    return (flops / profile.device_flops_per_s + bytes_up / profile.uplink_bytes_per_s
            + bytes_down / profile.downlink_bytes_per_s + messages * profile.latency_s)


def group_time(times: Sequence[float], parallel: bool) -> float:
    """Clients dispatched together: the slowest if parallel, the sum if sequential."""
    if not times:
        return 0.0
    return max(times) if parallel else float(sum(times))


def server_time(flops: int, profile) -> float:
    return flops / profile.server_flops_per_s
