"""A runtime service: train the server block on a consolidated activation set.

Ampere's server phase asks for it; the algorithm stays free of Ray. Two implementations:
the server block actor runs `train_epoch` itself (`server_trainer: actor`), or the Ray
backend runs the same epochs as a Ray Train `TorchTrainer` fed by a Ray Data dataset,
data-parallel over the server GPUs (`server_trainer: ray_train`, see ray_train_fit.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import numpy as np
import torch
import torch.nn as nn
from sfl_ray.models.task import task_loss


@dataclass
class ServerFit:
    """Train a server block from `init_weights` on the devices' transfers for `epochs` epochs."""

    # (activations, labels, device id) per device, in this order: arrays, or bulk handles
    # (runtime.bulk) that the runtime resolves where the training runs, not in the coordinator
    parts: list
    init_weights: dict
    epochs: int
    batch_size: int
    lr: Optional[float]
    shuffle: bool
    seed: int

    @property
    def num_samples(self) -> int:
        return sum(len(p[1]) for p in self.parts)


def consolidate(parts: list[tuple[np.ndarray, np.ndarray, int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(activations, labels, owner) of the devices' transfers, in the order given."""
    z = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    owner = np.concatenate([np.full(len(p[1]), p[2]) for p in parts])
    return z, y, owner


def train_epoch(model: nn.Module, opt: torch.optim.Optimizer,
                batches: Iterable[tuple[torch.Tensor, torch.Tensor, np.ndarray]]) -> dict:
    """One epoch of supervised server-block training; returns loss and how mixed batches were."""
    model.train()
    loss_sum, n, mix = 0.0, 0, []
    for z, y, owner in batches:
        loss = task_loss(model(z), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss_sum += float(loss.detach()) * len(y)
        n += len(y)
        mix.append(len(np.unique(owner)))
    return {"loss_sum": loss_sum, "count": n, "devices_per_batch_sum": float(np.sum(mix)), "batches": len(mix)}
