"""SGLR (Pal et al., FL-AAAI-22 workshop, arXiv 2112.05929): parallel split learning with
server-side learning-rate acceleration (SplitLr) and cut-layer gradient averaging (SplitAvg).

Every client keeps its own device block for the whole run: no weights ever cross the link.
The clients move in lock-step, one batch per iteration:
  1. every client sends the activations and labels of its next batch (up);
  2. the server takes ONE step on the concatenated batch, with lr = client lr x N^alpha
     (N = clients in the round), and splits the cut-layer gradient into per-client slices;
  3. a random ceil(phi x n) of the iteration's clients are "active": each of them receives the
     element-wise mean of the active slices, every other client its own slice (down); the
     server block averages, and activations and gradients travel between pools and server
     block by reference (runtime.bulk), never through the coordinator;
  4. every client backpropagates what it received and steps its own optimizer.
Per client per batch: activations + labels up, one slice-shaped gradient down. SplitAvg is on
only during the initial (or final) `averaging_fraction_of_training` of the run, as the
official code's `comm_flag` does; outside it every client gets its own slice (PSL + SplitLr).

Where the paper is silent or the system differs, this file chooses:
- Unequal shards: a round runs, per local epoch, max_i K_i iterations (K_i = client i's
  batches); a client whose epoch is done sits the remaining iterations out, so every sample is
  used once per epoch as in the other algorithms. The server lr stays client lr x N^alpha.
- Ragged batches: averaging pairs sample j of one client with sample j of another, so only
  active clients with a full `train.batch_size` batch are averaged; an active client with a
  short last batch gets its own slice.
- The mean is sample-weighted by shard size (delta_i = n_i/n) when `weighted`, else plain.
- Bytes are counted where a device receives them: a broadcast to k active clients is k
  downloads. The row's `server_gradient_send_bytes` counts the mean once per iteration
  instead (the server's side of a multicast, the paper's Table 6 accounting).
- The phase is a fraction of `total_rounds`, by default `stop.rounds` (the planned length; a
  run cut short by a budget or a target keeps the planned schedule). A round is one pass over each client's data, the paper's epoch.
- Evaluation needs one device block (the paper does not say which): by default the mean of the
  round's clients' blocks (the row's `eval_model` says so), or the round's first (lowest-id)
  client's block. Fetching it is
  evaluation bookkeeping, returned as telemetry and not counted: training moves no weights.
- Every client starts from the same initial device block (the shared seed plays the
  broadcast); client optimizers persist across rounds, like the server's.
- The default schedule is the official code's (`schedule: official`); the paper's Table 2 cell
  and plain PSL are offered by name, any other setting as `custom`.
- A client's forward and backward are separate programs (the server step sits between them);
  its device memory is measured over its whole round as one (ClientContext.continue_measuring),
  so the peak sees the saved activations, the gradients kept from the previous iteration and
  the optimizer state together, as a device running the loop would hold them.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
from typing import Literal, Optional

import numpy as np
import torch
from pydantic import Field, model_validator

from sfl_ray.models.task import task_loss
from sfl_ray.algorithms.common import SplitConfigMixin, weighted_average
from sfl_ray.models.split import ModelParts
from sfl_ray.runtime.codec import Codec
from sfl_ray.runtime.protocol import (Algorithm, Blueprint, ClientContext, RoundRuntime, RoundSummary,
                                      ServerContext, ServerProgram)
from sfl_ray.runtime.wire import module_weights, to_numpy, to_tensor
from sfl_ray.seeding import np_rng

log = logging.getLogger("sfl_ray.sglr")


# Named schedules: (alpha, phi, averaging_fraction_of_training, averaging_phase).
SCHEDULES = {
    # The official code's README command: --lr_pow 1.0 --comm_flag 0.6; while epoch < comm_flag x
    # epochs every worker gets the averaged gradient (phi = 1), afterwards its own slice.
    "official": (1.0, 1.0, 0.6, "initial"),
    # The paper's Table 2 best cell (C=20): SplitLr alpha=0.5 and SplitAvg with phi=0.5 throughout.
    "table2": (0.5, 0.5, 1.0, "initial"),
    # Parallel split learning (PSL, SGLR's baseline): no SplitLr, no SplitAvg.
    "psl": (0.0, 0.0, 0.0, "initial"),
}
_KNOBS = ("alpha", "phi", "averaging_fraction_of_training", "averaging_phase")


class SGLRConfig(SplitConfigMixin):
    name: Literal["sglr"] = Field("sglr", description="SGLR: parallel split learning with SplitLr and SplitAvg.")
    schedule: Literal["official", "table2", "psl", "custom"] = Field(
        "official", description="official: the official code (alpha=1, phi=1 during the initial 60% of rounds, "
        "then each client's own gradient); table2: the paper's Table 2 best (alpha=0.5, phi=0.5 throughout); "
        "psl: plain parallel split learning (alpha=0, phi=0); custom: alpha/phi/averaging_* as given (any of "
        "them set alone implies custom, the others from official).")
    alpha: Optional[float] = Field(None, ge=0, le=4, description="SplitLr power: server lr = client lr x N^alpha "
                                   "(0 = no SplitLr; at most 4: beyond, N^alpha soon overflows); None = from the schedule.")
    phi: Optional[float] = Field(None, ge=0, le=1, description="Fraction of clients whose cut gradients are "
                                 "averaged (resampled every iteration); 0 = no SplitAvg; None = from the schedule.")
    averaging_fraction_of_training: Optional[float] = Field(
        None, ge=0, le=1, description="Share of total_rounds during which SplitAvg is on (1 = always, 0 = never); "
        "None = from the schedule.")
    averaging_phase: Optional[Literal["initial", "final"]] = Field(
        None, description="Whether the averaged rounds are the first or the last ones; None = from the schedule.")
    total_rounds: int | None = Field(None, gt=0, description="Training length in rounds that the averaging "
                                     "fraction refers to; None = stop.rounds.")
    loss_reduction: Literal["mean_over_concat", "mean_per_client"] = Field(
        "mean_over_concat", description="mean_over_concat: one mean loss over the concatenated batch (official "
        "code; each slice is 1/N of a client's own mean-loss gradient); mean_per_client: each slice is the "
        "gradient of that client's own mean loss (the server's step is the same for equal batches).")
    eval_model: Literal["mean", "client0"] = Field(
        "mean", description="Device block evaluated (the row's eval_model says which): the mean of the round's "
        "clients' blocks (sample-weighted if `weighted`), or the round's first (lowest-id) client's block.")

    @model_validator(mode="after")
    def _resolve_schedule(self) -> "SGLRConfig":
        given = {k for k in _KNOBS if getattr(self, k) is not None}
        if "schedule" not in self.model_fields_set and given:
            object.__setattr__(self, "schedule", "custom")
        preset = dict(zip(_KNOBS, SCHEDULES.get(self.schedule, SCHEDULES["official"])))
        if self.schedule != "custom":
            for k in given:
                if getattr(self, k) != preset[k]:
                    raise ValueError(f"{k}={getattr(self, k)!r} differs from schedule {self.schedule!r} "
                                     f"({k}={preset[k]!r}); use schedule=custom to choose it")
        for k in _KNOBS:
            if getattr(self, k) is None:
                object.__setattr__(self, k, preset[k])
        return self


def route(grads: dict[int, np.ndarray], active: list[int], weight: dict[int, float], batch_size: int,
          codec: Codec) -> tuple[dict[int, dict], int]:
    """What each client receives: the mean slice if averaged, else its own; and the bytes the
    server sends when the mean goes out once (multicast)."""
    out = {c: {"gradients": g} for c, g in grads.items()}
    # Only full batches align sample by sample; a short last batch keeps its own slice.
    group = [c for c in active if len(grads[c]) == batch_size]
    if group:
        total = sum(weight[c] for c in group)
        acc = sum((weight[c] / total) * grads[c].astype(np.float64) for c in group)
        mean = acc.astype(grads[group[0]].dtype)
        for c in group:
            out[c] = {"gradients": mean}
    size = codec.nbytes  # as sent: compressed under link.compression
    own = sum(size("gradients", g) for c, g in grads.items() if c not in group)
    return out, own + (size("gradients", out[group[0]]["gradients"]) if group else 0)


class SGLRServer(ServerProgram):
    """One server block stepped once per iteration on the clients' concatenated batches."""

    def __init__(self, ctx: ServerContext):
        super().__init__(ctx)
        self.model = ctx.build_parts().server
        self.opt: torch.optim.Optimizer | None = None

    def step(self, batches: dict[int, dict], lr: float) -> tuple[dict[int, np.ndarray], float, int]:
        """One step on the concatenation of `batches` (client -> activations, labels); returns
        each client's slice of the cut gradient and the summed per-sample loss and its count."""
        if self.opt is None:
            self.opt = self.ctx.optimizer([self.model], lr=lr)
        for group in self.opt.param_groups:  # N, hence the lr, may change between rounds
            group["lr"] = lr
        ids = list(batches)
        dev = self.ctx.device
        sizes = [len(batches[c]["labels"]) for c in ids]
        z = torch.cat([to_tensor(batches[c]["activations"], dev) for c in ids]).requires_grad_(True)
        y = torch.cat([to_tensor(batches[c]["labels"], dev) for c in ids])
        self.model.train()
        per_sample = task_loss(self.model(z), y, reduction="none")
        if self.ctx.config.loss_reduction == "mean_over_concat":
            loss = per_sample.mean()
        else:
            loss = sum(p.mean() for p in per_sample.split(sizes)) / len(ids)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        grad = z.grad if self.ctx.config.loss_reduction == "mean_over_concat" else z.grad * len(ids)
        slices = {c: to_numpy(g) for c, g in zip(ids, grad.split(sizes))}
        return slices, float(per_sample.detach().sum()), int(len(y))

    def flop_key(self, method: str, args: tuple) -> Optional[tuple]:
        """An iteration steps once on the concatenation of its batches: its FLOPs follow from the
        batches' shapes (the averaging and routing after it count none)."""
        if method != "iteration":
            return None
        shapes = sorted((tuple(b["activations"].shape), str(b["activations"].dtype), tuple(b["labels"].shape))
                        for b in args[0].values())
        return (method, tuple(shapes))

    def iteration(self, batches: dict[int, dict], lr: float, active: list[int], weight: dict[int, float]
                  ) -> tuple[dict[int, dict], float, int, int]:
        """One iteration's server side: `step`, then SplitAvg (the server averages the active
        clients' slices, as the paper has it). Returns what each client receives, by reference
        (`Bulk` handles: the gradients go from here to the pools, the mean stored once), the
        summed loss and its count, and the bytes the server sends (see `route`)."""
        slices, loss_sum, count = self.step(batches, lr)
        codec = self.ctx.blueprint.codec
        down, sent = route(slices, active, weight, self.ctx.train.batch_size, codec)
        # One object per iteration; clients given the same array share one stored value.
        wire, names = {}, {}
        for c, payload in down.items():
            g = payload["gradients"]
            if id(g) not in names:
                names[id(g)] = f"g{len(names)}"
                wire[names[id(g)]] = codec.encode_array(g)  # leaves compressed (link.compression)
        handles = self.ctx.bulk(wire)
        return {c: {"gradients": handles[names[id(p["gradients"])]]} for c, p in down.items()}, loss_sum, count, sent

    def get_weights(self) -> dict:
        return module_weights(self.model)

    def load_state_dict(self, state: dict) -> None:
        """The optimizer is made on the first step (its lr depends on N): make it, then load."""
        state = dict(state)
        opt = state.pop("opt", None)
        super().load_state_dict(state)
        if opt is not None:
            from sfl_ray.runtime.checkpoint import load_into
            self.opt = load_into(self.ctx.optimizer([self.model]), opt)


