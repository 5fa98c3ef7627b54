"""FedProx (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020) as an
sfl_ray plug-in: one file, registered by decorator, nothing in sfl_ray edited.

FedAvg with a proximal term: client k minimises F_k(w) + mu/2 * ||w - w_t||^2 around the
round's global model w_t, which keeps its weights from drifting far on non-IID data. As the
reference code (litian96/FedProx, PerturbedGradientDescent) does, the term enters as its
gradient, mu * (w - w_t), added before each SGD step. mu = 0 is FedAvg, bit for bit: the
anchor copy is then not even made. Not modelled: FedProx's variable local work per client
(gamma-inexact solutions, stragglers); every client runs train.local_epochs.

Use it from a script (`import sfl_fedprox`, then run as usual), with
`SFL_RAY_PLUGINS=examples/fedprox/sfl_fedprox.py python -m sfl_ray.run --config
examples/fedprox/fedprox.yaml`, or install this folder (`pip install -e examples/fedprox`):
its entry point registers it in every process that looks an algorithm up.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field

from sfl_ray import register_algorithm
from sfl_ray.algorithms.common import fedavg_replies
from sfl_ray.algorithms.fedavg import FedAvg
from sfl_ray.config_base import MAX_RATE, Section
from sfl_ray.models.task import task_loss
from sfl_ray.runtime.protocol import ClientContext, RoundRuntime, RoundSummary
from sfl_ray.runtime.wire import load_weights, module_weights


class FedProxConfig(Section):
    """The `algorithm:` section when `algorithm.name: fedprox`."""

    name: Literal["fedprox"] = Field("fedprox", description="FedAvg with a proximal term on the clients.")
    mu: float = Field(0.01, ge=0, le=MAX_RATE, description="Proximal coefficient mu; 0 is FedAvg.")
    weighted: bool = Field(True, description="Average the clients' models weighted by their sample counts.")


@register_algorithm
class FedProx(FedAvg):
    """FedAvg's global model, broadcast and average (init_global, eval_weights inherited); a
    client program with the proximal term, and a `client_drift` metric per round."""

    name = "fedprox"
    config_cls = FedProxConfig

    def client_program(self, ctx: ClientContext, down: dict) -> tuple[dict, dict]:
        model = ctx.parts.full()
        load_weights(model, down["weights"])
        model.train()
        opt = ctx.optimizer([model], key="model")
        mu = ctx.config.mu
        params = [p for p in model.parameters() if p.requires_grad]
        # w_t on the device: real device memory, so it is made (and measured) only when used.
        anchor = [p.detach().clone() for p in params] if mu > 0 else None
        loss_sum, count = 0.0, 0
        for epoch in range(ctx.train.local_epochs):
            for x, y in ctx.batches(epoch):
                loss = task_loss(model(x), y)
                opt.zero_grad()
                loss.backward()
                if anchor is not None:
                    with torch.no_grad():
                        for p, a in zip(params, anchor):
                            p.grad.add_(p.detach() - a, alpha=mu)  # d/dw of mu/2 ||w - w_t||^2
                opt.step()
                loss_sum += float(loss.detach()) * len(y)
                count += len(y)
        weights = module_weights(model)
        # Telemetry (not on the link): how far this client moved from w_t, in numpy so that it
        # costs the device nothing that is measured.
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        drift = float(np.sqrt(sum(np.sum((weights[n].astype(np.float64) - down["weights"][n]) ** 2) for n in names)))
        return {"weights": weights}, {"num_samples": ctx.num_samples, "loss_sum": loss_sum, "loss_count": count,
                                      "drift": drift}

    def run_round(self, rt: RoundRuntime, rnd: int, clients: list[int]) -> RoundSummary:
        replies = rt.clients(clients, {"weights": self.global_model}, parallel=True)
        self.global_model = fedavg_replies(replies, "weights", self.config.weighted)
        # The mean L2 distance of the clients' trained weights from the global model they started from.
        return RoundSummary(extra={"client_drift": float(np.mean([r.info["drift"] for r in replies]))})
