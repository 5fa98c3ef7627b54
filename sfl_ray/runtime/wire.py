"""How tensors travel: as contiguous numpy arrays (zero-copy reads from the object store).

A payload is a dict kind -> array, or kind -> {name: array} (a state dict). Its size is the
sum of the arrays' nbytes: what was moved is what is counted.
"""

from __future__ import annotations

import ctypes
import warnings
from typing import Any, Mapping, Optional

import numpy as np
import torch
import torch.nn as nn

from sfl_ray.metrics.device_cost import off_device

Weights = dict[str, np.ndarray]


def to_numpy(t: torch.Tensor, copy: bool = False) -> np.ndarray:
    """A tensor as a contiguous CPU numpy array (no autograd history). copy=True for state
    that must not change when the tensor is later updated in place (weights). bfloat16 (an
    autocast output, see runtime.precision) becomes float32: numpy has no bfloat16, and the
    wire carries float32 unless a codec says otherwise."""
    t = t.detach()
    if t.dtype == torch.bfloat16:
        t = t.float()  # exact: every bfloat16 is a float32
    # .cpu() is a blocking copy: it waits for the work queued on the tensor's stream, including
    # the non-blocking host->device copies of to_device, so the array is never read early.
    a = t.cpu().numpy()
    return a.copy() if copy else np.ascontiguousarray(a)


def to_device(t: torch.Tensor, device: str | torch.device) -> torch.Tensor:
    """`t` on `device`: the one way host tensors reach a device. To a GPU from page-locked
    memory, without blocking (the copy overlaps the host's next work; ops on the device run
    after it, in stream order, and the caching host allocator keeps the pinned buffer until
    the copy is done). Anywhere else a plain `.to`, which is `t` itself when it is already
    there: on a CPU this is a no-op and gives the same bits."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        # Unmeasured, as on a CPU where the batch is no op's output: the pinned host copy is
        # staging, not device memory, and the device copy counts once autograd saves it.
        with off_device():
            return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def to_tensor(a: np.ndarray, device: str | torch.device = "cpu") -> torch.Tensor:
    """A numpy array as a tensor on `device`; arrays read from the object store are read-only,
    so on the CPU the tensor shares memory until something writes (nothing does: we copy into
    params)."""
    if a.flags.writeable:  # what a pipe or a local call hands over: no warning to silence
        return to_device(torch.from_numpy(a), device)
    # Only where torch would warn: catch_warnings swaps the process's warning filters (what another
    # thread warns meanwhile goes by them) and costs more than the conversion itself.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(a)
    return to_device(t, device)


def frozen_names(module: nn.Module) -> set[str]:
    """Parameters frozen by LoRA (tagged by models.split.mark_frozen): never exchanged."""
    return {n for n, p in module.named_parameters() if getattr(p, "_sfl_frozen", False)}


_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16,
                 torch.int64: np.int64, torch.int32: np.int32, torch.int16: np.int16, torch.int8: np.int8,
                 torch.uint8: np.uint8, torch.bool: np.bool_}


def _host_view(t: torch.Tensor) -> Optional[np.ndarray]:
    """A numpy array on a host tensor's memory, made without a torch op (even `.data` and
    `.numpy()` dispatch one): weights move in and out of every client's model, and each op there
    would pass through the dispatch mode measuring the program (metrics.measure) for nothing
    (copies cost no FLOPs and no new memory). Valid while `t` lives; None where numpy cannot
    hold it this way (a device tensor, bfloat16, a non-contiguous layout)."""
    dtype = _NUMPY_DTYPES.get(t.dtype)
    if dtype is None or t.device.type != "cpu" or t.is_quantized or not t.is_contiguous():
        return None
    if t.numel() == 0:
        return np.zeros(t.shape, dtype)
    memory = (ctypes.c_char * (t.numel() * t.element_size())).from_address(t.data_ptr())
    return np.frombuffer(memory, dtype).reshape(t.shape)


def module_weights(module: nn.Module) -> Weights:
    """A module's exchangeable state (parameters and buffers, minus LoRA-frozen weights) as numpy."""
    frozen = frozen_names(module)
    out: Weights = {}
    for n, t in module.state_dict(keep_vars=True).items():  # keep_vars: no detach op per tensor
        if n not in frozen:
            view = _host_view(t)
            out[n] = view.copy() if view is not None else to_numpy(t, copy=True)
    return out


def load_weights(module: nn.Module, weights: Mapping[str, np.ndarray], strict: bool = True) -> None:
    """Copy numpy weights into a module in place (optimizers holding its params stay valid)."""
    state = module.state_dict(keep_vars=True)
    expected = set(state) - frozen_names(module)
    if strict and expected != set(weights):
        missing, extra = expected - set(weights), set(weights) - expected
        raise KeyError(f"weights do not match the module: missing {sorted(missing)[:3]}, extra {sorted(extra)[:3]}")
    with torch.no_grad():
        for name, value in weights.items():
            view = _host_view(state[name])
            if view is not None:  # as copy_ would: cast, broadcast, in place
                np.copyto(view, value, casting="unsafe")
            else:
                state[name].copy_(to_tensor(value, state[name].device))


def payload_nbytes(value: Any) -> int:
    """Bytes of a payload value: an array, a tensor, or a (nested) dict of them."""
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    if isinstance(value, torch.Tensor):
        return int(value.numel() * value.element_size())
    if isinstance(value, Mapping):
        return sum(payload_nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(payload_nbytes(v) for v in value)
    raise TypeError(f"cannot send a {type(value).__name__} across the link; send arrays or dicts of arrays")


def owned(value: Any) -> Any:
    """A payload with every array copied: what a receiver keeps must not share the sender's
    storage (a device tensor on the local backend, a reused channel buffer on Ray)."""
    if isinstance(value, np.ndarray):
        return value.copy()
    if isinstance(value, Mapping):
        return {k: owned(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(owned(v) for v in value)
    return value


def pack(payload: Mapping[str, Any]) -> dict[str, Any]:
    """Tensors -> numpy arrays, recursively, for the wire."""
    out: dict[str, Any] = {}
    for k, v in payload.items():
        if isinstance(v, torch.Tensor):
            out[k] = to_numpy(v)
        elif isinstance(v, Mapping):
            out[k] = pack(v)
        else:
            out[k] = v
    return out