class SGLR(Algorithm):
    name = "sglr"
    config_cls = SGLRConfig
    server_cls = SGLRServer

    def __init__(self, blueprint: Blueprint):
        super().__init__(blueprint)
        self._warned = False

    def init_global(self, parts: ModelParts) -> None:
        self.global_device = module_weights(parts.device)  # the block evaluated (see eval_model)

    # -- schedule side ------------------------------------------------------------------
    def run_round(self, rt: RoundRuntime, rnd: int, clients: list[int]) -> RoundSummary:
        cfg = self.config
        server_lr = self.train.lr * len(clients) ** cfg.alpha  # SplitLr
        averaging = self.averaging_in(rnd)
        plan = {r.client: r.info for r in rt.clients(clients, {}, program="sglr_begin")}
        batches = {c: plan[c]["batches_per_epoch"] for c in clients}
        weight = {c: float(plan[c]["num_samples"]) if cfg.weighted else 1.0 for c in clients}
        loss_sum, count, iterations, server_sent = 0.0, 0, 0, 0
        for epoch in range(self.train.local_epochs):
            for k in range(max(batches.values())):
                ids = [c for c in clients if batches[c] > k]  # clients whose epoch is done sit out
                ups = rt.clients(ids, {}, program="sglr_forward")
                active = self.active_clients(rnd, epoch, k, ids) if averaging else []
                # Activations up and gradients down go by reference (runtime.bulk): pools <-> server.
                down, lsum, n, sent = rt.server("iteration", {r.client: r.up for r in ups}, server_lr, active, weight)
                rt.clients(ids, {}, program="sglr_backward", per_client=down)
                loss_sum, count = loss_sum + lsum, count + n
                iterations, server_sent = iterations + 1, server_sent + sent
        self.global_device = self.eval_device(rt, clients)
        return RoundSummary(train_loss=loss_sum / count, phase="splitavg" if averaging else "own_gradients",
                            extra={"server_lr": server_lr, "iterations": iterations, "phi": cfg.phi if averaging else 0.0,
                                   "server_gradient_send_bytes": server_sent, "eval_model": cfg.eval_model})

    def averaging_in(self, rnd: int) -> bool:
        """Whether round `rnd` (from 1) lies in the SplitAvg phase."""
        cfg = self.config
        total = cfg.total_rounds or self.blueprint.rounds
        if rnd > total and not self._warned:
            self._warned = True
            log.warning("round %d > algorithm.total_rounds=%d: the averaging phase is measured against it", rnd, total)
        if cfg.averaging_fraction_of_training >= 1.0:
            return True
        # The official code averages while epoch < comm_flag x epochs: ceil(f x T) rounds.
        n = math.ceil(cfg.averaging_fraction_of_training * total - 1e-9)
        return rnd <= n if cfg.averaging_phase == "initial" else rnd > total - n

    def active_clients(self, rnd: int, epoch: int, k: int, ids: list[int]) -> list[int]:
        """ceil(phi x n) of this iteration's clients, drawn afresh every iteration."""
        m = math.ceil(self.config.phi * len(ids) - 1e-9)
        pick = np_rng(self.blueprint.seed, "sglr_active", rnd, epoch, k).choice(len(ids), m, replace=False)
        return sorted(ids[i] for i in pick)

    def eval_device(self, rt: RoundRuntime, clients: list[int]) -> dict:
        ids = clients if self.config.eval_model == "mean" else clients[:1]
        reps = rt.clients(ids, {}, program="sglr_weights")
        if len(reps) == 1:
            return reps[0].info["weights"]
        w = self.config.weighted
        return weighted_average([(r.info["weights"], float(r.info["num_samples"]) if w else 1.0) for r in reps])

    def eval_weights(self, rt: RoundRuntime) -> tuple[dict, dict]:
        return self.global_device, rt.server("get_weights")

    # -- client side (one call per phase of an iteration) ----------------------------------
    def client_program(self, ctx: ClientContext, down: dict) -> tuple[dict, dict]:
        raise NotImplementedError("SGLR runs in lock-step: sglr_begin, then sglr_forward/sglr_backward per batch")

    def sglr_begin(self, ctx: ClientContext, down: dict) -> tuple[dict, dict]:
        """Start a round: this client's batches for every local epoch; nothing is sent."""
        st = ctx.state
        if "model" not in st:
            # The pool's block is the blueprint's initial one, identical on every client.
            st["model"] = copy.deepcopy(ctx.parts.device)
        st["batches"] = itertools.chain.from_iterable(ctx.batches(e) for e in range(ctx.train.local_epochs))
        st["left"] = ctx.num_batches() * ctx.train.local_epochs
        ctx.continue_measuring()  # one memory peak for the client's whole round
        return {}, {"batches_per_epoch": ctx.num_batches(), "num_samples": ctx.num_samples}

    def sglr_forward(self, ctx: ClientContext, down: dict) -> tuple[dict, dict]:
        """Activations of the next batch up; the graph waits in the client's state."""
        st = ctx.state
        model = st["model"]
        ctx.on_device(model)
        model.train()
        x, y = next(st["batches"])
        ctx.rest_is_step(tuple(x.shape))
        z = model(x)
        st["pending"] = z
        ctx.continue_measuring()
        ctx.by_reference("activations", "labels")  # to the server block, not through the coordinator
        return {"activations": z, "labels": y}, {}

    def sglr_backward(self, ctx: ClientContext, down: dict) -> tuple[dict, dict]:
        """Backpropagate the received cut gradient through this client's block and step."""
        st = ctx.state
        z = st.pop("pending")
        ctx.rest_is_step(tuple(z.shape))
        # The client's own optimizer, its state restored (and counted as device memory) by the runtime.
        opt = ctx.optimizer([st["model"]])
        opt.zero_grad()
        z.backward(to_tensor(down["gradients"], z.device))
        opt.step()
        st["left"] -= 1
        if st["left"] == 0:
            del st["batches"]
        else:
            ctx.continue_measuring()
        return {}, {}

    def sglr_weights(self, ctx: ClientContext, down: dict) -> tuple[dict, dict]:
        """This client's device block for evaluation (telemetry: not training traffic)."""
        return {}, {"weights": module_weights(ctx.state["model"]), "num_samples": ctx.num_samples}
