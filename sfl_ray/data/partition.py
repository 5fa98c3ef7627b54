"""Partitioners: which training samples each client holds. Deterministic by seed."""

from __future__ import annotations

import numpy as np

from sfl_ray.config_base import ConfigError
from sfl_ray.seeding import np_rng


def iid(labels: np.ndarray, num_clients: int, seed: int) -> list[np.ndarray]:
    """A random equal split."""
    perm = np_rng(seed, "partition", "iid").permutation(len(labels))
    return [np.sort(p) for p in np.array_split(perm, num_clients)]


def dirichlet(labels: np.ndarray, num_clients: int, alpha: float, seed: int) -> list[np.ndarray]:
    """Equal-size clients whose label mix is drawn from Dir(alpha) (Hsu et al. 2019, as in FSL-SAGE).

    Each client draws p_i ~ Dir(alpha); samples are then dealt one at a time, the label drawn
    from p_i; a class that runs out is removed from every client's p and p renormalised.
    """
    rng = np_rng(seed, "partition", "dirichlet")
    classes = np.unique(labels)
    pools = {c: list(rng.permutation(np.flatnonzero(labels == c))) for c in classes}
    probs = rng.dirichlet(alpha * np.ones(len(classes)), size=num_clients)
    sizes = [len(s) for s in np.array_split(np.arange(len(labels)), num_clients)]
    alive = np.ones(len(classes), bool)
    out: list[list[int]] = [[] for _ in range(num_clients)]
    for i in range(num_clients):
        for _ in range(sizes[i]):
            p = probs[i] * alive
            if p.sum() <= 0:  # every class this client likes is used up: take any left
                p = alive.astype(float)
            k = rng.choice(len(classes), p=p / p.sum())
            out[i].append(pools[classes[k]].pop())
            if not pools[classes[k]]:
                alive[k] = False
    return [np.sort(np.asarray(o, dtype=np.int64)) for o in out]


def shards(labels: np.ndarray, num_clients: int, per_client: int, seed: int) -> list[np.ndarray]:
    """Sort by label, cut into num_clients * per_client shards, deal per_client shards to each."""
    rng = np_rng(seed, "partition", "shards")
    order = np.argsort(labels, kind="stable")
    pieces = np.array_split(order, num_clients * per_client)
    deal = rng.permutation(len(pieces))
    return [np.sort(np.concatenate([pieces[j] for j in deal[i::num_clients]])) for i in range(num_clients)]


def partition(labels: np.ndarray, cfg, num_clients: int, seed: int) -> list[np.ndarray]:
    """Split sample indices across clients as a `PartitionConfig` says."""
    if num_clients > len(labels):
        raise ConfigError("train.num_clients", num_clients, f"at most the {len(labels)} training samples")
    if cfg.name == "iid":
        return iid(labels, num_clients, seed)
    if cfg.name == "dirichlet":
        return dirichlet(labels, num_clients, cfg.alpha, seed)
    if num_clients * cfg.shards_per_client > len(labels):
        raise ConfigError("partition.shards_per_client", cfg.shards_per_client,
                          f"num_clients x shards_per_client must be <= {len(labels)} samples")
    return shards(labels, num_clients, cfg.shards_per_client, seed)


def label_histograms(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> list[list[int]]:
    """Per-client label counts."""
    return [np.bincount(labels[p], minlength=num_classes).tolist() for p in parts]
