"""Checkpoints of a whole experiment: saved by the coordinator, restored by `run.py --resume`.

A checkpoint holds everything a run needs to continue as if it had never stopped: the schedule's
global state (weights, phase), every client's persistent state in the pools (optimizer moments,
aux models, SGLR's own device blocks), every server block's models and optimizers, the
coordinator's counters (bytes, simulated time) and the metrics rows written so far. Every random
stream is derived from (seed, round, client, purpose), so no RNG position is needed.

Format: one `torch.save` file of plain containers and tensors per checkpoint, loaded with
`torch.load(weights_only=True)` (never unpickling code), plus `manifest.json` with each file's
round, size and sha256. Files are written to a temporary name and renamed, the manifest last, so a
crash leaves the previous checkpoint intact; the newest `keep` are kept.
"""

from __future__ import annotations

import hashlib
import io
import json
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn as nn

FORMAT = 1
MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and what to do."""


# -- plain trees: what torch.load(weights_only=True) can read back -------------------------------
def to_tree(obj: Any) -> Any:
    """Objects of a run's state as containers of tensors and primitives."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, np.ndarray):
        return {"__np__": torch.from_numpy(np.array(obj, copy=True)), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, nn.Module):
        return {"__module__": to_tree(obj.state_dict())}
    if isinstance(obj, torch.optim.Optimizer):
        return {"__optim__": to_tree(obj.state_dict())}
    if isinstance(obj, dict):
        return {k: to_tree(v) for k, v in obj.items()}
    if isinstance(obj, (set, frozenset)):
        return {"__set__": [to_tree(v) for v in sorted(obj)]}
    if isinstance(obj, list):
        return [to_tree(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(to_tree(v) for v in obj)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a {type(obj).__name__}; keep run state in arrays, tensors, modules, "
                    f"optimizers and plain containers")


# -- between processes: a tree's tensors as numpy arrays -------------------------------------------
# Ray pickles a torch tensor through torch's own reduce (a legacy torch.save per storage: ~100 us
# each) but sends a numpy array out of band, copy-free. A round-start snapshot of FSL-SAGE at 500
# clients is thousands of small tensors (aux models, Adam moments, buffers): packed, it crosses in
# a fraction of the time. Trees never hold raw numpy arrays otherwise (`to_tree` wraps them), so a
# raw array in a tree is a packed tensor.
def _map_leaves(tree: Any, leaf: Callable[[Any], Any]) -> Any:
    """`tree` (dicts, lists, tuples) with `leaf` applied to everything else."""
    if isinstance(tree, dict):
        return {k: _map_leaves(v, leaf) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_map_leaves(v, leaf) for v in tree]
    if isinstance(tree, tuple):
        return tuple(_map_leaves(v, leaf) for v in tree)
    return leaf(tree)


def _pack_leaf(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        t = x.detach()
        return t.cpu().numpy() if t.dtype in _NUMPY_DTYPES else t.cpu()
    return x


def _unpack_leaf(x: Any) -> Any:
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x if x.flags.writeable else np.array(x, copy=True))
    return x


def pack(tree: Any) -> Any:
    """`tree` (of `to_tree`) with its CPU-able tensors as numpy arrays, for a process boundary.
    GPU tensors come to the CPU: the receiver (the coordinator) may have no GPU."""
    return _map_leaves(tree, _pack_leaf)


def unpack(tree: Any) -> Any:
    """The inverse of `pack`: tensors in memory this process owns (an array read from Ray's object
    store is read-only and pins its object: it is copied out)."""
    return _map_leaves(tree, _unpack_leaf)


_NUMPY_DTYPES = {torch.float64, torch.float32, torch.float16, torch.int64, torch.int32, torch.int16,
                 torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128}


def from_tree(tree: Any, module: Optional[Callable[[dict], nn.Module]] = None) -> Any:
    """The inverse of `to_tree` (packed or not). Modules need `module(state_dict)` to rebuild them;
    optimizers come back as their state dicts (load them into an optimizer built over the same
    params)."""
    if isinstance(tree, np.ndarray):
        return unpack(tree)
    if isinstance(tree, dict):
        if "__np__" in tree:
            return np.asarray(tree["__np__"]).astype(tree["dtype"], copy=True)
        if "__set__" in tree:
            return {from_tree(v) for v in tree["__set__"]}
        if "__module__" in tree:
            if module is None:
                raise CheckpointError("a module in the checkpoint has no way to be rebuilt here")
            return module(from_tree(tree["__module__"]))
        if "__optim__" in tree:
            return from_tree(tree["__optim__"])
        return {k: from_tree(v, module) for k, v in tree.items()}
    if isinstance(tree, list):
        return [from_tree(v, module) for v in tree]
    if isinstance(tree, tuple):
        return tuple(from_tree(v, module) for v in tree)
    return tree


def load_into(current: Any, tree: Any) -> Any:
    """Restore `tree` into an existing object where it can be done in place (modules,
    optimizers, which optimizers and other objects hold on to); otherwise return the value."""
    if isinstance(current, nn.Module) and isinstance(tree, dict) and "__module__" in tree:
        current.load_state_dict(from_tree(tree["__module__"]))
        return current
    if isinstance(current, torch.optim.Optimizer) and isinstance(tree, dict) and "__optim__" in tree:
        current.load_state_dict(from_tree(tree["__optim__"]))
        return current
    return from_tree(tree)


# -- files ---------------------------------------------------------------------------------------
class Checkpointer:
    """Writes and reads the checkpoints of one run directory (a RunWriter's filesystem)."""

    def __init__(self, writer, keep: int = 2):
        self.writer, self.keep = writer, keep
        self.dir = f"{writer.root}/checkpoints"

    def _manifest(self) -> list[dict]:
        try:
            with self.writer.fs.open_input_stream(f"{self.dir}/{MANIFEST}") as f:
                return json.loads(f.read().decode())["checkpoints"]
        except FileNotFoundError:
            return []
        except (ValueError, KeyError) as err:
            raise CheckpointError(f"{self.dir}/{MANIFEST} is not a checkpoint manifest ({err})") from None

    def _write(self, name: str, data: bytes) -> None:
        self.writer.write_bytes(f"checkpoints/{name}", data)

    def save(self, rnd: int, state: dict) -> dict:
        """Write the checkpoint of round `rnd`; returns its manifest entry."""
        buf = io.BytesIO()
        torch.save({"format": FORMAT, "round": rnd, **state}, buf)
        data = buf.getvalue()
        name = f"round-{rnd:06d}.pt"
        self._write(name, data)
        entry = {"round": rnd, "file": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        entries = [e for e in self._manifest() if e["round"] != rnd] + [entry]
        entries.sort(key=lambda e: e["round"])
        dropped, entries = entries[:-self.keep], entries[-self.keep:]
        self._write(MANIFEST, (json.dumps({"format": FORMAT, "checkpoints": entries}, indent=2) + "\n").encode())
        for e in dropped:
            try:
                self.writer.fs.delete_file(f"{self.dir}/{e['file']}")
            except FileNotFoundError:
                pass
        return entry

    def rounds(self) -> list[int]:
        return [e["round"] for e in self._manifest()]

    def load(self, rnd: Optional[int] = None) -> dict:
        """The checkpoint of round `rnd` (default: the newest), verified against its checksum."""
        entries = self._manifest()
        if not entries:
            raise CheckpointError(f"no checkpoint in {self.dir}")
        if rnd is None:
            entry = entries[-1]
        else:
            found = [e for e in entries if e["round"] == rnd]
            if not found:
                raise CheckpointError(f"no checkpoint of round {rnd} in {self.dir}; there are rounds "
                                      f"{', '.join(str(e['round']) for e in entries)}")
            entry = found[0]
        path = f"{self.dir}/{entry['file']}"
        older = [e["round"] for e in entries if e["round"] < entry["round"]]
        offer = (f"; the previous checkpoint is round {older[-1]}: --resume-round {older[-1]}" if older
                 else "; there is no earlier checkpoint")
        try:
            with self.writer.fs.open_input_stream(path) as f:
                data = f.read()
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint {path} is missing{offer}") from None
        if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise CheckpointError(f"checkpoint {path} is corrupt or truncated (checksum mismatch){offer}")
        try:
            state = torch.load(io.BytesIO(data), weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unreadable file is refused the same way
            raise CheckpointError(f"checkpoint {path} cannot be read ({type(err).__name__}){offer}") from None
        if state.get("format") != FORMAT:
            raise CheckpointError(f"checkpoint {path} has format {state.get('format')}, expected {FORMAT}")
        return peft_lora_names(state)


# -- older checkpoints ---------------------------------------------------------------------------
# Before LoRA went through peft, an adapted layer P held P.base.{weight,bias}, P.lora_A, P.lora_B;
# peft names them P.base_layer.*, P.lora_A.default.weight, P.lora_B.default.weight. Parameters
# keep their order, so optimizer states (indexed by position) need nothing.
_LEGACY_LORA = {".lora_A": ".lora_A.default.weight", ".lora_B": ".lora_B.default.weight",
                ".base.weight": ".base_layer.weight", ".base.bias": ".base_layer.bias"}


def peft_lora_names(tree: Any) -> Any:
    """`tree` with every state dict written by the hand-written LoRA renamed to peft's names
    (a dict is one when it has a `P.lora_A` key; only P's own keys are renamed)."""
    if isinstance(tree, list):
        return [peft_lora_names(v) for v in tree]
    if isinstance(tree, tuple):
        return tuple(peft_lora_names(v) for v in tree)
    if not isinstance(tree, dict):
        return tree
    adapted = {k[:-len(".lora_A")] for k in tree if isinstance(k, str) and k.endswith(".lora_A")}

    def renamed(k: Any) -> Any:
        for old, new in _LEGACY_LORA.items():
            if isinstance(k, str) and k.endswith(old) and k[:-len(old)] in adapted:
                return k[:-len(old)] + new
        return k

    return {renamed(k): peft_lora_names(v) for k, v in tree.items()}
