"""HERON-SFL (Kou, Chen, Yang, Shen; arXiv 2601.09076): zeroth-order devices, first-order server.

Same communication schedule as CSE-FSL: each round the device block and an auxiliary head come
down, the device trains them on the local auxiliary loss, uploads smashed data (+ labels) once
per `upload_every` batches to ONE server block trained first-order in SplitFed-v2 order, and
sends the block and head back; no gradient ever comes down. The difference is on the device:
it never runs backward. Each step is a MeZO-style zeroth-order step, forward passes only,
under `torch.no_grad()`:

    s = seed(round, client, epoch, batch, probe);  u ~ N(0, I) regenerated from s
    L+ = L(theta + mu u),  L- = L(theta - mu u)         (perturbations applied in place)
    g  = (L+ - L-) / (2 mu)      [central]   or   (L+ - L(theta)) / mu   [forward, eq. 2]
    theta <- theta - lr * g * u                         (u regenerated from s once more)

so device memory is inference-level: weights only, no gradients, no optimizer state, no tensor
saved for backward. u is Gaussian, so the paper's factor d (for u on the unit sphere) is dropped.

Device optimizer: plain ZO-SGD (with train.weight_decay). The paper trains with Adam, but Adam
on a ZO estimate materialises two d-sized moment buffers plus the d-sized estimate itself,
which its inference-level memory claim excludes; train.optimizer/momentum apply to the server.

The paper leaves [UNKNOWN]: probes per step, mu, the ZO learning rate, the upload interval.
Our defaults: one probe (eq. 2 implies one); mu = 1e-3 (MeZO's value; loss differences stay far
above fp32 rounding); zo_lr = 1e-3, not train.lr: a Gaussian-probe step is ~sqrt(d) times longer
than the gradient step, so ZO-SGD is stable only for lr ~ 1/d (on the MNIST CNN, d ~ 2e4, it
learns at 1e-3 and diverges at 3e-3, where first-order SGD takes 0.05); upload_every = 5 (the
spec's [PROPOSED] value, comm parity with FSL-SAGE); the central estimator (bias O(mu^2) instead
of eq. 2's O(mu), two forwards per probe either way; `forward` reuses the upload's forward for
L(theta)); a 1-FC aux head (the paper's; a conv head learns far slower under ZO).

BatchNorm in the device block (ResNet) keeps train mode: batch statistics are used and the
running statistics are updated by every perturbed forward (they average out over +-mu).
Dropout masks are held fixed across the forwards of one step, or L+ - L- would be noise.
"""

from __future__ import annotations

from typing import Callable, Iterator, Literal, Sequence

import torch
import torch.nn as nn
from pydantic import Field

from sfl_ray.config_base import MAX_RATE
from sfl_ray.algorithms.common import SplitConfigMixin, upload_batches
from sfl_ray.algorithms.cse_fsl import CSEFSL
from sfl_ray.models.aux import AuxConfig
from sfl_ray.models.task import task_loss
from sfl_ray.runtime.protocol import ClientContext
from sfl_ray.runtime.wire import load_weights, module_weights
from sfl_ray.seeding import seeded_torch


class HeronSFLConfig(SplitConfigMixin):
    name: Literal["heron_sfl"] = Field("heron_sfl", description="HERON-SFL: zeroth-order device + aux, "
                                       "first-order lazy single server.")
    weighted: bool = Field(False, description="Sample-weighted FedAvg of device blocks and aux heads; "
                           "the paper's eq. (8) is the unweighted mean, hence False.")
    upload_every: int = Field(5, gt=0, description="k: one smashed-data upload per k local batches "
                              "([UNKNOWN] in the paper; 5 = the spec's proposal).")
    upload_phase: Literal["first", "last"] = Field(
        "first", description="Upload the first or the last batch of each chunk of upload_every batches.")
    aux: AuxConfig = Field(AuxConfig(kind="linear"), description="The auxiliary head on the device; "
                           "default one FC layer, as in the paper.")
    num_probes: int = Field(1, gt=0, description="Random directions per step, averaged ([UNKNOWN]; eq. 2 uses 1).")
    mu: float = Field(1e-3, gt=0, le=MAX_RATE,
                      description="Perturbation scale of the ZO estimate ([UNKNOWN]; at most 1e38).")
    zo_lr: float | None = Field(1e-3, gt=0, le=MAX_RATE,
                                description="Device ZO-SGD learning rate ([UNKNOWN]; at most 1e38); None = train.lr. "
                                "Stable only for lr ~ 1/dim(theta): 1e-3 suits ~2e4 parameters.")
    zo_estimator: Literal["central", "forward"] = Field(
        "central", description="central: (L(t+mu u) - L(t-mu u)) / 2mu; forward (the paper's eq. 2): "
        "(L(t+mu u) - L(t)) / mu.")
    server_lr: float | None = Field(None, gt=0, le=MAX_RATE,
                                    description="Server learning rate (at most 1e38); None = train.lr.")


# -- the zeroth-order machinery (pure functions, tested on their own) ----------------------------

