"""FSL-SAGE (Nair et al., ICML 2025; arXiv 2505.23182): split learning with server-aligned
gradient estimators.

Each device trains its block with the cut-layer gradient ESTIMATED by an auxiliary model it
holds frozen. The server keeps one aux model per client and a FIFO buffer of the last M
activations that client uploaded; every `align_every` rounds it refreshes the true cut-layer
gradients with the current server model and trains the client's aux so that the aux's
cut-layer gradient matches them (second-order autograd), then sends the aux down. Only device
blocks are FedAvg'd; the aux models are not.

Per client per round: device weights down and up; ceil(K/q) uploads of activations + labels;
the client's aux weights down on alignment rounds only (rounds 1, 1 + l, 1 + 2l, ...).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Literal

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
import torch.nn.functional as F
from pydantic import Field

from sfl_ray.models.task import task_loss
from sfl_ray.config_base import MAX_RATE
from sfl_ray.algorithms.common import (BufferedServer, SplitConfigMixin, client_order, fedavg_replies,
                                       upload_batches)
from sfl_ray.algorithms.cse_fsl import AuxHeadMixin
from sfl_ray.models.aux import AuxConfig, build_aux
from sfl_ray.models.split import ModelParts
from sfl_ray.runtime.protocol import Algorithm, ClientContext, RoundRuntime, RoundSummary
from sfl_ray.runtime.wire import load_weights, module_weights
from sfl_ray.seeding import torch_gen


class FSLSAGEConfig(SplitConfigMixin):
    name: Literal["fsl_sage"] = Field("fsl_sage", description="FSL-SAGE: server-aligned gradient estimators.")
    upload_every: int = Field(5, gt=0, description="q: one smashed-data upload (and lazy server step) per q batches.")
    upload_phase: Literal["first", "last"] = Field("first", description="Which batch of each q-chunk is uploaded.")
    align_every: int = Field(10, gt=0, description="l: align the aux models every l rounds.")
    align_epochs: int = Field(100, gt=0, description="Passes over a client's buffer per alignment.")
    align_batch_size: int = Field(1000, gt=0, description="Mini-batch size for alignment.")
    buffer_size: int = Field(1000, gt=0, description="M: the alignment buffer keeps the last M uploaded samples.")
    aux_lr: float = Field(1e-3, gt=0, le=MAX_RATE,
                          description="Adam learning rate of the aux models (on the server; at most 1e38).")
    aux: AuxConfig = Field(AuxConfig(), description="The auxiliary model (gradient estimator).")
    server_lr: float | None = Field(None, gt=0, le=MAX_RATE,
                                    description="Server learning rate (at most 1e38); None = train.lr.")


def cut_gradient(head: torch.nn.Module, z: torch.Tensor, y: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
    """Per-sample gradient of the loss at the cut: d/dz of the SUM of NLL, so that it does not
    depend on the batch it was computed in (buffer refresh and alignment use different batches)."""
    # A non-leaf input: torch's FLOP counter (module hooks) cannot follow autograd.grad to a leaf.
    z = z.detach().requires_grad_(True).clone()
    # Alignment differentiates this gradient again; fused attention kernels (flash, efficient)
    # have no double backward, the math kernel does.
    with sdpa_kernel(SDPBackend.MATH) if create_graph else nullcontext():
        loss = task_loss(head(z), y, reduction="sum")
        (g,) = torch.autograd.grad(loss, z, create_graph=create_graph)
    return g


class SageServer(BufferedServer):
    """The lazy server block, plus one aux model and one FIFO alignment buffer per client."""

    def __init__(self, ctx):
        super().__init__(ctx)
        self.aux: dict[int, tuple[torch.nn.Module, torch.optim.Optimizer]] = {}
        self.buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _aux(self, client: int):
        if client not in self.aux:
            bp = self.ctx.blueprint
            head = build_aux(self.ctx.config.aux, self.parts.act_shape, bp.num_classes, bp.seed,
                             self.parts.aux_factory).to(self.ctx.device)
            self.aux[client] = (head, torch.optim.Adam(head.parameters(), lr=self.ctx.config.aux_lr))
        return self.aux[client]

    def after_step(self, client: int, z: torch.Tensor, y: torch.Tensor) -> None:
        """FIFO in samples: keep only the last M uploaded (z, y) of this client."""
        m = self.ctx.config.buffer_size
        if client in self.buffers:
            bz, by = self.buffers[client]
            z, y = torch.cat([bz, z]), torch.cat([by, y])
        self.buffers[client] = (z[-m:].detach(), y[-m:])

    def true_gradients(self, client: int) -> torch.Tensor:
        """Refresh: the server's per-sample cut-layer gradients on the buffer, with the current model."""
        z, y = self.buffers[client]
        self.model.train()  # as the reference code: batch statistics, like the client's uploads saw
        g = cut_gradient(self.model, z, y)
        self.model.zero_grad(set_to_none=True)
        return g.detach()

    def alignment_quality(self, client: int) -> dict:
        """Cosine similarity and MSE between the aux's and the server's cut-layer gradients."""
        z, y = self.buffers[client]
        g, g_hat = self.true_gradients(client), cut_gradient(self._aux(client)[0], z, y).detach()
        cos = F.cosine_similarity(g_hat.flatten(1), g.flatten(1), dim=1).mean()
        return {"cosine": float(cos), "mse": float(F.mse_loss(g_hat, g))}

    def align(self, clients: list[int], rnd: int) -> dict:
        """Align each client's aux to the server (if it uploaded anything); return the aux weights."""
        cfg, out, quality = self.ctx.config, {}, []
        for c in sorted(clients):
            head, opt = self._aux(c)
            if c in self.buffers:
                z, y = self.buffers[c]
                g = self.true_gradients(c)
                gen = torch_gen(self.ctx.blueprint.seed, "align", rnd, c)
                head.train()
                for _ in range(cfg.align_epochs):
                    perm = torch.randperm(len(y), generator=gen)
                    for i in range(0, len(y), cfg.align_batch_size):
                        b = perm[i: i + cfg.align_batch_size]
                        g_hat = cut_gradient(head, z[b], y[b], create_graph=True)  # second order
                        loss = F.mse_loss(g_hat, g[b], reduction="sum")
                        opt.zero_grad()
                        loss.backward()
                        opt.step()
                quality.append(self.alignment_quality(c)["cosine"])
            out[c] = module_weights(head)
        return {"aux": out, "align_cosine": sum(quality) / len(quality) if quality else None}

    def aux_weights(self, clients: list[int]) -> dict:
        return {c: module_weights(self._aux(c)[0]) for c in clients}


