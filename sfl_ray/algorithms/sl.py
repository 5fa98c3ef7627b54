"""Vanilla split learning (Vepakomma et al. 2018; Gupta & Raskar 2018): sequential.

One device model is relayed from client to client (through the server: its weights go down to
the next client and come back up); one server block; per batch, activations and labels up and
the cut-layer gradient down. No parallelism: latency grows linearly with the clients.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from sfl_ray.algorithms.common import SplitConfigMixin, client_order
from sfl_ray.algorithms.splitfed_v2 import SplitFedV2
from sfl_ray.runtime.protocol import RoundRuntime, RoundSummary


class SLConfig(SplitConfigMixin):
    name: Literal["sl"] = Field("sl", description="Vanilla sequential split learning.")


class SplitLearning(SplitFedV2):
    """SplitFed v2's halves (one sequential server block, the split client epoch); only the
    schedule differs: a relay instead of FedAvg."""

    name = "sl"
    config_cls = SLConfig

    def run_round(self, rt: RoundRuntime, rnd: int, clients: list[int]) -> RoundSummary:
        for c in client_order(self.blueprint.seed, rnd, clients):
            # The relay: each client starts from the weights the previous client finished with.
            (reply,) = rt.clients([c], {"weights": self.global_device}, parallel=False)
            self.global_device = reply.up["weights"]
        return RoundSummary()