def zo_params(modules: Sequence[nn.Module]) -> list[torch.Tensor]:
    """The trainable parameters, in a fixed order (the order u is drawn in), each once."""
    seen: set[int] = set()
    out = []
    for m in modules:
        for p in m.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def directions(params: Sequence[torch.Tensor], seed: int) -> Iterator[torch.Tensor]:
    """u ~ N(0, I) for each parameter in turn, regenerated identically from `seed`.

    Drawn on the CPU in fp32 so every backend and device sees the same u; lazily, so only one
    parameter-sized direction is alive at a time.
    """
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        yield torch.randn(p.shape, generator=gen).to(device=p.device, dtype=p.dtype)


@torch.no_grad()
def perturb_(params: Sequence[torch.Tensor], seed: int, scale: float) -> None:
    """theta += scale * u(seed), in place."""
    for p, u in zip(params, directions(params, seed)):
        p.add_(u, alpha=scale)


@torch.no_grad()
def zo_projection(params: Sequence[torch.Tensor], loss_fn: Callable[[], float], seed: int, mu: float,
                  estimator: str = "central", loss0: float | None = None) -> tuple[float, float]:
    """(projected gradient g, loss at theta) for direction u(seed); params are restored on return.

    E[g u] is the gradient of the Gaussian-smoothed loss. `loss0` (forward estimator only) is
    L(theta) if the caller already has it. The restore (+mu, -2mu, +mu, or +mu, -mu) is exact up
    to float rounding: a few ulps of mu*|u| per parameter.
    """
    perturb_(params, seed, mu)
    plus = loss_fn()
    if estimator == "central":
        perturb_(params, seed, -2 * mu)
        minus = loss_fn()
        perturb_(params, seed, mu)
        return (plus - minus) / (2 * mu), (plus + minus) / 2  # the mean is L(theta) + O(mu^2)
    perturb_(params, seed, -mu)
    base = loss_fn() if loss0 is None else loss0
    return (plus - base) / mu, base


class HeronSFL(CSEFSL):
    """CSE-FSL's schedule (uploads to one lazy server, FedAvg of device block and aux; HERON's
    default is the unweighted mean) with a forward-only, zeroth-order device."""

    name = "heron_sfl"
    config_cls = HeronSFLConfig

    def client_program(self, ctx: ClientContext, down: dict) -> tuple[dict, dict]:
        device, aux = ctx.parts.device, self.aux_module(ctx.parts)
        load_weights(device, down["weights"])
        load_weights(aux, down["aux_weights"])
        device.train(), aux.train()
        ctx.on_device(device, aux)  # weights are all the device holds: no grads, no optimizer state
        params = zo_params([device, aux])
        loss_sum, count, k_total = 0.0, 0, ctx.num_batches()
        with torch.no_grad():  # no autograd graph, hence no tensor saved for backward, ever
            for epoch in range(ctx.train.local_epochs):
                # An uploading step runs one more device forward: its FLOPs differ from the others'.
                uploads = lambda k: upload_batches(k, k_total, self.config.upload_every,  # noqa: E731
                                                   self.config.upload_phase)
                for k, (x, y) in enumerate(ctx.batches(epoch, varies=uploads)):
                    upload = uploads(k)
                    loss_sum += self._zo_step(ctx, device, aux, params, x, y, (epoch, k), upload) * len(y)
                    count += len(y)
        return ({"weights": module_weights(device), "aux_weights": module_weights(aux)},
                {"num_samples": ctx.num_samples, "loss_sum": loss_sum, "loss_count": count})

    def _zo_step(self, ctx: ClientContext, device: nn.Module, aux: nn.Module, params: list[torch.Tensor],
                 x: torch.Tensor, y: torch.Tensor, step: tuple[int, int], upload: bool) -> float:
        """One ZO-SGD step on batch (x, y), uploading its smashed data first if asked; returns the loss."""
        cfg = self.config
        noise = ctx.seed_for("zo_noise", *step)

        def loss_fn(z: torch.Tensor | None = None) -> float:
            with seeded_torch(noise):  # the same dropout mask in every forward of this step
                return float(task_loss(aux(device(x) if z is None else z), y))

        loss0 = None
        if upload:
            with seeded_torch(noise):
                z = device(x)  # the current, unperturbed block's smashed data
            ctx.link.call("upload", {"activations": z, "labels": y})  # nothing comes back
            if cfg.zo_estimator == "forward":
                loss0 = loss_fn(z)  # L(theta) for the price of the aux head alone
        if cfg.zo_estimator == "forward" and loss0 is None:
            loss0 = loss_fn()
        seeds = [ctx.seed_for("zo", *step, i) for i in range(cfg.num_probes)]
        est = [zo_projection(params, loss_fn, s, cfg.mu, cfg.zo_estimator, loss0) for s in seeds]
        lr = ctx.train.lr if cfg.zo_lr is None else cfg.zo_lr
        if ctx.train.weight_decay:
            for p in params:
                p.mul_(1.0 - lr * ctx.train.weight_decay)
        for s, (g, _) in zip(seeds, est):
            perturb_(params, s, -lr * g / cfg.num_probes)  # theta -= lr * g * u(s), u regenerated
        return sum(loss for _, loss in est) / len(est)
