"""Ampere (Zhang, Wong, Varghese; arXiv 2507.07130): unidirectional inter-block training.

Phase 1 (rounds 1..stop.rounds): devices train their block with a generated light auxiliary
head and its local loss; device block and head are FedAvg'd. Nothing else crosses the link.
Phase 2 (one row, "transfer"): each device sends the activations of its whole data set, made by
the trained, frozen device block, once. Phase 3 (`server_epochs` rows, "server"): the server
block trains on the consolidated activations, shuffled across devices, so its batches are
IID-like although each device's data is not. No gradient ever flows to a device.

Only the abstract was available; the phases follow the spec's [PROPOSED] design.
"""

from __future__ import annotations

from typing import Literal, Optional

import numpy as np
import torch
from pydantic import Field

from sfl_ray.config_base import MAX_RATE
from sfl_ray.algorithms.common import SplitConfigMixin, fedavg_replies
from sfl_ray.algorithms.cse_fsl import AuxHeadMixin, local_loss_program
from sfl_ray.models.aux import AuxConfig
from sfl_ray.models.split import ModelParts
from sfl_ray.runtime.protocol import Algorithm, ClientContext, RoundRuntime, RoundSummary, ServerProgram
from sfl_ray.runtime.server_fit import ServerFit, consolidate, train_epoch
from sfl_ray.runtime.wire import load_weights, module_weights, to_tensor
from sfl_ray.seeding import np_rng


class AmpereConfig(SplitConfigMixin):
    name: Literal["ampere"] = Field("ampere", description="Ampere: device phase, one transfer, server phase.")
    aux: AuxConfig = Field(AuxConfig(), description="The generated auxiliary head (kind and param/FLOP budget).")
    server_epochs: int = Field(5, gt=0, description="Epochs of server-block training on the consolidated set.")
    server_batch_size: Optional[int] = Field(None, gt=0, description="Server batch size; None = train.batch_size.")
    server_lr: Optional[float] = Field(None, gt=0, le=MAX_RATE,
                                       description="Server learning rate (at most 1e38); None = train.lr.")
    shuffle_across_devices: bool = Field(True, description="Shuffle the consolidated set across devices "
                                         "(False: device by device, as SFL sees it; for ablations).")
    server_trainer: Literal["actor", "ray_train"] = Field(
        "actor", description="Where the server phase runs: the server block actor, or a Ray Train TorchTrainer "
        "fed by a Ray Data dataset, data-parallel over cluster.num_servers workers (ray backend only).")


def epoch_order(seed: int, epoch: int, n: int, shuffle: bool) -> np.ndarray:
    """Sample order of one server epoch: shuffled across devices, or device by device."""
    return np_rng(seed, "ampere_server", epoch).permutation(n) if shuffle else np.arange(n)


class ConsolidatedServer(ServerProgram):
    """Trains the server block on the pooled activations of all devices (server_trainer: actor)."""

    def __init__(self, ctx):
        super().__init__(ctx)
        self.model = ctx.build_parts().server
        self.opt = ctx.optimizer([self.model], lr=ctx.config.server_lr)

    def set_dataset(self, parts: list[tuple[np.ndarray, np.ndarray, int]]) -> int:
        """The devices' transfers, (activations, labels, device id) each, consolidated here: they
        come from the devices by reference, not through the coordinator."""
        z, y, owner = consolidate(parts)
        self.z, self.y, self.owner = to_tensor(z), to_tensor(y), owner
        return len(self.y)

    def train_epoch(self, epoch: int) -> dict:
        cfg, n = self.ctx.config, len(self.y)
        bs = cfg.server_batch_size or self.ctx.train.batch_size
        order = epoch_order(self.ctx.blueprint.seed, epoch, n, cfg.shuffle_across_devices)
        batches = ((self.z[b], self.y[b], self.owner[b]) for b in (order[i: i + bs] for i in range(0, n, bs)))
        s = train_epoch(self.model, self.opt, batches)
        return {"train_loss": s["loss_sum"] / s["count"],
                "server_batch_devices_mean": s["devices_per_batch_sum"] / s["batches"]}

    def get_weights(self) -> dict:
        return module_weights(self.model)


