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
    """Train a server block from `init_weights` on (z, y) for `epochs` epochs."""

    z: np.ndarray              # (n, *act_shape) consolidated activations
    y: np.ndarray              # (n,) labels
    owner: np.ndarray          # (n,) which device each sample came from (for the mixing statistic)
    init_weights: dict
    epochs: int
    batch_size: int
    lr: Optional[float]
    shuffle: bool
    seed: int


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
