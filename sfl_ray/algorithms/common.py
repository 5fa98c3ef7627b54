"""Mechanics shared by several algorithms, called rather than copied: FedAvg, the split-learning
client epoch (forward, send activations, apply the server's gradient), the server's step."""

from __future__ import annotations

import contextlib
from collections import Counter
from typing import Callable, Iterable, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from pydantic import Field

from sfl_ray.models.task import task_loss
from sfl_ray.config_base import Section
from sfl_ray.runtime.protocol import ClientContext, ClientReply, ServerProgram
from sfl_ray.runtime.wire import Weights, load_weights, module_weights
from sfl_ray.seeding import np_rng


def weighted_average(items: Sequence[tuple[Mapping[str, np.ndarray], float]]) -> Weights:
    """FedAvg: sum_i (w_i / sum w) * state_i, accumulated in float64 in the given order.

    Integer buffers (BatchNorm's num_batches_tracked) take the largest value.
    """
    if not items:
        raise ValueError("nothing to average")
    total = float(sum(w for _, w in items))
    if total <= 0:
        raise ValueError("aggregation weights must sum to a positive number")
    first = items[0][0]
    out: Weights = {}
    for key, ref in first.items():
        if np.issubdtype(ref.dtype, np.floating):
            acc = np.zeros(ref.shape, dtype=np.float64)
            for state, w in items:
                acc += (w / total) * state[key].astype(np.float64)
            out[key] = acc.astype(ref.dtype)
        else:
            # np.max of 0-d arrays gives a numpy scalar; keep an array (BatchNorm's num_batches_tracked)
            out[key] = np.asarray(np.max(np.stack([state[key] for state, _ in items]), axis=0), dtype=ref.dtype)
    return out


def fedavg_replies(replies: Iterable[ClientReply], kind: str, weighted: bool) -> Weights:
    """Average the `kind` uploads of client replies, by sample count if `weighted`."""
    return weighted_average([(r.up[kind], float(r.info["num_samples"]) if weighted else 1.0) for r in replies])


def client_order(seed: int, rnd: int, clients: Sequence[int]) -> list[int]:
    """A random order of this round's clients (sequential algorithms)."""
    return [clients[i] for i in np_rng(seed, "order", rnd).permutation(len(clients))]


def split_weights(full: Mapping[str, np.ndarray]) -> tuple[Weights, Weights]:
    """A full-model state ('device.*', 'server.*') -> (device block state, server block state)."""
    dev = {k[len("device."):]: v for k, v in full.items() if k.startswith("device.")}
    srv = {k[len("server."):]: v for k, v in full.items() if k.startswith("server.")}
    return dev, srv


class SplitConfigMixin(Section):
    """Fields every split-learning family algorithm shares."""

    weighted: bool = Field(True, description="FedAvg of the device blocks (and aux heads) weighted by the "
                           "clients' sample counts; false = the unweighted mean (the SplitFed reference code's and "
                           "HERON-SFL's).")


def split_client_epoch(ctx: ClientContext, down: dict) -> tuple[dict, dict]:
    """The device half of SL / SplitFed: for each batch, send activations and labels, get the
    cut-layer gradient back, finish backprop through the device block, step."""
    device = ctx.parts.device
    load_weights(device, down["weights"])
    device.train()
    opt = ctx.optimizer([device])
    loss_sum, count = 0.0, 0
    for epoch in range(ctx.train.local_epochs):
        for x, y in ctx.batches(epoch):
            z = device(x)  # (B, *act_shape) smashed activations
            reply, info = ctx.link.call("train_step", {"activations": z, "labels": y})
            opt.zero_grad()
            z.backward(reply["gradients"].to(z.device))
            opt.step()
            loss_sum += info["loss"] * len(y)
            count += len(y)
    return {"weights": module_weights(device)}, {"num_samples": ctx.num_samples, "loss_sum": loss_sum,
                                                 "loss_count": count}


