"""Per-client mini-batches: order derived from (seed, round, client, epoch), never global state."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from sfl_ray.data.augment import augment_batch
from sfl_ray.seeding import np_rng, torch_gen


def batch_indices(indices: np.ndarray, batch_size: int, seed: int, rnd: int, client: int,
                  epoch: int = 0) -> list[np.ndarray]:
    """The shuffled batches of one local epoch (the last batch may be smaller)."""
    perm = indices[np_rng(seed, "batches", rnd, client, epoch).permutation(len(indices))]
    return [perm[i: i + batch_size] for i in range(0, len(perm), batch_size)]


def client_batches(x: np.ndarray, y: np.ndarray, indices: np.ndarray, batch_size: int, seed: int,
                   rnd: int, client: int, epoch: int = 0,
                   augment: str = "none") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (x, y) tensors for one local epoch of one client, augmented (training batches only)."""
    for k, b in enumerate(batch_indices(indices, batch_size, seed, rnd, client, epoch)):
        xb = torch.from_numpy(x[b])
        if augment != "none":
            xb = augment_batch(xb, augment, torch_gen(seed, "augment", rnd, client, epoch, k))
        yield xb, torch.from_numpy(y[b])
