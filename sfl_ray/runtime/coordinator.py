"""The coordinator: owns the round loop. A plain class, made a Ray actor only at launch.

Each round: sample clients -> the algorithm's schedule (through a RoundRuntime that records
every reply) -> server FLOPs -> account bytes, FLOPs, memory, time -> evaluate -> write a row
-> check the stop conditions.
"""

from __future__ import annotations

import enum
import os
import importlib.metadata
import logging
import math
import platform
import threading
import time
from typing import Any, Callable, Mapping, Optional, Protocol, Sequence

import torch

from sfl_ray.metrics.cost_model import DeviceProfiles, group_time, server_time
from sfl_ray.metrics.evaluate import Evaluator
from sfl_ray.metrics.sampling import MeasurePlan, RoundMeasure
from sfl_ray.metrics.writer import RunWriter
from sfl_ray.runtime.codec import Codec, decode
from sfl_ray.runtime.faults import ActorLost
from sfl_ray.runtime.finite import check_row
from sfl_ray.runtime.protocol import Algorithm, ClientReply, RoundRuntime
from sfl_ray.seeding import np_rng

log = logging.getLogger("sfl_ray.coordinator")
GIB = 1024 ** 3


class State(str, enum.Enum):
    STARTING = "STARTING"
    RUNNING_ROUND = "RUNNING_ROUND"
    EVALUATING = "EVALUATING"
    FINISHED = "FINISHED"
    ERRORED = "ERRORED"


class ClientFailed(RuntimeError):
    """A client program raised; the message names the client and round."""


class Executor(Protocol):
    """Where client programs and server calls run (the backends implement this)."""

    num_servers: int

    def run_clients(self, program: str, clients: Sequence[int], rnd: int, down: dict, parallel: bool,
                    on_done: Callable[[ClientReply], None],
                    per_client: Optional[Mapping[int, dict]] = None,
                    measure: Optional[Callable[[int], str]] = None) -> list[ClientReply]: ...

    def server_control(self, index: int, method: str, *args: Any) -> Any: ...

    def pop_server_flops(self) -> int: ...

    def fit_server(self, request: Any) -> list[dict]: ...

    def keep_bulk(self, value: Any) -> Any: ...

    def client_states(self, clients: Optional[Sequence[int]] = None) -> dict: ...

    def load_client_states(self, states: dict) -> None: ...


class _Round(RoundRuntime):
    """The RoundRuntime handed to a schedule: records every reply and dispatch group."""

    def __init__(self, executor: Executor, rnd: int, on_done: Callable[[ClientReply], None],
                 measure: Optional[RoundMeasure] = None, codec: Codec = Codec()):
        self.executor, self.rnd, self.on_done, self.codec = executor, rnd, on_done, codec
        self.measure = measure or MeasurePlan().for_round(rnd)
        self.num_servers = executor.num_servers
        self.groups: list[tuple[bool, list[ClientReply]]] = []

    def clients(self, ids, down, parallel=True, program="client_program", per_client=None):
        # The schedule's side of the link: what goes down leaves compressed, what comes up in
        # replies is decoded. Bulk payloads (runtime.bulk: SGLR's activations and gradients,
        # Ampere's transfer) are handles here; the server block or pool that reads them decodes.
        down = self.codec.encode(down)
        if per_client:
            per_client = {c: self.codec.encode(p) for c, p in per_client.items()}
        self.measure.pick(list(ids))
        replies = self.executor.run_clients(program, list(ids), self.rnd, down, parallel, self.on_done, per_client,
                                            measure=self.measure.mode)
        for r in replies:
            r.up = decode(r.up)
        lost = [r for r in replies if r.lost]
        if lost:
            raise ActorLost(f"round {self.rnd}, client {lost[0].client}: {lost[0].lost}")
        failed = [r for r in replies if r.error]
        if failed:
            r = failed[0]
            last = r.error.strip().splitlines()[-1]
            raise ClientFailed(f"client {r.client} failed in round {self.rnd}: {last}\n{r.error}")
        self.groups.append((parallel, replies))
        return replies

    def server(self, method, *args, index=0):
        return self.executor.server_control(index, method, *args)

    def fit_server(self, request):
        return self.executor.fit_server(request)

    def keep(self, value):
        return self.executor.keep_bulk(value)

    @property
    def replies(self) -> list[ClientReply]:
        return [r for _, rs in self.groups for r in rs]


