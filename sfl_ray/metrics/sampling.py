"""Which clients of a round are measured how (metrics.measure).

exact: every client op by op. off: none. sampled: every client's FLOPs (cached per step shape,
so exact), and the memory of a few clients per memory round, drawn from the seed among the
round's clients that hold at least one full batch (a client with less than a batch peaks lower,
so drawing it would understate the device's peak).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from sfl_ray.seeding import np_rng


class MeasurePlan:
    """The run's measurement policy; `for_round` gives the choices of one round."""

    def __init__(self, mode: str = "exact", memory_clients: int = 1, memory_every: int = 1, seed: int = 0,
                 shard_sizes: Optional[Sequence[int]] = None, batch_size: int = 1):
        self.mode, self.memory_clients, self.memory_every = mode, memory_clients, memory_every
        self.seed, self.batch_size = seed, batch_size
        self.shard_sizes = np.asarray(shard_sizes) if shard_sizes is not None else None  # one array, any N

    @classmethod
    def from_config(cls, metrics, seed: int, shard_sizes: Sequence[int], batch_size: int) -> "MeasurePlan":
        return cls(metrics.measure, metrics.memory_clients, metrics.memory_every, seed, shard_sizes, batch_size)

    def memory_round(self, rnd: int) -> bool:
        return self.mode == "exact" or (self.mode == "sampled" and (rnd == 1 or rnd % self.memory_every == 0))

    def for_round(self, rnd: int, clients: Sequence[int] = ()) -> "RoundMeasure":
        """The choices of round `rnd`, whose sampled clients are `clients` (none: a final phase, whose
        first dispatch decides)."""
        return RoundMeasure(self, rnd, clients)


class RoundMeasure:
    """The measurement mode of each client in one round (stable across the round's calls, so a
    client whose programs continue one another is measured one way)."""

    def __init__(self, plan: MeasurePlan, rnd: int, clients: Sequence[int] = ()):
        self.plan, self.rnd = plan, rnd
        self.exact: set[int] = set()
        self.picked = False
        self.pick(clients)

    def pick(self, ids: Sequence[int]) -> None:
        """Choose this round's memory clients among `ids`, once per round."""
        p = self.plan
        if p.mode != "sampled" or not p.memory_round(self.rnd) or not ids or self.picked:
            return
        self.picked = True
        pool = sorted(set(ids))
        if p.shard_sizes is not None:
            full = [c for c in pool if p.shard_sizes[c] >= p.batch_size]
            pool = full or pool
        k = min(p.memory_clients, len(pool))
        picked = np_rng(p.seed, "measure_memory", self.rnd).choice(len(pool), k, replace=False)
        self.exact |= {pool[int(i)] for i in picked}

    def mode(self, client: int) -> str:
        """exact | flops | off for this client's programs in this round."""
        if self.plan.mode == "off":
            return "off"
        if self.plan.mode == "exact" or client in self.exact:
            return "exact"
        return "flops"
