"""Cutting a model into a device block and a server block at a named layer."""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn

from sfl_ray.config_base import ConfigError
from sfl_ray.models import cnn, resnet, vgg
from sfl_ray.seeding import seeded_torch

REGISTRY: dict[str, tuple[Callable[[tuple[int, ...], int], nn.Sequential], str]] = {
    "cnn": (cnn.cnn, cnn.DEFAULT_CUT),
    "resnet18": (resnet.resnet18, resnet.DEFAULT_CUT),
    "vgg11": (vgg.vgg11, vgg.DEFAULT_CUT),
}


def build_model(name: str, in_shape: tuple[int, ...], num_classes: int, seed: int) -> nn.Sequential:
    """The whole (unsplit) model, initialised from the derived seed."""
    if name not in REGISTRY:
        raise ConfigError("model.name", name, f"allowed: {', '.join(REGISTRY)}")
    with seeded_torch(seed, "model_init"):
        return REGISTRY[name][0](tuple(in_shape), num_classes)


def split_model(model: nn.Sequential, cut: str) -> tuple[nn.Sequential, nn.Sequential]:
    """Device block = layers up to and including `cut`; server block = the rest (weights shared)."""
    names = [n for n, _ in model.named_children()]
    if cut not in names:
        raise ConfigError("model.cut", cut, f"allowed layer names: {', '.join(names[:-1])}")
    k = names.index(cut) + 1
    if k == len(names):
        raise ConfigError("model.cut", cut, "the server block would be empty; cut at an earlier layer")
    children = list(model.named_children())
    return nn.Sequential(OrderedDict(children[:k])), nn.Sequential(OrderedDict(children[k:]))


def activation_shape(device: nn.Module, in_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Per-sample shape of the smashed activations, known before training.

    Runs a meta-device copy, so no real compute happens and the real weights are untouched.
    """
    meta = copy.deepcopy(device).to("meta").eval()
    with torch.no_grad():
        out = meta(torch.empty((2, *in_shape), device="meta"))
    return tuple(out.shape[1:])


@dataclass
class ModelParts:
    """The device block and server block of one model (and the cut's activation shape)."""

    device: nn.Sequential
    server: nn.Sequential
    cut: str
    act_shape: tuple[int, ...]

    def full(self) -> nn.Sequential:
        """The unsplit model (shares weights with the blocks)."""
        return nn.Sequential(OrderedDict([("device", self.device), ("server", self.server)]))


def build_parts(name: str, cut: Optional[str], in_shape: tuple[int, ...], num_classes: int, seed: int) -> ModelParts:
    """Build a model and cut it; `cut=None` uses the model's default cut."""
    model = build_model(name, in_shape, num_classes, seed)
    cut = cut or REGISTRY[name][1]
    device, server = split_model(model, cut)
    return ModelParts(device, server, cut, activation_shape(device, in_shape))

