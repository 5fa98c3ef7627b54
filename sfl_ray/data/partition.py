"""Partitioners: which training samples each client holds. Deterministic by seed.

A partition is kept compactly (`Partition`: one index array and per-client offsets, CSR-style),
so ten thousand registered clients cost two arrays, not ten thousand objects.
"""

from __future__ import annotations

from typing import Iterator, Mapping, Optional, Sequence, Union

import numpy as np

from sfl_ray.config_base import ConfigError
from sfl_ray.seeding import np_rng


class Partition(Sequence[np.ndarray]):
    """Client c holds the training samples `indices[offsets[c]:offsets[c + 1]]` (sorted)."""

    def __init__(self, indices: np.ndarray, offsets: np.ndarray):
        self.indices = np.ascontiguousarray(indices, dtype=np.int64)
        self.offsets = np.ascontiguousarray(offsets, dtype=np.int64)
        self.indices.flags.writeable = False  # clients get views: none may change another's samples
        self.offsets.flags.writeable = False

    @classmethod
    def from_owners(cls, samples: np.ndarray, owners: np.ndarray, num_clients: int) -> "Partition":
        """Sample `samples[i]` goes to client `owners[i]`; each client's samples sorted."""
        order = np.lexsort((samples, owners))  # by client, then by sample index
        sizes = np.bincount(owners, minlength=num_clients)
        return cls(samples[order], np.concatenate([[0], np.cumsum(sizes)]))

    @classmethod
    def from_lists(cls, parts: Sequence[np.ndarray]) -> "Partition":
        if isinstance(parts, Partition):
            return parts
        sizes = [len(p) for p in parts]
        flat = np.concatenate([np.asarray(p, dtype=np.int64) for p in parts]) if parts else np.zeros(0, np.int64)
        return cls(flat, np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, client):  # type: ignore[override]
        if isinstance(client, slice):
            return [self[c] for c in range(len(self))[client]]
        c = int(client)
        if not 0 <= c < len(self):
            raise IndexError(f"client {client} of {len(self)}")
        return self.indices[self.offsets[c]: self.offsets[c + 1]]

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[c] for c in range(len(self)))

    @property
    def sizes(self) -> np.ndarray:
        """Samples per client."""
        return np.diff(self.offsets)

    def owners(self) -> np.ndarray:
        """The client of each entry of `indices`."""
        return np.repeat(np.arange(len(self)), self.sizes)

    def hosted(self, pool: int, pools: int) -> "ClientShards":
        """The clients of pool `pool` of `pools` (client c runs on pool c % pools)."""
        return ClientShards(self, range(pool, len(self), pools))


class ClientShards(Mapping[int, np.ndarray]):
    """A pool's view of a partition: client id -> sample indices for the clients in `clients` (a
    range), without a per-client object."""

    def __init__(self, partition: Partition, clients: range):
        self.partition, self.clients = partition, clients

    def __getitem__(self, client: int) -> np.ndarray:
        if client not in self.clients:
            raise KeyError(client)
        return self.partition[client]

    def __contains__(self, client: object) -> bool:
        return isinstance(client, (int, np.integer)) and int(client) in self.clients

    def __iter__(self) -> Iterator[int]:
        return iter(self.clients)

    def __len__(self) -> int:
        return len(self.clients)


PartitionLike = Union[Partition, Sequence[np.ndarray]]


def _equal_offsets(n: int, parts: int) -> np.ndarray:
    """np.array_split's cut points of n items into `parts`."""
    q, r = divmod(n, parts)
    sizes = np.full(parts, q, dtype=np.int64)
    sizes[:r] += 1
    return np.concatenate([[0], np.cumsum(sizes)])


def client_sizes(n: int, num_clients: int, sigma: float = 0.0, seed: int = 0) -> np.ndarray:
    """How many of `n` samples each client holds: equal (sigma 0), or in proportion to weights
    drawn from LogNormal(0, sigma) (quantity skew, as FedLab's unbalanced splits draw it), every
    client at least one sample, rounded by largest remainder so that they sum to n."""
    if sigma <= 0:
        return np.diff(_equal_offsets(n, num_clients))
    w = np_rng(seed, "partition", "sizes").lognormal(0.0, sigma, num_clients)
    share = w / w.sum() * (n - num_clients)  # one sample each first, the rest by weight
    sizes = np.floor(share).astype(np.int64)
    rest = n - num_clients - int(sizes.sum())
    sizes[np.argsort(sizes - share, kind="stable")[:rest]] += 1  # the largest remainders
    return sizes + 1


