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
from typing import Callable, Iterator, Optional

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class MemoryTracker:
    """Tracks a device program's training memory, measured rather than estimated."""

    def __init__(self) -> None:
        self.modules: list[nn.Module] = []
        self.optimizers: list[torch.optim.Optimizer] = []
        self.weights_bytes = 0
        self.live = 0
        self.live_peak = 0
        self.saved_count = 0
        self._refs: dict[int, int] = {}  # live storage ptr -> bytes
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
                    # Written before it was declared (load_weights copies into the parameters
                    # first): it was counted live; it is a weight, counted once, as such.
                    self.live -= self._refs.pop(ptr, 0)

    def track_optimizer(self, opt: torch.optim.Optimizer) -> None:
        self.optimizers.append(opt)

    def track_tensor(self, t: torch.Tensor) -> None:
        """Count a tensor made outside the measured code (e.g. restored optimizer state) as live
        while its storage lives; a storage already counted is not counted again."""
        self._watch(t)

    # -- live tensors ---------------------------------------------------------------------
    def _watch(self, t: torch.Tensor) -> None:
        """Count a tensor's storage as live until the storage itself is freed (PyTorch keeps one
        Python object per storage, so a finalizer on it fires exactly then, even when autograd
        holds the storage after every Python tensor is gone)."""
        if t.device.type == "meta" or t.numel() == 0:
            return
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr == 0 or ptr in self._param_ptrs or ptr in self._refs:
            return  # weights are counted as weights; views and re-saves count once
        n = st.nbytes()
        self._refs[ptr] = n
        self.live += n
        self.live_peak = max(self.live_peak, self.live)
        weakref.finalize(st, self._release, ptr)

    def _release(self, ptr: int) -> None:
        self.live -= self._refs.pop(ptr, 0)

    # saved-tensor hooks: count what autograd saves (the input batch reaches it without an op)
    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        self.saved_count += 1
        self._watch(t)
        # An alias, not the tensor: holding a saved output itself would make a reference cycle
        # (output -> grad_fn -> saved output) that only the garbage collector could free.
        return t.detach()

    @staticmethod
    def _unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    def saving(self):
        """Count what autograd saves for backward while inside."""
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    @contextlib.contextmanager
    def watching(self) -> Iterator["MemoryTracker"]:
        """Track live tensors and saved tensors of the code inside (without counting FLOPs)."""
        with FlopCounter(on_output=self._watch), self.saving():
            yield self

    @property
    def peak_bytes(self) -> int:
        return self.weights_bytes + self.live_peak


class FlopCounter(TorchDispatchMode):
    """FLOPs with torch.utils.flop_counter's own formulas (forward and backward ops alike), but
    without FlopCounterMode's module tracker: its hooks on every module output make reference
    cycles (so tensors outlive their use until the garbage collector runs) and break
    autograd.grad on leaf inputs. Optionally reports every op output (for memory tracking)."""

    def __init__(self, on_output: Optional[Callable[[torch.Tensor], None]] = None):
        super().__init__()
        self.flops = 0
        self.on_output = on_output

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.flops += int(formula(*args, **kwargs, out_val=out))
        if self.on_output is not None:
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor):
                    self.on_output(t)
        return out


@contextlib.contextmanager
def measure_device(tracker: MemoryTracker, device: torch.device) -> Iterator[dict]:
    """Count FLOPs and track memory of the code inside; fills the yielded dict on exit."""
    meter = Meter("exact", device, tracker=tracker)
    with meter.measuring() as result:
        yield result


MEASURE_MODES = ("exact", "flops", "off")


class FlopCache:
    """FLOPs of a unit of work (a client's batch step, a server request) by what determines them:
    the program, the shapes and dtypes it is handed, and what the algorithm says varies per batch.
    Measured once per key in a process, then reused: the count stays exact, the per-op Python
    dispatch is paid once per shape instead of once per op of every batch."""

    def __init__(self) -> None:
        self.flops: dict[tuple, int] = {}
        self.hits = 0
        self.misses = 0
        self.conflicts: list[tuple] = []  # keys whose steps differed: the key misses what varies