class Ampere(AuxHeadMixin, Algorithm):
    name = "ampere"
    config_cls = AmpereConfig
    server_cls = ConsolidatedServer

    @classmethod
    def wants_server_blocks(cls, config) -> bool:
        return config.server_trainer == "actor"  # Ray Train brings its own workers

    def init_global(self, parts: ModelParts) -> None:
        self.global_server = module_weights(parts.server)
        self.global_device = module_weights(parts.device)
        self.global_aux = module_weights(self.aux_module(parts))
        self.global_phase = "device"

    # -- phase 1 -------------------------------------------------------------------------
    def client_program(self, ctx: ClientContext, down: dict) -> tuple[dict, dict]:
        return local_loss_program(ctx, down, self.aux_module(ctx.parts), upload_every=None)

    def run_round(self, rt: RoundRuntime, rnd: int, clients: list[int]) -> RoundSummary:
        replies = rt.clients(clients, {"weights": self.global_device, "aux_weights": self.global_aux})
        self.global_device = fedavg_replies(replies, "weights", self.config.weighted)
        self.global_aux = fedavg_replies(replies, "aux_weights", self.config.weighted)
        return RoundSummary(phase="device")

    # -- phases 2 and 3 ------------------------------------------------------------------
    def final_phases(self) -> int:
        return 1 + self.config.server_epochs

    def activations_program(self, ctx: ClientContext, down: dict) -> tuple[dict, dict]:
        """Phase 2 on a device: the frozen block's activations of every local sample, sent once."""
        device = ctx.parts.device
        load_weights(device, down["weights"])
        device.eval()
        x, y = ctx._data
        bs = ctx.train.batch_size  # inference in training-sized batches: the device's memory is what it is
        with torch.no_grad():
            z = torch.cat([device(torch.from_numpy(x[ctx.indices[i: i + bs]]).to(ctx.device))
                           for i in range(0, ctx.num_samples, bs)])
        ctx.by_reference("activations", "labels")  # read where they were stored, not via the coordinator
        return {"activations": z, "labels": torch.from_numpy(y[ctx.indices])}, {"num_samples": ctx.num_samples}

    def run_final(self, rt: RoundRuntime, rnd: int, index: int) -> RoundSummary:
        if index == 0:
            everyone = list(range(self.train.num_clients))
            replies = rt.clients(everyone, {"weights": self.global_device}, program="activations_program")
            # `Bulk` handles: the coordinator passes references, the arrays go device -> server.
            parts = [(r.up["activations"], r.up["labels"], r.client) for r in replies]
            if self.config.server_trainer == "actor":
                rt.server("set_dataset", parts)
            else:  # read by Ray Train's workers in the next row: held by the runtime till then
                self._parts = rt.keep(parts)
            return RoundSummary(phase="transfer", extra={"consolidated_samples": sum(len(p[1]) for p in parts)})
        self.global_phase = "server"
        if self.config.server_trainer == "actor":
            stats = rt.server("train_epoch", index - 1)
            return RoundSummary(train_loss=stats.pop("train_loss"), phase="server", extra=stats)
        if index == 1:  # one Ray Train run covers every epoch; each reports its own row
            cfg = self.config
            self._fit = rt.fit_server(ServerFit(
                parts=self._parts, init_weights=self.global_server, epochs=cfg.server_epochs,
                batch_size=cfg.server_batch_size or self.train.batch_size, lr=cfg.server_lr,
                shuffle=cfg.shuffle_across_devices, seed=self.blueprint.seed))
            self._parts = None  # the stored transfers can go
        epoch = self._fit[index - 1]
        self._fit_weights = epoch["weights"]
        return RoundSummary(train_loss=epoch["loss"], phase="server", server_flops=epoch["flops"],
                            extra={"server_batch_devices_mean": epoch["server_batch_devices_mean"]})

    def eval_weights(self, rt: RoundRuntime):
        if self.global_phase != "server":
            return None  # the server block is untrained until phase 3
        if self.config.server_trainer == "ray_train":
            return self.global_device, self._fit_weights
        return self.global_device, rt.server("get_weights")