def iid(labels: np.ndarray, num_clients: int, seed: int, sizes: Optional[np.ndarray] = None) -> Partition:
    """A random split: equal, or of the given client sizes."""
    perm = np_rng(seed, "partition", "iid").permutation(len(labels))
    sizes = client_sizes(len(labels), num_clients) if sizes is None else sizes
    owners = np.repeat(np.arange(num_clients), sizes)
    return Partition.from_owners(perm, owners, num_clients)


def dirichlet(labels: np.ndarray, num_clients: int, alpha: float, seed: int,
              sizes: Optional[np.ndarray] = None) -> Partition:
    """Clients (equal-size, or of the given sizes) whose label mix is drawn from Dir(alpha)
    (Hsu et al. 2019, as in FSL-SAGE).

    Each client draws p_i ~ Dir(alpha); samples are then dealt one at a time, the label drawn
    from p_i; a class that runs out is removed from every client's p and p renormalised.
    """
    rng = np_rng(seed, "partition", "dirichlet")
    classes = np.unique(labels)
    pools = {c: list(rng.permutation(np.flatnonzero(labels == c))) for c in classes}
    probs = rng.dirichlet(alpha * np.ones(len(classes)), size=num_clients)
    sizes = client_sizes(len(labels), num_clients) if sizes is None else sizes
    alive = np.ones(len(classes), bool)
    samples = np.empty(len(labels), dtype=np.int64)
    owners = np.repeat(np.arange(num_clients), sizes)
    j = 0
    for i in range(num_clients):
        for _ in range(sizes[i]):
            p = probs[i] * alive
            if p.sum() <= 0:  # every class this client likes is used up: take any left
                p = alive.astype(float)
            k = rng.choice(len(classes), p=p / p.sum())
            samples[j] = pools[classes[k]].pop()
            j += 1
            if not pools[classes[k]]:
                alive[k] = False
    return Partition.from_owners(samples, owners, num_clients)


def shards(labels: np.ndarray, num_clients: int, per_client: int, seed: int) -> Partition:
    """Sort by label, cut into num_clients * per_client shards, deal per_client shards to each."""
    rng = np_rng(seed, "partition", "shards")
    order = np.argsort(labels, kind="stable")
    n_pieces = num_clients * per_client
    deal = rng.permutation(n_pieces)
    client_of_piece = np.empty(n_pieces, dtype=np.int64)
    client_of_piece[deal] = np.arange(n_pieces) % num_clients  # piece deal[j] goes to client j % n
    piece_of = np.repeat(np.arange(n_pieces), np.diff(_equal_offsets(len(labels), n_pieces)))
    return Partition.from_owners(order.astype(np.int64), client_of_piece[piece_of], num_clients)


def partition(labels: np.ndarray, cfg, num_clients: int, seed: int) -> Partition:
    """Split sample indices across clients as a `PartitionConfig` says."""
    if num_clients > len(labels):
        raise ConfigError("train.num_clients", num_clients, f"at most the {len(labels)} training samples")
    sizes = client_sizes(len(labels), num_clients, cfg.size_sigma if cfg.sizes == "lognormal" else 0.0, seed)
    if cfg.name == "iid":
        return iid(labels, num_clients, seed, sizes)
    if cfg.name == "dirichlet":
        return dirichlet(labels, num_clients, cfg.alpha, seed, sizes)
    if cfg.sizes != "equal":
        raise ConfigError("partition.sizes", cfg.sizes, "shards deals every client the same number of "
                          "equal shards; client sizes apply to iid and dirichlet")
    if num_clients * cfg.shards_per_client > len(labels):
        raise ConfigError("partition.shards_per_client", cfg.shards_per_client,
                          f"num_clients x shards_per_client must be <= {len(labels)} samples")
    return shards(labels, num_clients, cfg.shards_per_client, seed)


def label_histograms(labels: np.ndarray, parts: PartitionLike, num_classes: int) -> list[list[int]]:
    """Per-client label counts."""
    p = Partition.from_lists(parts)
    flat = p.owners() * num_classes + np.asarray(labels)[p.indices]
    return np.bincount(flat, minlength=len(p) * num_classes).reshape(len(p), num_classes).tolist()
