"""Vanilla split learning (Vepakomma et al. 2018; Gupta & Raskar 2018): sequential.

One device model is relayed from client to client (through the server: its weights go down to
the next client and come back up); one server block; per batch, activations and labels up and
the cut-layer gradient down. No parallelism: latency grows linearly with the clients.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from sfl_ray.algorithms.common import SplitConfigMixin, client_order, split_client_epoch
from sfl_ray.algorithms.splitfed_v2 import SingleServer
from sfl_ray.models.split import ModelParts
from sfl_ray.runtime.protocol import Algorithm, ClientContext, RoundRuntime, RoundSummary
from sfl_ray.runtime.wire import module_weights


class SLConfig(SplitConfigMixin):
    name: Literal["sl"] = Field("sl", description="Vanilla sequential split learning.")


class SplitLearning(Algorithm):
    name = "sl"
    config_cls = SLConfig
    server_cls = SingleServer

    def init_global(self, parts: ModelParts) -> None:
        self.global_device = module_weights(parts.device)

    def client_program(self, ctx: ClientContext, down: dict) -> tuple[dict, dict]:
        return split_client_epoch(ctx, down)

    def run_round(self, rt: RoundRuntime, rnd: int, clients: list[int]) -> RoundSummary:
        for c in client_order(self.blueprint.seed, rnd, clients):
            # The relay: each client starts from the weights the previous client finished with.
            (reply,) = rt.clients([c], {"weights": self.global_device}, parallel=False)
            self.global_device = reply.up["weights"]
        return RoundSummary()

    def eval_weights(self, rt: RoundRuntime) -> tuple[dict, dict]:
        return self.global_device, rt.server("get_weights")
