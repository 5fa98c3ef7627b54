"""CSE-FSL (Mu & Shen, ICC 2023; arXiv 2302.05599): communication- and storage-efficient FSL.

Each device trains its block and an auxiliary head with a local loss: no gradient ever comes
back from the server. Smashed data (+ labels) go up once per `upload_every` batches and train
ONE lazily updated server block. Device blocks and auxiliary heads are FedAvg'd each round.

Per client per round: (device + aux weights) down and up, ceil(K / upload_every) uploads of
activations + labels, nothing else.
"""

from __future__ import annotations

from typing import Literal

import torch.nn as nn
from pydantic import Field

from sfl_ray.models.task import task_loss
from sfl_ray.config_base import MAX_RATE
from sfl_ray.algorithms.common import (BufferedServer, SplitConfigMixin, client_order, fedavg_replies,
                                       upload_batches)
from sfl_ray.models.aux import AuxConfig, build_aux
from sfl_ray.models.split import ModelParts
from sfl_ray.runtime.protocol import Algorithm, ClientContext, RoundRuntime, RoundSummary
from sfl_ray.runtime.wire import load_weights, module_weights


class CSEFSLConfig(SplitConfigMixin):
    name: Literal["cse_fsl"] = Field("cse_fsl", description="CSE-FSL: aux local loss, lazy single server.")
    upload_every: int = Field(5, gt=0, description="h: one smashed-data upload per h local batches.")
    upload_phase: Literal["first", "last"] = Field(
        "first", description="Upload the first (FSL-SAGE re-implementation) or last (original code) batch of each chunk.")
    aux: AuxConfig = Field(AuxConfig(kind="linear"), description="The auxiliary head on the device "
                           "(linear: Flatten + Linear, as the original CSE-FSL code).")
    server_lr: float | None = Field(None, gt=0, le=MAX_RATE,
                                    description="Server learning rate (at most 1e38); None = train.lr.")


class AuxHeadMixin:
    """Builds the auxiliary head once per process (pool or coordinator), like the pool's blocks."""

    _aux_module: nn.Module | None = None

    def build_client_modules(self, parts) -> None:
        self.aux_module(parts)

    def aux_module(self, parts) -> nn.Module:
        if self._aux_module is None:
            bp = self.blueprint
            self._aux_module = build_aux(self.config.aux, parts.act_shape, bp.num_classes, bp.seed,
                                         parts.aux_factory, server=parts.server).to(parts.device_of())
        return self._aux_module


def local_loss_program(ctx: ClientContext, down: dict, aux: nn.Module, upload_every: int | None,
                       upload_phase: str = "first") -> tuple[dict, dict]:
    """Train device block + aux head with the aux's local loss; optionally upload the smashed
    data of one batch per `upload_every` (CSE-FSL). Returns both modules' weights."""
    device = ctx.parts.device
    load_weights(device, down["weights"])
    load_weights(aux, down["aux_weights"])
    device.train(), aux.train()
    opt = ctx.optimizer([device, aux], key="device+aux")
    loss_sum, count, k_total = 0.0, 0, ctx.num_batches()
    for epoch in range(ctx.train.local_epochs):
        for k, (x, y) in enumerate(ctx.batches(epoch)):
            z = device(x)  # (B, *act_shape) smashed activations
            if upload_every and upload_batches(k, k_total, upload_every, upload_phase):
                ctx.link.call("upload", {"activations": z, "labels": y})  # nothing comes back
            loss = task_loss(aux(z), y)  # the local loss replaces the server's gradient
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss_sum += float(loss.detach()) * len(y)
            count += len(y)
    return ({"weights": module_weights(device), "aux_weights": module_weights(aux)},
            {"num_samples": ctx.num_samples, "loss_sum": loss_sum, "loss_count": count})


class CSEFSL(AuxHeadMixin, Algorithm):
    name = "cse_fsl"
    config_cls = CSEFSLConfig
    server_cls = BufferedServer

    def init_global(self, parts: ModelParts) -> None:
        self.global_device = module_weights(parts.device)
        self.global_aux = module_weights(self.aux_module(parts))

    def client_program(self, ctx: ClientContext, down: dict) -> tuple[dict, dict]:
        return local_loss_program(ctx, down, self.aux_module(ctx.parts),
                                  self.config.upload_every, self.config.upload_phase)

    def run_round(self, rt: RoundRuntime, rnd: int, clients: list[int]) -> RoundSummary:
        replies = rt.clients(clients, {"weights": self.global_device, "aux_weights": self.global_aux})
        server = rt.server("train_uploads", client_order(self.blueprint.seed, rnd, clients))
        self.global_device = fedavg_replies(replies, "weights", self.config.weighted)
        self.global_aux = fedavg_replies(replies, "aux_weights", self.config.weighted)
        return RoundSummary(extra=server)

    def eval_weights(self, rt: RoundRuntime) -> tuple[dict, dict]:
        return self.global_device, rt.server("get_weights")
