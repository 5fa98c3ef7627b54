"""Auxiliary networks on the cut: a light head that turns smashed activations into class logits.

CSE-FSL, FSL-SAGE, Ampere and HERON-SFL give the device a local loss through such a head.
`build_aux` is the generator: for any cut it builds the widest head of the requested kind that
fits a parameter and FLOP budget (FLOPs measured with torch.utils.flop_counter, not estimated).
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from typing import Callable, Literal, Optional

import torch
import torch.nn as nn
from pydantic import Field
from sfl_ray.metrics.device_cost import FlopCounter

from sfl_ray.config_base import ConfigError, Section
from sfl_ray.seeding import seeded_torch


class AuxConfig(Section):
    kind: Literal["auto", "linear", "conv", "mlp", "server_layer", "blocks"] = Field(
        "auto", description="linear: flatten+Linear; conv: conv3x3+ReLU+global pool+Linear (for (C,H,W) cuts); "
        "mlp: Linear+ReLU+Linear; server_layer (CNNs): a freshly initialised copy of the server block's first "
        "layer + global pool + Linear (the FSL-SAGE reference's ResNet aux); blocks (transformers): `blocks` "
        "transformer blocks + norm + LM/classifier head; auto: blocks for transformers, conv for image-shaped "
        "cuts, mlp otherwise.")
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


def _server_layer_head(server: Optional[nn.Module], act_shape: tuple[int, ...], num_classes: int,
                       seed: int) -> nn.Sequential:
    """The server block's first layer, re-initialised from the aux seed (the aux must not start as
    the server), then global average pool and Linear(channels, num_classes)."""
    first = next(iter(server.named_children()), None) if server is not None else None
    if first is None:
        raise ConfigError("algorithm.aux.kind", "server_layer", "needs the server block (build_aux(..., server=...)) "
                          "with named top-level layers")
    name, layer = first
    try:
        meta = copy.deepcopy(layer).to("meta")
        with torch.no_grad():
            out = tuple(meta(torch.empty((2, *act_shape), device="meta")).shape[1:])
    except Exception:  # noqa: BLE001 - any failure means this layer cannot head the aux
        out = None
    if out is None or len(out) != 3:
        raise ConfigError("algorithm.aux.kind", "server_layer", f"the server block's first layer '{name}' must map "
                          f"the cut {act_shape} to (C, H, W), it gives {out}; use linear, conv or mlp")
    # Copy the structure, then overwrite every weight: from the aux seed, on the CPU (a GPU RNG
    # would not be the same stream), with no gradient or train/eval state carried over.
    fresh = copy.deepcopy(layer).cpu().train()
    with seeded_torch(seed, "aux_init"):
        for m in fresh.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
            elif any(True for _ in m.parameters(recurse=False)):
                raise ConfigError("algorithm.aux.kind", "server_layer", f"cannot re-initialise {type(m).__name__} "
                                  f"in '{name}' (no reset_parameters); use linear, conv or mlp")
        fc = nn.Linear(out[0], num_classes)
    for p in fresh.parameters():
        p.grad = None
    return nn.Sequential(OrderedDict([("layer", fresh), ("pool", nn.AdaptiveAvgPool2d(1)),
                                      ("flatten", nn.Flatten()), ("fc", fc)]))


def head_cost(head: nn.Module, act_shape: tuple[int, ...]) -> tuple[int, int]:
    """(parameters, forward FLOPs per sample) of a head, measured in eval mode (a BatchNorm must
    not update its running statistics on the probe)."""
    counter, was_training = FlopCounter(), head.training
    head.eval()
    with counter, torch.no_grad():
        head(torch.zeros((1, *act_shape)))
    head.train(was_training)
    return sum(p.numel() for p in head.parameters()), counter.flops


def build_aux(cfg: AuxConfig, act_shape: tuple[int, ...], num_classes: int, seed: int,
              aux_factory: Optional[Callable[[int, bool, int], nn.Module]] = None,
              server: Optional[nn.Module] = None) -> nn.Module:
    """The auxiliary head for this cut (same seed, same initial weights in every process).
    Transformers pass their `aux_factory` (see ModelParts); `server_layer` needs the server block."""
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
    if kind == "server_layer":
        head = _server_layer_head(server, act_shape, num_classes, seed)
        if cfg.max_params is not None or cfg.max_flops_per_sample is not None:  # one fixed size: fits or not
            params, flops = head_cost(head, act_shape)
            if params > (cfg.max_params or params) or flops > (cfg.max_flops_per_sample or flops):
                raise ConfigError("algorithm.aux", cfg.model_dump(), f"the server_layer head ({params} parameters, "
                                  f"{flops} FLOPs per sample) exceeds the budget")
        return head
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
