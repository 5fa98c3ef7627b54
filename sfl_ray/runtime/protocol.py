"""The contract between algorithms (what is computed) and the runtime (where it runs).

An algorithm is one class with three pieces:
- `client_program(ctx, down) -> (up, info)`: what one device does in a round; runs in a client pool.
- `server_cls`: its server half, a `ServerProgram` hosted by a server block.
- `run_round(rt, rnd, clients)`: the schedule of one round; runs in the coordinator and
  talks to clients and servers only through the `RoundRuntime` it is handed.
The runtime never knows which algorithm it runs; algorithms never import ray.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Hashable, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from sfl_ray.config_base import Section
from sfl_ray.data.batches import client_batches
from sfl_ray.metrics.device_cost import MemoryTracker, Meter, off_device
from sfl_ray.models.split import ModelParts, build_parts
from sfl_ray.runtime.bulk import Put, by_reference
from sfl_ray.runtime.codec import Codec
from sfl_ray.runtime.link import Link
from sfl_ray.runtime.wire import to_device
from sfl_ray.seeding import derive_seed, torch_gen


@dataclass(frozen=True)
class Blueprint:
    """What every process needs to build the same models and optimizers (not the whole job config)."""

    model_name: str
    cut: Optional[str]
    in_shape: tuple[int, ...]
    num_classes: int
    seed: int
    train: Any          # TrainConfig
    algorithm: Any      # the algorithm's own config section
    torch_threads: int = 1
    rounds: int = 0     # stop.rounds: the planned training length (phased schedules need it)
    model: Any = None   # the ModelConfig (transformer shape, LoRA)
    count_labels: bool = True  # link.count_labels: whether labels count as link bytes
    augment: str = "none"  # data.augment, on client training batches
    measure: str = "exact"  # metrics.measure: how server blocks count their FLOPs (clients: per round)
    compression: str = "none"  # link.compression: activations up and gradients down (runtime.codec)
    int8_scale: str = "channel"  # link.int8_scale
    # The model's registry entry (builder, default cut): carried, so that processes which never
    # registered a plug-in model (Ray actors) build it without looking its name up.
    model_entry: Any = None

    @property
    def codec(self) -> Codec:
        """The link's compression, as every sender encodes with it."""
        return Codec(self.compression, self.int8_scale)

    @property
    def persist_optimizers(self) -> bool:
        """train.optimizer_state: keep optimizer state (moments, momentum) across rounds."""
        return getattr(self.train, "optimizer_state", "persist") == "persist"

    @property
    def precision(self) -> str:
        """train.precision: fp32, or the autocast dtype of forward passes (runtime.precision)."""
        return getattr(self.train, "precision", "fp32")

    def build_parts(self) -> ModelParts:
        return build_parts(self.model_name, self.cut, self.in_shape, self.num_classes, self.seed, self.model,
                           self.model_entry)

    def make_optimizer(self, params: Sequence[torch.Tensor] | Iterator[torch.Tensor],
                       lr: Optional[float] = None) -> torch.optim.Optimizer:
        t = self.train
        lr = t.lr if lr is None else lr
        if t.optimizer == "adam":
            return torch.optim.Adam(params, lr=lr, weight_decay=t.weight_decay)
        return torch.optim.SGD(params, lr=lr, momentum=t.momentum, weight_decay=t.weight_decay)


@dataclass
class ClientReply:
    """What a client program returned, and what the runtime measured around it."""

    client: int
    up: dict = field(default_factory=dict)            # counted uplink payload (kind -> arrays)
    info: dict = field(default_factory=dict)          # telemetry, not counted (num_samples, loss_sum, ...)
    bytes: dict = field(default_factory=dict)         # "direction/kind" -> bytes, includes `up`, down and link calls
    messages: dict = field(default_factory=dict)      # direction -> count
    flops: Optional[int] = 0                          # None: not measured (metrics.measure=off)
    peak_mem_bytes: Optional[int] = 0                 # None: not measured for this client (sampled/off)
    cuda_peak_mem_bytes: Optional[int] = 0
    saved_tensors: int = 0
    error: Optional[str] = None                       # traceback if the program failed
    lost: Optional[str] = None                        # a server block it talked to died (ActorLost)
    # Whether the client's pool holds state for it after this program (a pool may then hand the
    # client's next portable program to another pool only if not: see Algorithm.portable_programs).
    keeps_state: bool = True
    guest_state: Optional[dict] = None                # state a program left on a pool not the client's own