def server_step(model: nn.Module, opt: torch.optim.Optimizer, arrays: dict,
                after_reply: Callable[[Callable], None] = lambda work: work()) -> tuple[dict, dict]:
    """One server step on received activations; returns the gradient at the cut. The optimizer
    step goes to `after_reply` (ServerContext.after_reply): the gradient does not depend on it,
    so the block may run it while the device finishes its backward."""
    # The received activations are a leaf: their .grad is exactly what the device needs.
    z = arrays["activations"].detach().requires_grad_(True)
    model.train()
    loss = task_loss(model(z), arrays["labels"])
    opt.zero_grad()
    loss.backward()
    after_reply(opt.step)
    return {"gradients": z.grad}, {"loss": float(loss.detach())}


class BufferedServer(ServerProgram):
    """One lazily updated server block fed by uploads of smashed data (CSE-FSL, FSL-SAGE, HERON-SFL).

    Clients run in parallel and `upload` only stores what arrives; the schedule then calls
    `train_uploads(order)`, which takes one server step per upload, client by client in `order`.
    Nothing flows back to the device, so this is the same computation as stepping on arrival in
    that order, and it stays deterministic whichever client finishes first.
    """

    flops_by_shape = frozenset({"upload"})  # stores, computes nothing

    def __init__(self, ctx):
        super().__init__(ctx)
        self.parts = ctx.build_parts()
        self.model = self.parts.server
        self.opt = ctx.optimizer([self.model], lr=getattr(ctx.config, "server_lr", None))
        self.pending: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def flop_key(self, method: str, args: tuple) -> Optional[tuple]:
        """`train_uploads` takes one step per pending upload of its order: its FLOPs are the sum
        over those uploads' shapes, whichever client sent them."""
        if method != "train_uploads":
            return None
        shapes = Counter((tuple(z.shape), str(z.dtype), tuple(y.shape)) for c in args[0]
                         for z, y in self.pending.get(c, ()))
        return (method, tuple(sorted(shapes.items())))

    def upload(self, client: int, arrays: dict, info: dict) -> tuple[dict, dict]:
        # Copy: the arrays may be read-only views of the object store.
        self.pending.setdefault(client, []).append((arrays["activations"].clone(), arrays["labels"].clone()))
        return {}, {}

    def train_uploads(self, order: Sequence[int]) -> dict:
        """One step per stored upload, clients in `order`; returns the server's loss."""
        loss_sum, count, steps = 0.0, 0, 0
        self.model.train()
        for c in order:
            for z, y in self.pending.pop(c, []):
                loss = task_loss(self.model(z), y)
                self.opt.zero_grad()
                loss.backward()
                self.opt.step()
                loss_sum += float(loss.detach()) * len(y)
                count += len(y)
                steps += 1
        self.pending.clear()
        return {"server_loss": loss_sum / count if count else None, "server_steps": steps,
                "server_samples": count}

    def get_weights(self) -> dict:
        return module_weights(self.model)


@contextlib.contextmanager
def preserved_buffers(*modules: nn.Module) -> Iterator[None]:
    """Run train-mode forwards (batch statistics in BatchNorm) that leave every buffer (running
    statistics, counters) as it was: for measurements and refreshes, not training."""
    saved = [{n: b.detach().clone() for n, b in m.named_buffers()} for m in modules]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, state in zip(modules, saved):
                for n, b in m.named_buffers():
                    b.copy_(state[n])


def upload_batches(k: int, num_batches: int, every: int, phase: str) -> bool:
    """Whether local batch k is uploaded: one upload per chunk of `every` batches, on the chunk's
    first batch (phase 'first', FSL-SAGE's re-implementation) or last ('last', the original
    CSE-FSL code; a short final chunk uploads its last batch)."""
    if phase == "first":
        return k % every == 0
    return k % every == every - 1 or k == num_batches - 1
