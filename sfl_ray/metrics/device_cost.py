"""Measuring what a device program costs: FLOPs (torch.utils.flop_counter) and peak training memory.

Peak memory = the device-resident weights and buffers + the peak of every other live tensor the
program holds: activations (also under no_grad), tensors saved for backward, gradients,
optimizer state, temporaries. Live tensors are tracked as they are created (a dispatch mode
sees every op's outputs) and released (their last reference dies), by storage, so views and
tensors saved twice count once. Tensors saved for backward are also counted through
saved_tensors_hooks (the input batch reaches autograd without an op). On a GPU,
torch.cuda.max_memory_allocated is reported beside it.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Iterator, Optional

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class _Saved:
    """Holds one tensor saved for backward; its release is when autograd drops it."""

    __slots__ = ("tensor", "tracker", "key")

    def __init__(self, tensor: torch.Tensor, tracker: "MemoryTracker", key: int | None):
        self.tensor, self.tracker, self.key = tensor, tracker, key

    def __del__(self) -> None:
        if self.key is not None:
            self.tracker._release(self.key)


class MemoryTracker:
    """Tracks a device program's training memory, measured rather than estimated."""

    def __init__(self) -> None:
        self.modules: list[nn.Module] = []
        self.optimizers: list[torch.optim.Optimizer] = []
        self.weights_bytes = 0
        self.live = 0
        self.live_peak = 0
        self.saved_count = 0
        self._refs: dict[int, list[int]] = {}  # storage ptr -> [refcount, bytes]
        self._param_ptrs: set[int] = set()

    def track_module(self, module: nn.Module) -> None:
        """Declare a module resident on the device: its weights and buffers count as memory."""
        if all(m is not module for m in self.modules):
            self.modules.append(module)
            for t in list(module.parameters()) + list(module.buffers()):
                ptr = t.untyped_storage().data_ptr()
                if ptr not in self._param_ptrs:
                    self._param_ptrs.add(ptr)
                    self.weights_bytes += t.untyped_storage().nbytes()

    def track_optimizer(self, opt: torch.optim.Optimizer) -> None:
        self.optimizers.append(opt)

    # -- live tensors ---------------------------------------------------------------------
    def _acquire(self, t: torch.Tensor) -> Optional[int]:
        """Count a tensor's storage as live; returns the key to release, or None if not counted."""
        if t.device.type == "meta" or t.numel() == 0:
            return None
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr in self._param_ptrs or ptr == 0:
            return None  # weights are counted as weights
        ref = self._refs.get(ptr)
        if ref is None:
            self._refs[ptr] = [1, st.nbytes()]
            self.live += st.nbytes()
            self.live_peak = max(self.live_peak, self.live)
        else:
            ref[0] += 1
        return ptr

    def _release(self, ptr: int) -> None:
        ref = self._refs.get(ptr)
        if ref is None:
            return
        ref[0] -= 1
        if ref[0] == 0:
            self.live -= ref[1]
            del self._refs[ptr]

    def _watch(self, t: torch.Tensor) -> None:
        key = self._acquire(t)
        if key is not None:
            weakref.finalize(t, self._release, key)

    # saved-tensor hooks
    def _pack(self, t: torch.Tensor) -> _Saved:
        self.saved_count += 1
        return _Saved(t, self, self._acquire(t))

    @staticmethod
    def _unpack(s: _Saved) -> torch.Tensor:
        return s.tensor

    @contextlib.contextmanager
    def watching(self) -> Iterator["MemoryTracker"]:
        with _LiveTensors(self), torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            yield self

    @property
    def peak_bytes(self) -> int:
        return self.weights_bytes + self.live_peak


class _LiveTensors(TorchDispatchMode):
    """Sees every op's outputs, so the tracker knows each tensor the program creates."""

    def __init__(self, tracker: MemoryTracker):
        super().__init__()
        self.tracker = tracker

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.tracker._watch(t)
        return out


@contextlib.contextmanager
def measure_device(tracker: MemoryTracker, device: torch.device) -> Iterator[dict]:
    """Count FLOPs and track memory of the code inside; fills the yielded dict on exit."""
    result: dict = {}
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    counter = FlopCounterMode(display=False)
    with counter, tracker.watching():
        yield result
    result["flops"] = int(counter.get_total_flops())
    result["peak_mem_bytes"] = int(tracker.peak_bytes)
    result["saved_tensors"] = tracker.saved_count
    result["cuda_peak_mem_bytes"] = int(torch.cuda.max_memory_allocated(device)) if cuda else 0


@contextlib.contextmanager
def off_device() -> Iterator[None]:
    """Suspend device measurement: work inside (a server block answering in the same process,
    on the local backend) is not the device's cost."""
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes(), torch.autograd.graph.saved_tensors_hooks(_identity, _identity):
        yield


def _identity(t):
    return t


def count_flops(fn, *args, **kwargs) -> tuple[object, int]:
    """Run fn and return (result, FLOPs)."""
    counter = FlopCounterMode(display=False)
    with counter:
        out = fn(*args, **kwargs)
    return out, int(counter.get_total_flops())