class ClientContext:
    """What a client program may use: its data, the pool's models, an optimizer, the link."""

    def __init__(self, client: int, rnd: int, blueprint: Blueprint, parts: ModelParts,
                 data: tuple[np.ndarray, np.ndarray], indices: np.ndarray, link: Link,
                 state: dict, tracker: MemoryTracker, device: torch.device, meter: Optional[Meter] = None,
                 program: str = "client_program"):
        self.client, self.round, self.blueprint = client, rnd, blueprint
        self.meter, self.program = meter, program
        self.parts, self.link, self.state, self.device = parts, link, state, device
        self.config, self.train = blueprint.algorithm, blueprint.train
        self._data, self.indices, self._tracker = data, indices, tracker
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.keep_measuring = False
        self.bulk_kinds: tuple[str, ...] = ()

    def by_reference(self, *kinds: str) -> None:
        """These upload kinds of this program's reply are bulk: counted on the link as usual, then
        stored where the server block reads them, the reply carrying `Bulk` handles in their place
        (runtime.bulk). The schedule passes the handles to `rt.server`, never the arrays."""
        self.bulk_kinds = tuple(kinds)

    @property
    def num_samples(self) -> int:
        return int(len(self.indices))

    def batches(self, epoch: int = 0, varies: Optional[Callable[[int], Hashable]] = None
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This client's shuffled mini-batches for one local epoch (order from seed, round, client).

        The work a program does between two batches is one step: its FLOPs are measured once per
        (program, batch shapes, varies(k)) and reused (metrics.measure=sampled). A program whose
        step work depends on the batch index k beyond its shape (e.g. an extra forward on the
        batches it uploads) says how through `varies`."""
        x, y = self._data
        for k, (xb, yb) in enumerate(client_batches(x, y, self.indices, self.train.batch_size, self.blueprint.seed,
                                                    self.round, self.client, epoch, self.blueprint.augment)):
            token = None
            if self.meter is not None:
                token = self.meter.begin_batch((self.program, tuple(xb.shape), str(xb.dtype), tuple(yb.shape),
                                                varies(k) if varies is not None else None))
            try:
                yield to_device(xb, self.device), to_device(yb, self.device)
            finally:
                if self.meter is not None:
                    self.meter.end_batch(token)

    def rest_is_step(self, *key: Hashable) -> None:
        """The rest of this program is one step whose FLOPs are a function of `key` (e.g. the
        batch shape) alone: under metrics.measure=sampled they are measured once per key."""
        if self.meter is not None:
            self.meter.rest_is_step((self.program, *key))

    def num_batches(self) -> int:
        return -(-self.num_samples // self.train.batch_size)

    def optimizer(self, modules: Sequence[nn.Module], lr: Optional[float] = None,
                  key: str = "device") -> torch.optim.Optimizer:
        """This client's optimizer `key` over the modules' parameters.

        With train.optimizer_state=persist (the default, as the reference codes) the state it
        ended the client's previous program with (Adam moments, momentum buffers) is restored,
        and the runtime stores it again when the program returns: it is client state, like the
        weights. Under FedAvg a client's weights are replaced by the average while its moments
        stay its own. The restored state counts as device memory, like state created by a first
        step."""
        for m in modules:
            self._tracker.track_module(m)
        opt = self.blueprint.make_optimizer([p for m in modules for p in m.parameters() if p.requires_grad], lr)
        saved_round, saved = self.state.get(f"optim/{key}", (None, None))
        # reset: a fresh optimizer each round (a round may span several programs, e.g. SGLR's).
        if saved is not None and (self.blueprint.persist_optimizers or saved_round == self.round):
            opt.load_state_dict(saved)
            for st in opt.state.values():  # restored by reference: count it as this program's memory
                for t in st.values():
                    if isinstance(t, torch.Tensor):
                        self._tracker.track_tensor(t)
            if lr is not None:
                for group in opt.param_groups:
                    group["lr"] = lr
        self._tracker.track_optimizer(opt)
        self.optimizers[key] = opt
        return opt

    def save_optimizers(self) -> None:
        """Keep this program's optimizer state for the client's next program (runtime calls it)."""
        for key, opt in self.optimizers.items():
            if opt.state:
                self.state[f"optim/{key}"] = (self.round, opt.state_dict())
            else:  # no per-parameter state (plain SGD): a fresh optimizer is the same, keep nothing
                self.state.pop(f"optim/{key}", None)
        self.optimizers = {}

    def continue_measuring(self) -> None:
        """The client's next program continues this one (e.g. SGLR's backward after its forward):
        its memory is measured as one, so the peak sees activations, gradients and optimizer
        state together."""
        self.keep_measuring = True

    def on_device(self, *modules: nn.Module) -> None:
        """Declare modules resident on the device (counted in peak memory) without an optimizer."""
        for m in modules:
            self._tracker.track_module(m)

    def rng(self, purpose: str) -> torch.Generator:
        return torch_gen(self.blueprint.seed, purpose, self.round, self.client)

    def seed_for(self, *parts: object) -> int:
        return derive_seed(self.blueprint.seed, *parts, self.round, self.client)


class ServerContext:
    """What a server program may use: models built from the blueprint, optimizers, its index."""

    def __init__(self, blueprint: Blueprint, index: int, device: torch.device, put: Optional[Put] = None,
                 after_reply: Optional[Callable[[Callable[[], Any]], None]] = None):
        self.blueprint, self.index, self.device = blueprint, index, device
        self.config, self.train = blueprint.algorithm, blueprint.train
        self._put = put
        self._after_reply = after_reply

    def after_reply(self, work: Callable[[], Any]) -> None:
        """Run `work` once the reply to the current link request has left, before the block
        serves anything else: work the reply does not depend on (the optimizer step after the
        backward that gave the cut gradient), overlapped with the client's own. The block's
        state, and every number, are those of running it at once; where there is no reply to
        wait for (a schedule's call, no block) it runs at once."""
        if self._after_reply is None:
            work()
        else:
            self._after_reply(work)

    def bulk(self, payload: dict) -> dict:
        """`payload` (kind -> numpy array, already in its wire form) stored as one object, each
        kind replaced by a `Bulk` handle: what the schedule passes on to clients (`per_client` of
        `rt.clients`) without holding the arrays. A receiving pool fetches, counts and decodes it."""
        if self._put is None:
            return dict(payload)
        return by_reference(payload, list(payload), self._put)

    def build_parts(self) -> ModelParts:
        """A fresh copy of the model's parts on this block's device. Building (which runs a probe
        forward to find the cut's shape) is not server work: a FLOP count around it sees nothing."""
        with off_device():
            parts = self.blueprint.build_parts()
        parts.device.to(self.device)
        parts.server.to(self.device)
        return parts

    def optimizer(self, modules: Sequence[nn.Module], lr: Optional[float] = None) -> torch.optim.Optimizer:
        return self.blueprint.make_optimizer([p for m in modules for p in m.parameters() if p.requires_grad], lr)


class ServerProgram:
    """An algorithm's server half. Public methods are called by name: from clients through the
    link (`method(client, arrays, info) -> (arrays, info)`, counted) or from the schedule
    (`rt.server(method, *args)`, internal to the server side, not counted). Work a reply does
    not depend on may wait until it has left: `ctx.after_reply`."""

    _not_state = ("ctx", "parts")
    # Link methods whose FLOPs are a function of their request's array shapes alone (one step per
    # request): measured once per shape and reused under metrics.measure=sampled.
    flops_by_shape: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, ctx: ServerContext):
        self.ctx = ctx

    def flop_key(self, method: str, args: tuple) -> Optional[tuple]:
        """What alone determines the FLOPs of the schedule's call `method(*args)` (the shapes it
        will step on), if the program knows it: metrics.measure=sampled then counts them once per
        key. None, the default: counted op by op every time."""
        return None

    def state_dict(self) -> dict:
        """Everything this server half holds between rounds, for checkpoints: its attributes
        (models and optimizers as their state dicts), as a plain tree packed for the trip to the
        coordinator (runtime.checkpoint.pack)."""
        from sfl_ray.runtime.checkpoint import pack, to_tree
        return {k: pack(to_tree(v)) for k, v in vars(self).items() if k not in self._not_state}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`: models and optimizers in place, other attributes replaced.
        Programs holding modules created on demand (per client) override this."""
        from sfl_ray.runtime.checkpoint import load_into
        for k, v in state.items():
            setattr(self, k, load_into(getattr(self, k, None), v))


@dataclass
class RoundSummary:
    """What a schedule reports for a round beyond what the runtime measured."""

    train_loss: float = float("nan")
    phase: Optional[str] = None
    server_flops: int = 0  # server work done outside the server blocks (e.g. by Ray Train workers)
    extra: dict = field(default_factory=dict)


class RoundRuntime(abc.ABC):
    """The runtime as a schedule sees it during one round."""

    num_servers: int

    @abc.abstractmethod
    def clients(self, ids: Sequence[int], down: dict, parallel: bool = True,
                program: str = "client_program", per_client: Optional[Mapping[int, dict]] = None
                ) -> list[ClientReply]:
        """Run `program` on these clients, each receiving `down` (counted as downlink), plus
        `per_client[c]` for client c if given (e.g. its own gradient). parallel=False runs them
        one after another in the given order (and the simulated time adds up); replies come
        back in the order of `ids`."""

    @abc.abstractmethod
    def server(self, method: str, *args: Any, index: int = 0) -> Any:
        """Call a server program method (server-side work, not counted on the link)."""

    def servers(self, method: str, *args: Any) -> list[Any]:
        """Call a server program method on every server block."""
        return [self.server(method, *args, index=i) for i in range(self.num_servers)]

    def keep(self, value: Any) -> Any:
        """`value` with its bulk payloads (runtime.bulk handles, e.g. Ampere's transfer) held by the
        runtime itself past this row, so that losing the pool that made them loses nothing: for a
        schedule that reads them in a later row. Only handles change; the arrays do not move
        through the coordinator."""
        return value

    def fit_server(self, request: Any) -> list[dict]:
        """Train a server block on a consolidated activation set (a `ServerFit`) with the
        runtime's training service (Ray Train); returns per-epoch stats and weights."""
        raise NotImplementedError("this runtime offers no server training service")


class Algorithm(abc.ABC):
    """Base of every algorithm. Subclasses set `name`, `config_cls`, `server_cls` and
    implement `init_global`, `client_program`, `run_round` and `eval_weights`."""

    name: ClassVar[str]
    config_cls: ClassVar[type[Section]]
    server_cls: ClassVar[Optional[type[ServerProgram]]] = None
    # One server model trained by everyone (the default) cannot be spread over several blocks.
    max_servers: ClassVar[Optional[int]] = 1
    # Client programs that may run on any pool, not only the client's own: they keep nothing in
    # the client's state across programs but its optimizers, and talk to no server block. A pool
    # that has run its own clients of a parallel round takes such programs of clients that hold
    # no state from a busier pool (cluster.balance_pools); the result does not depend on the pool.
    portable_programs: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, blueprint: Blueprint):
        self.blueprint = blueprint
        self.config = blueprint.algorithm
        self.train = blueprint.train

    @classmethod
    def wants_server_blocks(cls, config: Any) -> bool:
        """Whether this run needs server block actors (Ampere with Ray Train does not)."""
        return cls.server_cls is not None

    # -- schedule side (coordinator) ---------------------------------------------------
    @abc.abstractmethod
    def init_global(self, parts: ModelParts) -> None:
        """Set the global state (e.g. the device weights to broadcast) from fresh models."""

    @abc.abstractmethod
    def run_round(self, rt: RoundRuntime, rnd: int, clients: list[int]) -> RoundSummary:
        """One round: sample -> device work -> server work -> aggregate."""

    @abc.abstractmethod
    def eval_weights(self, rt: RoundRuntime) -> Optional[tuple[dict, dict]]:
        """(device block weights, server block weights) of the global model to evaluate, or None
        when there is no meaningful global model yet (e.g. Ampere before its server phase)."""

    def final_phases(self) -> int:
        """Rows that always follow the last round, whatever stopped the rounds (Ampere's
        transfer and server epochs)."""
        return 0

    def run_final(self, rt: RoundRuntime, rnd: int, index: int) -> RoundSummary:
        """Final phase `index` (0-based), reported as row `rnd`."""
        raise NotImplementedError(f"{self.name} declares final phases but does not run them")

    def state_dict(self) -> dict:
        """The schedule-side state to checkpoint."""
        return {k: v for k, v in vars(self).items() if k.startswith("global_")}

    def load_state_dict(self, state: dict) -> None:
        """Restore the schedule-side state of a checkpoint (instead of init_global)."""
        for k, v in state.items():
            setattr(self, k, v)

    # -- client side (pool) ------------------------------------------------------------
    def build_client_modules(self, parts: ModelParts) -> None:
        """Build, once per pool and before any client runs, the modules client programs reuse
        (e.g. an aux head), so that building them is never measured as a client's cost."""

    @abc.abstractmethod
    def client_program(self, ctx: ClientContext, down: dict) -> tuple[dict, dict]:
        """What one device does in a round; returns (upload kind -> arrays, telemetry such as
        num_samples and loss_sum)."""
