"""Measuring what a device program costs: FLOPs (torch.utils.flop_counter) and peak training memory.

Peak memory = parameters + gradients + optimizer state (measured at each optimizer step)
+ the peak of live tensors saved for backward (tracked with saved_tensors_hooks while the
program runs). On a GPU, torch.cuda.max_memory_allocated is reported beside it.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn as nn
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
        self.static_peak = 0
        self.saved_live = 0
        self.saved_peak = 0
        self.saved_count = 0
        self._refs: dict[int, list[int]] = {}  # storage ptr -> [refcount, bytes]
        self._param_ptrs: set[int] = set()

    def track_module(self, module: nn.Module) -> None:
        if all(m is not module for m in self.modules):
            self.modules.append(module)
            self._param_ptrs |= {p.untyped_storage().data_ptr() for p in module.parameters()}
            self._param_ptrs |= {b.untyped_storage().data_ptr() for b in module.buffers()}
            self.measure_static()

    def track_optimizer(self, opt: torch.optim.Optimizer) -> None:
        self.optimizers.append(opt)
        opt.register_step_post_hook(lambda *_: self.measure_static())

    def measure_static(self) -> None:
        """Parameters, buffers, gradients and optimizer state that exist right now."""
        seen: set[int] = set()
        total = 0

        def add(t: torch.Tensor | None) -> None:
            nonlocal total
            if isinstance(t, torch.Tensor) and t.numel() > 0:
                ptr = t.untyped_storage().data_ptr()
                if ptr not in seen:
                    seen.add(ptr)
                    total += _nbytes(t)

        for m in self.modules:
            for p in m.parameters():
                add(p)
                add(p.grad)
            for b in m.buffers():
                add(b)
        for opt in self.optimizers:
            for group in opt.param_groups:
                for p in group["params"]:
                    add(p)
                    add(p.grad)
            for st in opt.state.values():
                for v in st.values():
                    add(v)
        self.static_peak = max(self.static_peak, total)

    # saved-tensor hooks
    def _pack(self, t: torch.Tensor) -> _Saved:
        self.saved_count += 1
        ptr = t.untyped_storage().data_ptr()
        if ptr in self._param_ptrs or t.numel() == 0:
            return _Saved(t, self, None)  # a weight saved for backward is counted as a weight
        ref = self._refs.get(ptr)
        if ref is None:
            self._refs[ptr] = [1, t.untyped_storage().nbytes()]
            self.saved_live += t.untyped_storage().nbytes()
            self.saved_peak = max(self.saved_peak, self.saved_live)
        else:
            ref[0] += 1
        return _Saved(t, self, ptr)

    def _release(self, ptr: int) -> None:
        ref = self._refs.get(ptr)
        if ref is None:
            return
        ref[0] -= 1
        if ref[0] == 0:
            self.saved_live -= ref[1]
            del self._refs[ptr]

    @staticmethod
    def _unpack(s: _Saved) -> torch.Tensor:
        return s.tensor

    @contextlib.contextmanager
    def watching(self) -> Iterator["MemoryTracker"]:
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            yield self

    @property
    def peak_bytes(self) -> int:
        self.measure_static()
        return self.static_peak + self.saved_peak


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
