"""Auxiliary networks on the cut: a light head that turns smashed activations into class logits.

CSE-FSL, FSL-SAGE, Ampere and HERON-SFL give the device a local loss through such a head.
`build_aux` is the generator: for any cut it builds the widest head of the requested kind that
fits a parameter and FLOP budget (FLOPs measured with torch.utils.flop_counter, not estimated).
"""

from __future__ import annotations

import math
from typing import Callable, Literal, Optional

import torch
import torch.nn as nn
from pydantic import Field
from sfl_ray.metrics.device_cost import FlopCounter

from sfl_ray.config_base import ConfigError, Section
from sfl_ray.seeding import seeded_torch


class AuxConfig(Section):
    kind: Literal["auto", "linear", "conv", "mlp", "blocks"] = Field(
        "auto", description="linear: flatten+Linear; conv: conv3x3+ReLU+global pool+Linear (for (C,H,W) cuts); "
        "mlp: Linear+ReLU+Linear; blocks (transformers): `blocks` transformer blocks + norm + LM/classifier head; "
        "auto: blocks for transformers, conv for image-shaped cuts, mlp otherwise.")
    blocks: int = Field(1, ge=0, description="blocks: transformer blocks in the aux (0 = norm + head only).")
    init_from_server: bool = Field(False, description="blocks: copy the server's first blocks, norm and head "
                                   "(HERON-SFL) instead of a fresh init.")
    max_params: Optional[int] = Field(None, gt=0, description="Parameter budget; the widest head that fits is built.")
    max_flops_per_sample: Optional[int] = Field(None, gt=0, description="Forward FLOPs per sample budget.")
    width: Optional[int] = Field(None, gt=0, description="Hidden width/channels; None = as wide as the budget allows "
                                 "(at most the cut's channel count).")


def _head(kind: str, act_shape: tuple[int, ...], num_classes: int, width: int) -> nn.Sequential:
    flat = math.prod(act_shape)
    if kind == "linear":
        return nn.Sequential(nn.Flatten(), nn.Linear(flat, num_classes))
    if kind == "conv":
        c = act_shape[0]
        return nn.Sequential(nn.Conv2d(c, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(width, num_classes))
    return nn.Sequential(nn.Flatten(), nn.Linear(flat, width), nn.ReLU(), nn.Linear(width, num_classes))


def head_cost(head: nn.Module, act_shape: tuple[int, ...]) -> tuple[int, int]:
    """(parameters, forward FLOPs per sample) of a head, measured."""
    counter = FlopCounter()
    with counter, torch.no_grad():
        head(torch.zeros((1, *act_shape)))
    return sum(p.numel() for p in head.parameters()), counter.flops


def build_aux(cfg: AuxConfig, act_shape: tuple[int, ...], num_classes: int, seed: int,
              aux_factory: Optional[Callable[[int, bool, int], nn.Module]] = None) -> nn.Module:
    """The auxiliary head for this cut (same seed, same initial weights in every process).
    Transformers pass their `aux_factory` (see ModelParts)."""
    kind = cfg.kind
    if kind == "auto":
        kind = "blocks" if aux_factory is not None else ("conv" if len(act_shape) == 3 else "mlp")
    if aux_factory is not None and kind == "linear":
        # A transformer's single linear layer on the cut is its norm + output head (HERON's minimal aux).
        return aux_factory(0, cfg.init_from_server, seed)
    if kind == "blocks":
        if aux_factory is None:
            raise ConfigError("algorithm.aux.kind", "blocks", "needs a transformer model (gpt2, vit)")
        return aux_factory(cfg.blocks, cfg.init_from_server, seed)
    if aux_factory is not None:
        raise ConfigError("algorithm.aux.kind", kind, "transformers take blocks, linear (norm + head) or auto")
    if kind == "conv" and len(act_shape) != 3:
        raise ConfigError("algorithm.aux.kind", "conv", f"needs a (C, H, W) cut; this cut gives {act_shape}")
    top = cfg.width or (act_shape[0] if kind == "conv" else 256)
    widths = [top] if cfg.width else sorted({max(1, top >> s) for s in range(0, 12)}, reverse=True)
    for w in widths:
        with seeded_torch(seed, "aux_init"):
            head = _head(kind, act_shape, num_classes, w)
        params, flops = head_cost(head, act_shape)
        if (cfg.max_params is None or params <= cfg.max_params) and \
                (cfg.max_flops_per_sample is None or flops <= cfg.max_flops_per_sample):
            return head
        if kind == "linear":
            break
    raise ConfigError("algorithm.aux", cfg.model_dump(), f"no {kind} head for cut {act_shape} fits the budget")
