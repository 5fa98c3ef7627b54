"""SplitFed v2 (Thapa et al., AAAI 2022): one server block trained sequentially on the clients'
activations as they arrive (clients in a random order), FedAvg of the device blocks per round.

Per client per round: device weights down, (activations + labels up, gradients down) per
batch, device weights up.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from sfl_ray.algorithms.common import (SplitConfigMixin, client_order, fedavg_replies, server_step,
                                       split_client_epoch)
from sfl_ray.models.split import ModelParts
from sfl_ray.runtime.protocol import Algorithm, ClientContext, RoundRuntime, RoundSummary, ServerProgram
from sfl_ray.runtime.wire import module_weights


class SplitFedV2Config(SplitConfigMixin):
    name: Literal["splitfed_v2"] = Field("splitfed_v2", description="SplitFed v2: one sequential server block.")


class SingleServer(ServerProgram):
    """One server block with a persistent optimizer, stepped once per received batch."""

    flops_by_shape = frozenset({"train_step"})

    def __init__(self, ctx):
        super().__init__(ctx)
        self.model = ctx.build_parts().server
        self.opt = ctx.optimizer([self.model])

    def train_step(self, client: int, arrays: dict, info: dict) -> tuple[dict, dict]:
        return server_step(self.model, self.opt, arrays, self.ctx.after_reply)

    def get_weights(self) -> dict:
        return module_weights(self.model)


class SplitFedV2(Algorithm):
    name = "splitfed_v2"
    config_cls = SplitFedV2Config
    server_cls = SingleServer

    def init_global(self, parts: ModelParts) -> None:
        self.global_device = module_weights(parts.device)

    def client_program(self, ctx: ClientContext, down: dict) -> tuple[dict, dict]:
        return split_client_epoch(ctx, down)

    def run_round(self, rt: RoundRuntime, rnd: int, clients: list[int]) -> RoundSummary:
        # The single server block sees one client's batches at a time, in a random order.
        order = client_order(self.blueprint.seed, rnd, clients)
        replies = rt.clients(order, {"weights": self.global_device}, parallel=False)
        self.global_device = fedavg_replies(replies, "weights", self.config.weighted)
        return RoundSummary()

    def eval_weights(self, rt: RoundRuntime) -> tuple[dict, dict]:
        return self.global_device, rt.server("get_weights")
