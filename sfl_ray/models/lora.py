"""LoRA (low-rank adaptation, Hu et al. 2021) on plain `nn.Module` blocks, through `peft`.

A model here is cut into a device block and a server block (and auxiliary heads): plain
nn.Modules trained in different processes. `peft.inject_adapter_in_model` adapts any
nn.Module in place, so each block gets its own adapters without a `PeftModel` wrapper; what
the runtime then exchanges and counts is the block's trainable state (see
`models.split.mark_frozen` and `runtime.wire.module_weights`): the adapters' A and B, named as
peft names them (`...c_attn.lora_A.default.weight`), plus any layer trained whole.

An adapted layer computes  y = base(x) + dropout(x) @ A^T @ B^T * (alpha / r)  with the base
frozen, A (r x in) random and B (out x r) zero, so the adapted block equals the base at start.
This module only adds what peft leaves to the caller: which layers (Linear and GPT-2 Conv1D
whose names end with a target), a clear error when none match, and A drawn from the run's
seed so every process builds identical adapters.
"""

from __future__ import annotations

import math
import re
import warnings

import torch
import torch.nn as nn
from pydantic import Field, field_validator

from sfl_ray.config_base import Section
from sfl_ray.seeding import seeded_torch, torch_gen

ADAPTER = "default"  # peft's adapter name: part of every adapter tensor's name


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


def _matches(name: str, targets: list[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def has_adapters(module: nn.Module) -> bool:
    """Whether any layer of `module` already carries peft adapters (e.g. blocks copied from an
    adapted server)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in module.modules())


def apply_lora(module: nn.Module, cfg: LoRAConfig, seed: int) -> list[str]:
    """Adapt every Linear/Conv1D whose name (relative to `module`) ends with a target, in place,
    with peft; freeze everything else. Returns the adapted names. A's init depends only on
    (seed, name); the caller's global RNG is left as it was."""
    from peft import LoraConfig, inject_adapter_in_model

    if has_adapters(module):
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
    names = [n for n, _ in chosen]
    peft_cfg = LoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
        # The exact names chosen above (a regex peft full-matches): peft's own suffix rule would
        # also adapt layers of other kinds (embeddings, convolutions) that happen to match.
        target_modules="|".join(re.escape(n) for n in names),
        bias="lora_only" if cfg.train_bias else "none",
        # Conv1D stores its weight transposed: peft sets this per layer whatever we give, with a
        # warning when it differs (only with Conv1D and Linear targets mixed; silenced below).
        fan_in_fan_out=conv1d is not None and all(isinstance(m, conv1d) for _, m in chosen))
    with seeded_torch(seed, "lora_inject"), warnings.catch_warnings():  # peft inits from the global RNG
        warnings.filterwarnings("ignore", message="fan_in_fan_out is set to")
        # Older peft reads GPT-2's config and warns that lm_head is tied: the cut unties it.
        warnings.filterwarnings("ignore", message="Model with `tie_word_embeddings=True`")
        inject_adapter_in_model(peft_cfg, module, adapter_name=ADAPTER)
    for name in names:
        # A from a generator of (seed, name): the same on every process, and independent of which
        # other layers are adapted (peft's would depend on the order of all of them).
        a = module.get_submodule(name).lora_A[ADAPTER].weight
        init = torch.empty(a.shape)
        nn.init.kaiming_uniform_(init, a=math.sqrt(5), generator=torch_gen(seed, "lora", name))  # as peft does
        with torch.no_grad():
            a.copy_(init)
    return names
