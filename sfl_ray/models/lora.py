"""LoRA (low-rank adaptation, Hu et al. 2021) for plain `nn.Module` blocks.

Why not `peft`: peft wraps a whole `PreTrainedModel` (its forward and generation API) and
saves adapters per model. Here a model is cut into a device block and a server block, plain
nn.Modules that are trained in different processes and exchanged as separate state dicts,
and the runtime counts exactly the trainable tensors it moves. This small module keeps that
explicit (the trainable state is `trainable_state(block)`) and adds no dependency.

Each wrapped layer computes  y = base(x) + dropout(x) @ A^T @ B^T * (alpha / r)  with the base
frozen, A (r x in) random and B (out x r) zero, so the wrapped block equals the base at start.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from pydantic import Field, field_validator

from sfl_ray.config_base import Section
from sfl_ray.seeding import derive_seed


class LoRAConfig(Section):
    """Low-rank adapters on selected linear layers; everything else frozen."""

    r: int = Field(8, gt=0, description="Rank of the adapters (A is r x in, B is out x r).")
    alpha: float = Field(16, description="Scale numerator: the adapter output is multiplied by alpha / r.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the adapter's input (0 <= p < 1).")
    target_modules: list[str] = Field(
        default_factory=lambda: ["c_attn"],
        description="Module-name suffixes to wrap, matched at a '.' boundary (GPT-2: c_attn, c_proj, "
                    "attn.c_proj; ViT: q_proj, v_proj in transformers>=5, query, value before). "
                    "Only nn.Linear and GPT-2 Conv1D layers are wrapped.")
    train_bias: bool = Field(False, description="Also train the biases of the wrapped layers.")

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, v: list[str]) -> list[str]:
        if not v or any(not t.strip(".") for t in v):
            raise ValueError("give at least one non-empty module-name suffix, e.g. ['c_attn']")
        return v


def _conv1d_type() -> type | None:
    """GPT-2's Conv1D, if transformers is installed (it is optional for CNN-only runs)."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


def _io_features(layer: nn.Module) -> tuple[int, int]:
    """(in, out) of a Linear (weight out x in) or a Conv1D (weight in x out, y = x @ W + b)."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    n_in, n_out = layer.weight.shape  # Conv1D: transposed layout
    return n_in, n_out


class LoRALinear(nn.Module):
    """A frozen Linear/Conv1D plus a trainable low-rank update."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float, generator: torch.Generator):
        super().__init__()
        self.base = base
        n_in, n_out = _io_features(base)
        self.r, self.scaling = r, alpha / r
        w = base.weight
        # Init on CPU from the generator (bit-identical on every process), then move.
        a = torch.empty(r, n_in)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)  # as in the paper / peft
        self.lora_A = nn.Parameter(a.to(device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(n_out, r, device=w.device, dtype=w.dtype))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def weight(self) -> torch.Tensor:
        """The base weight (for code that reads `.weight`, e.g. its dtype)."""
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = (self.dropout(x) @ self.lora_A.t()) @ self.lora_B.t()
        return self.base(x) + update * self.scaling

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}"


def _matches(name: str, targets: list[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def apply_lora(module: nn.Module, cfg: LoRAConfig, seed: int) -> list[str]:
    """Wrap every Linear/Conv1D whose name (relative to `module`) ends with a target, in place;
    freeze everything else. Returns the wrapped names. A's init depends only on (seed, name)."""
    if any(isinstance(m, LoRALinear) for m in module.modules()):
        raise ValueError("apply_lora: this module already has LoRA adapters")
    conv1d = _conv1d_type()
    kinds = (nn.Linear,) if conv1d is None else (nn.Linear, conv1d)
    layers = [(n, m) for n, m in module.named_modules() if n and isinstance(m, kinds)]
    chosen = [(n, m) for n, m in layers if _matches(n, cfg.target_modules)]
    if not chosen:
        available = [n for n, _ in layers]
        shown = ", ".join(available[:8]) + (", ..." if len(available) > 8 else "") or "none"
        raise ValueError(f"apply_lora: no Linear/Conv1D layer matches target_modules={cfg.target_modules}; "
                         f"available ({len(available)}): {shown}")
    for p in module.parameters():
        p.requires_grad_(False)
    for name, layer in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name)
        gen = torch.Generator().manual_seed(derive_seed(seed, "lora", name))
        wrapped = LoRALinear(layer, cfg.r, cfg.alpha, cfg.dropout, gen)
        if cfg.train_bias and layer.bias is not None:
            layer.bias.requires_grad_(True)
        setattr(parent, child, wrapped)
    return [n for n, _ in chosen]


def lora_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The adapters' A and B matrices, in module order."""
    return [p for m in module.modules() if isinstance(m, LoRALinear) for p in (m.lora_A, m.lora_B)]


def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Name -> tensor (detached, not copied) of every parameter with requires_grad: what is
    exchanged and counted on the link. Load it back with `load_trainable_state`."""
    return {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}


def load_trainable_state(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy a `trainable_state` into `module`; the keys must be exactly its trainable ones."""
    expected = {n for n, p in module.named_parameters() if p.requires_grad}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise KeyError(f"load_trainable_state: missing {missing[:5]}, unexpected {extra[:5]}")
    params = dict(module.named_parameters())
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t)
