"""Every random stream is derived from (root seed, purpose, round, client...), never global state.

That is what makes the ray and local backends, fault recovery and resume give the same numbers.
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Iterator

import numpy as np
import torch


def derive_seed(root: int, *parts: object) -> int:
    """A 63-bit seed from the root seed and any labels (stable across processes and runs)."""
    text = "/".join([str(root), *map(str, parts)]).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") >> 1


def np_rng(root: int, *parts: object) -> np.random.Generator:
    """A numpy generator for one purpose."""
    return np.random.default_rng(derive_seed(root, *parts))


def torch_gen(root: int, *parts: object) -> torch.Generator:
    """A CPU torch generator for one purpose."""
    return torch.Generator().manual_seed(derive_seed(root, *parts))


@contextlib.contextmanager
def seeded_torch(root: int, *parts: object) -> Iterator[None]:
    """Run code that uses torch's global RNG (module init, dropout) from a derived seed,
    leaving the caller's RNG state untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(root, *parts))
        yield
