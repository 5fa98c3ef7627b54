"""Non-finite numbers stop a run: a diverged loss or a NaN tensor is an error, never a row.

Once a loss or a weight is NaN/Inf every later number is meaningless, yet training goes on
happily (NaN compares false with every stop condition). The client check runs in the pool
right after a client program returns, so the reply becomes an error naming client, round and
quantity; the server check runs on each metrics row (server losses, eval loss).
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Mapping

import numpy as np
import torch

# Telemetry keys and what to call them in the message.
_NAMES = {"loss_sum": "train loss", "loss": "train loss"}
SERVER_KEYS = ("train_loss", "server_loss", "eval_loss")


class NonFiniteError(RuntimeError):
    """A loss, metric or sent tensor is NaN or infinite: training has diverged (lower the lr?)."""


def _bad_float(v: Any) -> bool:
    return isinstance(v, (float, np.floating)) and not math.isfinite(v)


def _bad_tensors(payload: Mapping[str, Any], prefix: str) -> Iterator[str]:
    """'prefix/kind (name)' of every floating array or tensor in a payload holding NaN or Inf."""
    for key, v in payload.items():
        where = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(v, Mapping):
            for inner in _bad_tensors(v, ""):
                yield f"{where} ({inner})"
        elif isinstance(v, np.ndarray) and np.issubdtype(v.dtype, np.floating) and not np.isfinite(v).all():
            yield where
        elif isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all()):
            yield where


def check_client_reply(client: int, rnd: int, up: Mapping[str, Any], info: Mapping[str, Any]) -> None:
    """NonFiniteError if a client's loss telemetry or anything it sends up is NaN/Inf."""
    for key, v in info.items():
        if _bad_float(v):
            raise NonFiniteError(f"client {client} round {rnd}: non-finite {_NAMES.get(key, key)} ({v})")
    for where in _bad_tensors(up, "up"):
        raise NonFiniteError(f"client {client} round {rnd}: non-finite {where}")
    # Tensors in the telemetry too: SGLR returns its weights there.
    sent = {k: v for k, v in info.items() if isinstance(v, (Mapping, np.ndarray, torch.Tensor))}
    for where in _bad_tensors(sent, ""):
        raise NonFiniteError(f"client {client} round {rnd}: non-finite {where}")


def check_row(row: Mapping[str, Any]) -> None:
    """NonFiniteError if a server-side loss of a metrics row (written already, as "NaN") is NaN/Inf."""
    for key in SERVER_KEYS:
        if _bad_float(row.get(key)):
            raise NonFiniteError(f"server round {row.get('round')}: non-finite {key} ({row[key]})")
