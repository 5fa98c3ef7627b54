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

When the alignment happens (as the reference code: inside the client's round, right after its
first upload of an alignment round, so round 1 already trains against an estimator aligned on
that client's real activations): the first upload of the round goes to `upload_align`, which
stores it, aligns the client's aux on its buffer and returns the aligned aux in the reply. A
client sampled for the first time on another round is aligned the same way (it has no
estimator yet). Where sfl_ray differs from the reference, and why:
- The lazy server steps of a round run after its clients (see BufferedServer), so an alignment
  sees the server as the previous round left it (the reference's sequential loop has already
  stepped on the earlier clients' uploads of the round). Alignments of different clients then
  read the same server and are independent of the order in which parallel clients arrive.
- The refresh of the true gradients uses batch statistics in BatchNorm, as the reference, but
  leaves the server's running statistics as they were (the reference updates them): with
  parallel clients the order of refreshes would otherwise change the model.
- The alignment telemetry (cosine and MSE before and after) is measured with every weight and
  buffer left unchanged, and its FLOPs are not counted as server work.

The estimator's kind matters more than anything else here. Measured on the quickstart job
(cnn cut at pool2, server = fc 1568->128->10, 20 MNIST clients, SGD 0.05): a conv head with
global average pooling cannot represent the server's position-dependent cut gradient (cosine
0.38 after alignment, on its own buffer) and training collapses (0.57 at round 3, 0.24 by round
10); an MLP head fits its buffer but its gradient does not carry to other batches (0.10 at round
6); a linear head aligns to cosine 0.93-0.97 and trains (0.70 -> 0.85 across the round-11
realignment, 0.91 at round 15). The device follows the frozen estimator for l rounds on data
the buffer never held, so the default is the reference's linear estimator.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Literal

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
import torch.nn.functional as F
from pydantic import Field

from sfl_ray.metrics.device_cost import off_device
from sfl_ray.models.task import task_loss
from sfl_ray.config_base import MAX_RATE
from sfl_ray.algorithms.common import (BufferedServer, SplitConfigMixin, client_order, fedavg_replies,
                                       preserved_buffers, upload_batches)
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
    aux: AuxConfig = Field(AuxConfig(kind="linear"), description="The auxiliary model (gradient estimator); "
                           "linear (Flatten + Linear, the reference's simple_conv aux; on transformers norm + head) "
                           "by default: an estimator must represent the server's cut gradient and generalise from "
                           "a small buffer (see the module docstring).")
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
                             self.parts.aux_factory, server=self.parts.server).to(self.ctx.device)
            self.aux[client] = (head, self._aux_optimizer(head))
        return self.aux[client]

    def load_state_dict(self, state: dict) -> None:
        """Restore a checkpoint: the per-client aux models are rebuilt, then loaded."""
        from sfl_ray.runtime.checkpoint import load_into
        state = dict(state)
        aux = state.pop("aux", {})
        super().load_state_dict(state)
        self.aux = {}
        for c, (head, opt) in aux.items():
            h, o = self._aux(c)
            load_into(h, head), load_into(o, opt)

    def _aux_optimizer(self, head: torch.nn.Module) -> torch.optim.Optimizer:
        return torch.optim.Adam([p for p in head.parameters() if p.requires_grad], lr=self.ctx.config.aux_lr)

    def upload(self, client: int, arrays: dict, info: dict) -> tuple[dict, dict]:
        """Store the upload for the lazy server step, and in the client's FIFO buffer (the last M
        uploaded samples, in the order this client sent them)."""
        super().upload(client, arrays, info)
        z, y = self.pending[client][-1]
        m = self.ctx.config.buffer_size
        if client in self.buffers:
            bz, by = self.buffers[client]
            z, y = torch.cat([bz, z]), torch.cat([by, y])
        self.buffers[client] = (z[-m:], y[-m:])
        return {}, {}

    def upload_align(self, client: int, arrays: dict, info: dict) -> tuple[dict, dict]:
        """An upload that triggers this client's alignment; the reply is the aligned aux."""
        self.upload(client, arrays, info)
        stats = self.align(client, int(info["round"]))
        return {"aux_weights": module_weights(self._aux(client)[0])}, stats

    def true_gradients(self, client: int) -> torch.Tensor:
        """Refresh: the server's per-sample cut-layer gradients on the buffer, with the current model
        (batch statistics, like the client's uploads saw; running statistics left unchanged)."""
        z, y = self.buffers[client]
        self.model.train()
        with preserved_buffers(self.model):
            g = cut_gradient(self.model, z, y)
        return g.detach()

    def _quality(self, head: torch.nn.Module, z: torch.Tensor, y: torch.Tensor, g: torch.Tensor) -> tuple[float, float]:
        """(cosine, MSE) between the aux's and the server's gradients: telemetry, so not counted
        as server work and leaving the aux's buffers as they were."""
        with off_device(), preserved_buffers(head):
            g_hat = cut_gradient(head, z, y).detach()
        cos = F.cosine_similarity(g_hat.flatten(1), g.flatten(1), dim=1).mean()
        return float(cos), float(F.mse_loss(g_hat, g))

    def align(self, client: int, rnd: int) -> dict:
        """Train this client's aux so that its cut-layer gradient matches the server's on the
        client's buffer (MSE, sum reduction, second-order autograd)."""
        cfg = self.ctx.config
        head, opt = self._aux(client)
        if not self.ctx.blueprint.persist_optimizers:
            opt = self._aux_optimizer(head)
            self.aux[client] = (head, opt)
        z, y = self.buffers[client]
        g = self.true_gradients(client)
        cos0, mse0 = self._quality(head, z, y, g)
        gen = torch_gen(self.ctx.blueprint.seed, "align", rnd, client)
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
        cos1, mse1 = self._quality(head, z, y, g)
        return {"cosine_before": cos0, "cosine": cos1, "mse_before": mse0, "mse": mse1, "samples": int(len(y))}