class FSLSAGE(AuxHeadMixin, Algorithm):
    name = "fsl_sage"
    config_cls = FSLSAGEConfig
    server_cls = SageServer

    def init_global(self, parts: ModelParts) -> None:
        self.global_device = module_weights(parts.device)
        self.global_has_aux: set[int] = set()

    def client_program(self, ctx: ClientContext, down: dict) -> tuple[dict, dict]:
        device, aux = ctx.parts.device, self.aux_module(ctx.parts)
        load_weights(device, down["weights"])
        if "aux_weights" in down:  # an aligned estimator arrived: the device keeps it
            ctx.state["aux_weights"] = {k: v.copy() for k, v in down["aux_weights"].items()}
        load_weights(aux, ctx.state["aux_weights"])
        aux.requires_grad_(False)  # the device never trains the estimator
        ctx.on_device(aux)
        device.train(), aux.train()
        opt = ctx.optimizer([device])
        loss_sum, count, k_total = 0.0, 0, ctx.num_batches()
        for epoch in range(ctx.train.local_epochs):
            for k, (x, y) in enumerate(ctx.batches(epoch)):
                z = device(x)  # (B, *act_shape) smashed activations
                if upload_batches(k + epoch * k_total, k_total * ctx.train.local_epochs,
                                  self.config.upload_every, self.config.upload_phase):
                    ctx.link.call("upload", {"activations": z, "labels": y})
                # Backprop through the frozen aux = applying its estimate of the server's cut gradient.
                loss = task_loss(aux(z), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                loss_sum += float(loss.detach()) * len(y)
                count += len(y)
        return {"weights": module_weights(device)}, {"num_samples": ctx.num_samples, "loss_sum": loss_sum,
                                                     "loss_count": count}

    def run_round(self, rt: RoundRuntime, rnd: int, clients: list[int]) -> RoundSummary:
        extra: dict = {"aligned": False}
        if (rnd - 1) % self.config.align_every == 0:
            res = rt.server("align", clients, rnd)
            aux, extra = res["aux"], {"aligned": True, "align_cosine": res["align_cosine"]}
        else:  # only clients that never received an estimator need one now
            aux = rt.server("aux_weights", [c for c in clients if c not in self.global_has_aux])
        self.global_has_aux |= set(aux)
        replies = rt.clients(clients, {"weights": self.global_device},
                             per_client={c: {"aux_weights": w} for c, w in aux.items()})
        extra.update(rt.server("train_uploads", client_order(self.blueprint.seed, rnd, clients)))
        self.global_device = fedavg_replies(replies, "weights", self.config.weighted)
        return RoundSummary(extra=extra)

    def eval_weights(self, rt: RoundRuntime) -> tuple[dict, dict]:
        return self.global_device, rt.server("get_weights")
