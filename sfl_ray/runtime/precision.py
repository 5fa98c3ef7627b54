"""Mixed precision (`train.precision`): autocast around the forward passes the runtime runs.

The runtime, not the algorithms, applies it: around a client program, a server block call,
evaluation and the Ray Train server fit. Parameters, gradients and optimizer state stay
float32; matmuls, convolutions and attention run in the lower precision. What crosses the
link stays float32 (wire.to_numpy casts bfloat16 back), so bytes counted do not change.
"""

from __future__ import annotations

import contextlib
from typing import ContextManager

import torch

# fp16 is refused by the config: it would need loss scaling (see TrainConfig.precision).
DTYPES = {"bf16": torch.bfloat16}


def autocast(precision: str, device: torch.device | str) -> ContextManager:
    """The autocast region for `precision` on `device`; fp32 is no region at all (bit-identical
    to code that never heard of precision).

    cache_enabled=False: a program runs many optimizer steps inside one region, and autocast's
    cache keeps the first lower-precision copy of each weight for the whole region, so later
    forwards would use stale weights (training silently stops). Without the cache, a whole
    program under autocast gives the same bits as autocast around each forward only (tested):
    backward ops reuse the dtypes of their forward, and optimizers' in-place ops are never cast.
    """
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=DTYPES[precision], cache_enabled=False)