class FSLSAGE(AuxHeadMixin, Algorithm):
    name = "fsl_sage"
    _aux_init: dict | None = None
    config_cls = FSLSAGEConfig
    server_cls = SageServer

    def init_global(self, parts: ModelParts) -> None:
        self.global_device = module_weights(parts.device)

    def align_due(self, rnd: int) -> bool:
        """Alignment rounds: 1, 1 + l, 1 + 2l, ... (the reference's t % l == 0 with t from 0)."""
        return (rnd - 1) % self.config.align_every == 0

    def client_program(self, ctx: ClientContext, down: dict) -> tuple[dict, dict]:
        device, aux = ctx.parts.device, self.aux_module(ctx.parts)
        if self._aux_init is None:
            self._aux_init = module_weights(aux)  # the estimator every client starts from
        load_weights(device, down["weights"])
        # A client aligns on an alignment round, or on its first round if it has no estimator yet.
        align = self.align_due(ctx.round) or "aux_weights" not in ctx.state
        load_weights(aux, ctx.state.get("aux_weights", self._aux_init))
        aux.requires_grad_(False)  # the device never trains the estimator
        ctx.on_device(aux)
        device.train(), aux.train()
        opt = ctx.optimizer([device])
        loss_sum, count, k_total = 0.0, 0, ctx.num_batches()
        info: dict = {"num_samples": ctx.num_samples}
        for epoch in range(ctx.train.local_epochs):
            for k, (x, y) in enumerate(ctx.batches(epoch)):
                z = device(x)  # (B, *act_shape) smashed activations
                if upload_batches(k + epoch * k_total, k_total * ctx.train.local_epochs,
                                  self.config.upload_every, self.config.upload_phase):
                    if align:
                        reply, stats = ctx.link.call("upload_align", {"activations": z, "labels": y},
                                                     {"round": ctx.round})
                        # The aligned estimator arrived: the device keeps it until the next one.
                        ctx.state["aux_weights"] = {n: v.copy() for n, v in reply["aux_weights"].items()}
                        load_weights(aux, ctx.state["aux_weights"])
                        info["align"], align = stats, False
                    else:
                        ctx.link.call("upload", {"activations": z, "labels": y})
                # Backprop through the frozen aux = applying its estimate of the server's cut gradient.
                loss = task_loss(aux(z), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                loss_sum += float(loss.detach()) * len(y)
                count += len(y)
        info.update(loss_sum=loss_sum, loss_count=count)
        return {"weights": module_weights(device)}, info

    def run_round(self, rt: RoundRuntime, rnd: int, clients: list[int]) -> RoundSummary:
        replies = rt.clients(clients, {"weights": self.global_device})
        stats = [r.info["align"] for r in replies if "align" in r.info]
        extra: dict = {"aligned": bool(stats), "aligned_clients": len(stats)}
        for key in ("cosine_before", "cosine", "mse_before", "mse"):
            extra[f"align_{key}"] = sum(s[key] for s in stats) / len(stats) if stats else None
        extra.update(rt.server("train_uploads", client_order(self.blueprint.seed, rnd, clients)))
        self.global_device = fedavg_replies(replies, "weights", self.config.weighted)
        return RoundSummary(extra=extra)

    def eval_weights(self, rt: RoundRuntime) -> tuple[dict, dict]:
        return self.global_device, rt.server("get_weights")
