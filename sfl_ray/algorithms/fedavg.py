"""FedAvg (McMahan et al. 2017): the whole model trains on the device; the reference point.

Per client per round: the global model down, the trained model up; no activations, no server.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from sfl_ray.models.task import task_loss
from sfl_ray.algorithms.common import SplitConfigMixin, fedavg_replies, split_weights
from sfl_ray.models.split import ModelParts
from sfl_ray.runtime.protocol import Algorithm, ClientContext, RoundRuntime, RoundSummary
from sfl_ray.runtime.wire import load_weights, module_weights


class FedAvgConfig(SplitConfigMixin):
    name: Literal["fedavg"] = Field("fedavg", description="Federated averaging of the whole model.")


class FedAvg(Algorithm):
    name = "fedavg"
    config_cls = FedAvgConfig
    server_cls = None  # no server block: the whole model is on the device
    portable_programs = frozenset({"client_program"})  # weights in, weights out; state: its optimizer only

    def init_global(self, parts: ModelParts) -> None:
        self.global_model = module_weights(parts.full())

    def client_program(self, ctx: ClientContext, down: dict) -> tuple[dict, dict]:
        model = ctx.parts.full()
        load_weights(model, down["weights"])
        model.train()
        opt = ctx.optimizer([model], key="model")
        loss_sum, count = 0.0, 0
        for epoch in range(ctx.train.local_epochs):
            for x, y in ctx.batches(epoch):
                loss = task_loss(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                loss_sum += float(loss.detach()) * len(y)
                count += len(y)
        return {"weights": module_weights(model)}, {"num_samples": ctx.num_samples, "loss_sum": loss_sum,
                                                    "loss_count": count}

    def run_round(self, rt: RoundRuntime, rnd: int, clients: list[int]) -> RoundSummary:
        replies = rt.clients(clients, {"weights": self.global_model}, parallel=True)
        self.global_model = fedavg_replies(replies, "weights", self.config.weighted)
        return RoundSummary()

    def eval_weights(self, rt: RoundRuntime) -> tuple[dict, dict]:
        return split_weights(self.global_model)