class Coordinator:
    """Runs rounds until a stop condition holds; writes metrics and the summary."""

    def __init__(self, algorithm: Algorithm, executor: Executor, evaluator: Evaluator, writer: RunWriter,
                 *, num_clients: int, clients_per_round: int, stop, cost_model, seed: int,
                 torch_threads: int = 1, on_row: Optional[Callable[[dict], None]] = None,
                 checkpoint_every: int = 0, keep_checkpoints: int = 2,
                 measure: Optional[MeasurePlan] = None):
        torch.set_num_threads(torch_threads)
        self.measure = measure or MeasurePlan()  # exact unless the launcher says (metrics.measure)
        self.on_row = on_row
        self.algorithm, self.executor, self.evaluator, self.writer = algorithm, executor, evaluator, writer
        self.num_clients, self.per_round = num_clients, clients_per_round
        self.stop, self.cost_model, self.seed = stop, cost_model, seed
        self.profiles = DeviceProfiles(cost_model, num_clients, seed)
        self.state = State.STARTING
        self._progress: dict = {"state": self.state.value, "round": 0, "pid": os.getpid(),
                                "rounds": stop.rounds + algorithm.final_phases(),
                                "clients_done": 0, "clients_total": 0, "eval_accuracy": None, "row": None}
        self._lock = threading.Lock()
        self.bytes_cum = 0
        self.sim_cum = 0.0
        self.checkpoint_every = checkpoint_every
        self.faults = 0            # lost actors recovered (rows and summary say how many)
        self.max_round_attempts = 3
        self._after: Optional[tuple[int, dict]] = None  # (round, state after that round)
        self.checkpointer = None
        if checkpoint_every > 0:
            from sfl_ray.runtime.checkpoint import Checkpointer
            self.checkpointer = Checkpointer(writer, keep_checkpoints)
        self.checkpoint_s = 0.0  # time spent writing checkpoints (reported in the summary)

    # -- progress (read by the driver while run() is busy) -------------------------------
    def progress(self) -> dict:
        with self._lock:
            return dict(self._progress)

    def _set(self, **kw: Any) -> None:
        with self._lock:
            self._progress.update(kw)

    # -- the loop ------------------------------------------------------------------------
    def sample(self, rnd: int) -> list[int]:
        """Clients of round `rnd` (from 1): a derived stream, independent of everything else."""
        if self.per_round >= self.num_clients:
            return list(range(self.num_clients))
        picked = np_rng(self.seed, "sample", rnd).choice(self.num_clients, self.per_round, replace=False)
        return sorted(int(c) for c in picked)

    def run(self, start_round: int = 1) -> dict:
        try:
            self.algorithm.init_global(self.evaluator.parts) if start_round == 1 else None
            reason = "rounds"
            rnd = start_round
            for rnd in range(start_round, self.stop.rounds + 1):
                row = self.run_one_round(rnd)
                reason = self._stop_reason(rnd, row)
                if self.checkpointer is not None and (rnd % self.checkpoint_every == 0 or reason):
                    self.save_checkpoint(rnd)
                if reason:
                    break
            for i in range(self.algorithm.final_phases()):
                rnd += 1
                self.run_one_round(rnd, final=i)
            summary = self._summary(rnd, reason or "rounds")
            self.writer.write_summary(summary)
            self.state = State.FINISHED
            self._set(state=self.state.value)
            return summary
        except BaseException as err:
            self.writer.end_tracking("FAILED" if isinstance(err, Exception) else "KILLED")
            self.state = State.ERRORED
            self._set(state=self.state.value)
            raise

    # -- checkpoints -----------------------------------------------------------------------
    def _gather(self, ran: Optional[set[int]] = None) -> dict:
        """The state of the schedule, every client and every server block, and the counters.
        `ran`: the clients that ran since `self._after` was taken; only theirs is fetched (a
        client's state changes only when it runs), so a round's snapshot costs what the round's
        clients hold, however many clients are registered or were sampled before."""
        from sfl_ray.runtime.checkpoint import to_tree, unpack

        if ran is None or self._after is None:
            clients = unpack(self.executor.client_states())
        else:
            clients = {c: st for c, st in self._after[1]["clients"].items() if c not in ran}
            clients.update(unpack(self.executor.client_states(sorted(ran))))
        servers = [unpack(self.executor.server_control(i, "state_dict")) for i in range(self.executor.num_servers)]
        return {"algorithm": to_tree(self.algorithm.state_dict()), "clients": clients, "servers": servers,
                "coordinator": {"bytes_cum": self.bytes_cum, "sim_cum": self.sim_cum, "faults": self.faults}}

    def save_checkpoint(self, rnd: int) -> dict:
        """Everything needed to continue after round `rnd` as if nothing had stopped."""
        from sfl_ray.runtime.checkpoint import to_tree

        t0 = time.perf_counter()
        # Where actors can be lost, the state after the round was taken inside it (see _round).
        state = dict(self._after[1]) if self._after is not None and self._after[0] == rnd else self._gather()
        state["coordinator"] = {**state["coordinator"], "faults": self.faults}
        state["rows"] = to_tree(self.writer.rows)
        entry = self.checkpointer.save(rnd, state)
        self.checkpoint_s += time.perf_counter() - t0
        return entry

    def _load(self, state: dict) -> None:
        """Put the schedule, every client, every server block and the counters back as `_gather`
        took them; work done since (server FLOPs) is dropped."""
        from sfl_ray.runtime.checkpoint import from_tree, pack

        self.algorithm.load_state_dict(from_tree(state["algorithm"]))
        self.executor.load_client_states(pack(state["clients"]))
        for i, s in enumerate(state["servers"]):
            self.executor.server_control(i, "load_state_dict", pack(s))
        self.executor.pop_server_flops()
        self.bytes_cum = state["coordinator"]["bytes_cum"]
        self.sim_cum = state["coordinator"]["sim_cum"]

    def restore(self, state: dict, recovered: bool = False) -> int:
        """Continue from a checkpoint (see save_checkpoint); returns the next round to run."""
        from sfl_ray.runtime.checkpoint import from_tree

        self._load(state)
        self.faults = state["coordinator"].get("faults", 0) + int(recovered)
        self.writer.reset_rows(from_tree(state["rows"]))
        self._after = (int(state["round"]), {k: v for k, v in state.items() if k != "rows"})
        return int(state["round"]) + 1

    # -- faults ---------------------------------------------------------------------------
    @property
    def _recoverable(self) -> bool:
        return hasattr(self.executor, "recover")

    def _start_snapshot(self, rnd: int) -> dict:
        """The state at the start of round `rnd`: taken at the end of the previous round (inside
        it, so a fault while taking it re-runs that round), or now for the first round."""
        if self._after is not None and self._after[0] == rnd - 1:
            return self._after[1]
        for attempt in range(self.max_round_attempts):
            try:
                return self._gather()
            except ActorLost as err:  # nothing has run since the last restore: a restarted actor is as it was
                self.faults += 1
                log.warning("fault before round %d: %s; waiting for the actor", rnd, err)
                if attempt + 1 == self.max_round_attempts:
                    raise
                self.executor.recover()
        raise AssertionError("unreachable")

    def _roll_back(self, snap: dict) -> None:
        """After a lost actor: wait for it, then the round-start state (the lost attempt's server
        work, bytes and time are not the round's)."""
        self.executor.recover()
        self._load(snap)

    def run_one_round(self, rnd: int, final: Optional[int] = None) -> dict:
        """One row: a round of the algorithm, or (final=i) its i-th final phase. Where actors can
        be lost (the Ray backend), a lost pool or server block is waited for (restarted), the
        round-start snapshot restored and the round run again: same seeds, same result."""
        if not self._recoverable:
            return self._round(rnd, final, 0)
        snap, faults = self._start_snapshot(rnd), 0
        while True:
            try:
                if faults:
                    self._roll_back(snap)
                return self._round(rnd, final, faults)
            except ActorLost as err:
                faults += 1
                self.faults += 1
                log.warning("fault %d in round %d: %s; restoring the round-start state and re-running it",
                            faults, rnd, err)
                if faults >= self.max_round_attempts:
                    raise

    def _round(self, rnd: int, final: Optional[int], faults: int) -> dict:
        clients = self.sample(rnd) if final is None else []
        self.state = State.RUNNING_ROUND
        self._set(state=self.state.value, round=rnd, clients_done=0, clients_total=len(clients))
        done: set[int] = set()

        def on_done(reply: ClientReply) -> None:
            done.add(reply.client)  # lock-step schedules reply many times per client and round
            self._set(clients_done=len(done))

        t0 = time.perf_counter()
        rt = _Round(self.executor, rnd, on_done, self.measure.for_round(rnd, clients), self.algorithm.blueprint.codec)
        if final is None:
            summary = self.algorithm.run_round(rt, rnd, clients)
        else:
            summary = self.algorithm.run_final(rt, rnd, final)
        server_flops = self.executor.pop_server_flops() + summary.server_flops
        row = self._account(rnd, rt, summary, server_flops, clients)
        weights = self.algorithm.eval_weights(rt) if self._due_eval(rnd) or final is not None else None
        self.executor.pop_server_flops()  # fetching weights is not training work
        if weights is not None:
            self.state = State.EVALUATING
            self._set(state=self.state.value)
            row.update(self.evaluator.evaluate(*weights))
        else:
            row.update({"eval_accuracy": None, "eval_loss": None})
        row["faults"] = faults
        if self._recoverable:  # the next round's start state, before anything is written
            follows = self._after is not None and self._after[0] == rnd - 1  # this round ran from it
            self._after = (rnd, self._gather({r.client for r in rt.replies} if follows else None))
        row["wall_s"] = time.perf_counter() - t0
        self.writer.append_row(row)
        check_row(row)  # a NaN server/eval loss ends the run, after its row shows it
        self._set(row=row, eval_accuracy=row.get("eval_accuracy") if row.get("eval_accuracy") is not None
                  else self._progress.get("eval_accuracy"))
        if self.on_row is not None:
            self.on_row(self.progress())
        return row

    def _account(self, rnd: int, rt: _Round, summary, server_flops: Optional[int], clients: list[int]) -> dict:
        replies = rt.replies
        by_kind: dict[str, int] = {}
        for r in replies:
            for k, v in r.bytes.items():
                by_kind[k] = by_kind.get(k, 0) + v
        up = sum(v for k, v in by_kind.items() if k.startswith("up/"))
        down = sum(v for k, v in by_kind.items() if k.startswith("down/"))
        self.bytes_cum += up + down
        counted = self.measure.mode != "off"
        if counted:  # simulated time needs the FLOPs
            sim = sum(group_time([self._client_time(r) for r in rs], par) for par, rs in rt.groups)
            sim += server_time(server_flops, self.cost_model)
            self.sim_cum += sim
        loss = summary.train_loss
        if loss is None or (isinstance(loss, float) and math.isnan(loss)):
            n = sum(r.info.get("loss_count", 0) for r in replies if "loss_sum" in r.info)
            loss = sum(r.info["loss_sum"] for r in replies if "loss_sum" in r.info) / n if n else None
        peaks = [r.peak_mem_bytes for r in replies if r.peak_mem_bytes is not None]
        cuda_peaks = [r.cuda_peak_mem_bytes for r in replies if r.cuda_peak_mem_bytes is not None]
        return {
            "round": rnd, "algorithm": self.algorithm.name, "phase": summary.phase,
            "clients": len({r.client for r in replies}) or len(clients), "train_loss": loss,
            "bytes_up": up, "bytes_down": down, "bytes_cum": self.bytes_cum,
            "bytes_by_kind": dict(sorted(by_kind.items())),
            "measure": self.measure.mode,
            "device_flops": sum(r.flops for r in replies) if counted else None,
            # The peak of the clients whose memory was tracked (all of them with measure=exact).
            "device_peak_mem_bytes": (max(peaks) if peaks else (0 if not replies and counted else None)),
            "mem_clients": len({r.client for r in replies if r.peak_mem_bytes is not None}),
            "device_cuda_peak_mem_bytes": max(cuda_peaks) if cuda_peaks else (0 if counted else None),
            "server_flops": server_flops if counted else None,
            "sim_s": sim if counted else None, "sim_cum_s": self.sim_cum if counted else None,
            **summary.extra,
        }

    def _client_time(self, r: ClientReply) -> float:
        up = sum(v for k, v in r.bytes.items() if k.startswith("up/"))
        down = sum(v for k, v in r.bytes.items() if k.startswith("down/"))
        return self.profiles.client_time(r.client, r.flops, up, down, sum(r.messages.values()))

    def _due_eval(self, rnd: int) -> bool:
        every = self.algorithm.train.eval_every
        return (rnd % every == 0 or rnd >= self.stop.rounds or self._budget_hit()
                or self.stop.target_metric is not None)

    def _budget_hit(self) -> bool:
        b = self.stop.comm_budget_gib
        return b is not None and self.bytes_cum >= b * GIB

    def _stop_reason(self, rnd: int, row: dict) -> Optional[str]:
        if self._budget_hit():
            return "comm_budget"
        t = self.stop.target_metric
        if t is not None and row.get(t.name) is not None:
            v = row[t.name]
            if (t.mode == "max" and v >= t.value) or (t.mode == "min" and v <= t.value):
                return "target_metric"
        return "rounds" if rnd >= self.stop.rounds else None

    def _summary(self, rnd: int, reason: str) -> dict:
        rows = self.writer.rows
        evals = [r["eval_accuracy"] for r in rows if r.get("eval_accuracy") is not None]

        def version(pkg: str) -> Optional[str]:
            try:
                return importlib.metadata.version(pkg)
            except importlib.metadata.PackageNotFoundError:
                return None

        return {
            "algorithm": self.algorithm.name, "rounds": rnd, "stop_reason": reason,
            "final": rows[-1] if rows else None,
            "best_eval_accuracy": max(evals) if evals else None,
            "totals": {
                "bytes": self.bytes_cum, "gib": self.bytes_cum / GIB,
                "measure": self.measure.mode,
                "device_flops": _total(r["device_flops"] for r in rows),
                "server_flops": _total(r["server_flops"] for r in rows),
                "device_peak_mem_bytes": max((r["device_peak_mem_bytes"] for r in rows
                                              if r["device_peak_mem_bytes"] is not None), default=None),
                "wall_s": sum(r["wall_s"] for r in rows),
                "sim_s": self.sim_cum if self.measure.mode != "off" else None,
                "checkpoint_s": self.checkpoint_s, "faults": self.faults,
            },
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "ray": version("ray"), "sfl_ray": version("sfl_ray")},
        }


def _total(values) -> Optional[int]:
    """Sum of a measured column; None if it was not measured (metrics.measure=off)."""
    values = list(values)
    return None if any(v is None for v in values) else sum(values)
