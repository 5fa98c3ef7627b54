"""SplitFed v1 (Thapa et al., AAAI 2022): a server replica per client, all trained in parallel,
averaged once per round (server-side work, not on the link); FedAvg of the device blocks.

Per client per round: device weights down, (activations + labels up, gradients down) per
batch, device weights up.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from sfl_ray.algorithms.common import SplitConfigMixin, fedavg_replies, server_step, split_client_epoch, weighted_average
from sfl_ray.models.split import ModelParts
from sfl_ray.runtime.protocol import Algorithm, ClientContext, RoundRuntime, RoundSummary, ServerProgram
from sfl_ray.runtime.wire import load_weights, module_weights


class SplitFedV1Config(SplitConfigMixin):
    name: Literal["splitfed_v1"] = Field("splitfed_v1", description="SplitFed v1: a server replica per client.")


class ReplicaServer(ServerProgram):
    """Holds this round's server replicas, one per client it serves, each from the global weights.

    A replica's weights restart from the average every round; its optimizer state (Adam moments,
    momentum) is the client's own and carries over (train.optimizer_state=persist), as the
    reference code keeps one optimizer per server copy for the whole run."""

    # Between rounds a replica is only its optimizer state (kept in opt_state): its weights
    # restart from the average.
    _not_state = ServerProgram._not_state + ("replicas",)
    flops_by_shape = frozenset({"train_step"})  # one step of a replica of the same model

    def __init__(self, ctx):
        super().__init__(ctx)
        self.base = ctx.build_parts().server
        self.replicas: dict[int, tuple] = {}
        self.global_weights: dict = module_weights(self.base)
        self.opt_state: dict[int, dict] = {}

    def _keep_optimizers(self) -> None:
        if self.ctx.blueprint.persist_optimizers:
            for c, (_, opt) in self.replicas.items():
                self.opt_state[c] = opt.state_dict()

    def begin_round(self, global_weights: dict) -> None:
        self._keep_optimizers()
        self.global_weights = global_weights
        self.replicas = {}

    def state_dict(self) -> dict:
        self._keep_optimizers()
        return super().state_dict()

    def _replica(self, client: int) -> tuple:
        if client not in self.replicas:
            model = self.ctx.build_parts().server
            load_weights(model, self.global_weights)
            opt = self.ctx.optimizer([model])
            if client in self.opt_state:
                opt.load_state_dict(self.opt_state[client])
            self.replicas[client] = (model, opt)
        return self.replicas[client]

    def train_step(self, client: int, arrays: dict, info: dict) -> tuple[dict, dict]:
        model, opt = self._replica(client)
        return server_step(model, opt, arrays, self.ctx.after_reply)

    def replica_weights(self) -> dict[int, dict]:
        return {c: module_weights(m) for c, (m, _) in sorted(self.replicas.items())}


class SplitFedV1(Algorithm):
    name = "splitfed_v1"
    config_cls = SplitFedV1Config
    server_cls = ReplicaServer
    max_servers = None  # replicas are independent, so they may live on many server blocks

    def init_global(self, parts: ModelParts) -> None:
        self.global_device = module_weights(parts.device)
        self.global_server = module_weights(parts.server)

    def client_program(self, ctx: ClientContext, down: dict) -> tuple[dict, dict]:
        return split_client_epoch(ctx, down)

    def run_round(self, rt: RoundRuntime, rnd: int, clients: list[int]) -> RoundSummary:
        rt.servers("begin_round", self.global_server)
        replies = rt.clients(clients, {"weights": self.global_device}, parallel=True)
        self.global_device = fedavg_replies(replies, "weights", self.config.weighted)
        replicas: dict[int, dict] = {}
        for part in rt.servers("replica_weights"):
            replicas.update(part)
        n = {r.client: float(r.info["num_samples"]) if self.config.weighted else 1.0 for r in replies}
        self.global_server = weighted_average([(replicas[c], n[c]) for c in sorted(replicas)])
        return RoundSummary(extra={"server_replicas": len(replicas)})

    def eval_weights(self, rt: RoundRuntime) -> tuple[dict, dict]:
        return self.global_device, self.global_server