class Meter:
    """How one client program run is measured.

    - exact: every op is seen: FLOPs and live tensors (peak memory), as `measure_device`.
    - flops: FLOPs only; a batch step whose key is in the cache is run unobserved and its cached
      count added (the memory peak is left to the sampled exact runs).
    - off: nothing is measured; the result says None.
    On a GPU the CUDA allocator's own peak is read in every mode but off (no per-op hook)."""

    def __init__(self, mode: str, device: torch.device, tracker: Optional[MemoryTracker] = None,
                 cache: Optional[FlopCache] = None):
        if mode not in MEASURE_MODES:
            raise ValueError(f"measure mode {mode!r}: one of {MEASURE_MODES}")
        self.mode, self.device = mode, device
        self.tracker = tracker if tracker is not None else MemoryTracker()
        self.cache = cache if cache is not None else FlopCache()
        self.counter: Optional[FlopCounter] = None
        self.cached_flops = 0
        self.open = False
        self._suspended = False
        self._tail: Optional[tuple] = None

    @contextlib.contextmanager
    def measuring(self) -> Iterator[dict]:
        """Measure the code inside; fills the yielded dict on exit (values None when not measured)."""
        result: dict = {}
        cuda = self.device.type == "cuda" and self.mode != "off"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        self.open = True
        try:
            if self.mode == "off":
                yield result
            elif self.mode == "exact":
                self.counter = FlopCounter(on_output=self.tracker._watch)
                with self.counter, self.tracker.saving():
                    yield result
                    self.end_batch(self._tail)
            else:
                self.counter = FlopCounter()
                with self._counting():
                    yield result
                    self.end_batch(self._tail)
        finally:
            self.open = False
        counted = self.counter is not None
        result["flops"] = self.counter.flops + self.cached_flops if counted else None
        result["peak_mem_bytes"] = int(self.tracker.peak_bytes) if self.mode == "exact" else None
        result["saved_tensors"] = self.tracker.saved_count if self.mode == "exact" else 0
        result["cuda_peak_mem_bytes"] = int(torch.cuda.max_memory_allocated(self.device)) if cuda else None

    @contextlib.contextmanager
    def _counting(self) -> Iterator[None]:
        self.counter.__enter__()
        try:
            yield
        finally:
            if not self._suspended:  # a batch left unobserved at the end is already off the stack
                self.counter.__exit__(None, None, None)
            self._suspended = False

    # -- batch windows: the work between one batch being handed out and the next -----------------
    def begin_batch(self, key: tuple) -> Optional[tuple]:
        """A batch step begins; returns a token for end_batch (None: nothing to do)."""
        if not self.open or self.counter is None or self._suspended:
            return None
        if self.mode == "flops" and key in self.cache.flops and _on_top(self.counter):
            self.counter.__exit__(None, None, None)  # the step runs unobserved
            self._suspended = True
            self.cached_flops += self.cache.flops[key]
            self.cache.hits += 1
            return ("hit", key)
        self.cache.misses += key not in self.cache.flops
        return ("measure", key, self.counter.flops)

    def rest_is_step(self, key: tuple) -> None:
        """The rest of the program is one step whose FLOPs depend on `key` alone (a program that
        runs one batch step per call)."""
        if self._tail is None:
            self._tail = self.begin_batch(key)

    def end_batch(self, token: Optional[tuple]) -> None:
        """The batch step ended (the next batch was asked for, or the loop left)."""
        if token is None or not self.open:
            return  # e.g. a batch iterator kept across programs: it ends in another program
        if token[0] == "hit":
            if self._suspended:
                self.counter.__enter__()
                self._suspended = False
        elif _on_top(self.counter):
            flops, key = self.counter.flops - token[2], token[1]
            if self.cache.flops.setdefault(key, flops) != flops and key not in self.cache.conflicts:
                self.cache.conflicts.append(key)


def _on_top(mode: TorchDispatchMode) -> bool:
    """Whether `mode` is the innermost dispatch mode (so it can be left and re-entered in place)."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode
    return _get_current_dispatch_mode() is mode


@contextlib.contextmanager
def off_device() -> Iterator[None]:
    """Suspend device measurement: work inside (a server block answering in the same process,
    on the local backend) is not the device's cost."""
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes(), torch.autograd.graph.saved_tensors_hooks(_identity, _identity):
        yield


def _identity(t):
    return t
