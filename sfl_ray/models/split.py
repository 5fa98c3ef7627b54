"""Cutting a model into a device block and a server block at a named layer."""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
import torch.nn as nn

from sfl_ray import registry
from sfl_ray.config_base import ConfigError
from sfl_ray.models import resnet
from sfl_ray.seeding import derive_seed, seeded_torch

if TYPE_CHECKING:
    from sfl_ray.models.lora import LoRAConfig

# The zoo (and plug-in models) live in sfl_ray.registry: name -> builder and default cut.

# Models that take `model.stem`, and the stems each accepts.
STEMS: dict[str, tuple[str, ...]] = {"resnet18": resnet.STEMS}


def check_stem(name: str, stem: str) -> None:
    """Only ResNet-18 has a choice of stem; anything but the default elsewhere is an error."""
    if stem != "cifar" and stem not in STEMS.get(name, ()):
        raise ConfigError("model.stem", stem, f"only {', '.join(STEMS)} takes a stem other than cifar "
                          f"({name} has one fixed stem); drop model.stem or use model.name=resnet18")


def build_model(name: str, in_shape: tuple[int, ...], num_classes: int, seed: int,
                stem: str = "cifar", options: Any = None, entry: Optional[registry.Entry] = None) -> nn.Sequential:
    """The whole (unsplit) model, initialised from the derived seed. `options`: a plug-in's
    model.options (its defaults if None); `entry`: the model's registry entry (looked up by
    name if None)."""
    entry = entry or registry.get("model", name)
    if entry.form != "sequential":
        raise ConfigError("model.name", name, "a transformer: build it with build_parts")
    check_stem(name, stem)
    kwargs: dict[str, Any] = {"stem": stem} if name in STEMS else {}
    if entry.config_cls is not None:
        kwargs["options"] = options if options is not None else entry.config_cls()
    with seeded_torch(seed, "model_init"):
        model = entry.target(tuple(in_shape), num_classes, **kwargs)
    if not isinstance(model, nn.Sequential) or len(model) < 2:
        raise ConfigError("model.name", name, f"its builder ({entry.source}) returned {type(model).__name__}, not "
                          "an nn.Sequential of at least two named layers (the cut falls between two of them)")
    return model


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
    """The device block and server block of one model (and the cut's activation shape).

    `aux_factory(n_blocks, from_server, seed)`, for transformers, builds an auxiliary head of
    n blocks + norm + output head (fresh, or copied from the server's first blocks); under LoRA
    with adapters, frozen tensors tagged (see `_lora_aux_factory`)."""

    device: nn.Module
    server: nn.Module
    cut: str
    act_shape: tuple[int, ...]
    aux_factory: Optional[Callable[[int, bool, int], nn.Module]] = None

    def device_of(self) -> torch.device:
        """Where the blocks live (the pool moves them to its GPU, if any)."""
        p = next(self.device.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def full(self) -> nn.Sequential:
        """The unsplit model (shares weights with the blocks)."""
        return nn.Sequential(OrderedDict([("device", self.device), ("server", self.server)]))


def build_parts(name: str, cut: Optional[str], in_shape: tuple[int, ...], num_classes: int, seed: int,
                model_cfg=None, entry: Optional[registry.Entry] = None) -> ModelParts:
    """Build a model and cut it; `cut=None` uses the model's default cut. `model_cfg` (the
    ModelConfig) gives the stem, transformer settings and a plug-in's options; None = defaults.
    `entry`: the model's registry entry, as the blueprint carries it to processes that never
    registered the plug-in; None = look `name` up."""
    entry = entry or registry.get("model", name)
    stem = getattr(model_cfg, "stem", "cifar")
    if entry.form == "parts":
        check_stem(name, stem)
        return entry.target(name, cut, tuple(in_shape), num_classes, seed, model_cfg)
    model = build_model(name, in_shape, num_classes, seed, stem, getattr(model_cfg, "options", None), entry)
    cut = cut or entry.default_cut
    if cut is None:
        names = [n for n, _ in model.named_children()]
        raise ConfigError("model.cut", None, f"{name} has no default cut: name the device block's last layer, "
                          f"one of {', '.join(names[:-1])}")
    device, server = split_model(model, cut)
    return ModelParts(device, server, cut, activation_shape(device, in_shape))


def build_transformer(name: str, cut: Optional[str], in_shape: tuple[int, ...], num_classes: int, seed: int,
                      model_cfg) -> ModelParts:
    """GPT-2 or ViT from Hugging Face transformers, cut after block K (`cut` = blockK)."""
    from sfl_ray.models.hf_transformers import build_gpt2, build_vit

    if model_cfg is None:
        from sfl_ray.config import ModelConfig
        model_cfg = ModelConfig(name=name, cut=cut)
    tcfg = model_cfg.transformer
    if name == "gpt2":
        if len(in_shape) != 1:
            raise ConfigError("model.name", name, f"gpt2 needs token data (e.g. data.name=e2e); the data gives {in_shape}")
        _, device, server, aux_factory, k = build_gpt2(tcfg, cut, in_shape[0], num_classes, seed)
        dummy = torch.zeros((1, *in_shape), dtype=torch.long)
    else:
        if len(in_shape) != 3:
            raise ConfigError("model.name", name, f"vit needs image data; the data gives {in_shape}")
        _, device, server, aux_factory, k = build_vit(tcfg, cut, in_shape, num_classes, seed)
        dummy = torch.zeros((1, *in_shape))
    if model_cfg.lora is not None:
        _lora_blocks(device, server, model_cfg.lora, seed)
        aux_factory = _lora_aux_factory(aux_factory, model_cfg.lora)
    device.eval()
    with torch.no_grad():
        act_shape = tuple(device(dummy).shape[1:])
    device.train()
    return ModelParts(device, server, f"block{k}", act_shape, aux_factory)


def _lora_blocks(device: nn.Module, server: nn.Module, lora: LoRAConfig, seed: int) -> None:
    """Adapters on the device and server blocks, in place; the rest frozen and tagged."""
    from sfl_ray.models.lora import apply_lora

    for name, block in (("device", device), ("server", server)):
        try:
            apply_lora(block, lora, derive_seed(seed, f"lora_{name}"))
        except ValueError as err:
            raise ConfigError("model.lora.target_modules", lora.target_modules, f"{name} block: {err}") from None
        classifier = getattr(block, "classifier", None)
        if classifier is not None:
            # ViT's classifier is new for the task (random, or re-created for num_labels): frozen it
            # would never learn; it trains whole, as the aux's does (see hf_transformers.lora_aux).
            classifier.requires_grad_(True)
        mark_frozen(block)


def _lora_aux_factory(plain: Callable[[int, bool, int], nn.Module],
                      lora: LoRAConfig) -> Callable[[int, bool, int], nn.Module]:
    """`plain` under LoRA: adapters as the blocks have them (see hf_transformers.lora_aux), the
    rest frozen, tagged and never sent; an aux left with nothing to train is refused."""
    from sfl_ray.models.hf_transformers import lora_aux

    def aux_factory(n_blocks: int, from_server: bool, aux_seed: int) -> nn.Module:
        aux = plain(n_blocks, from_server, aux_seed)
        lora_aux(aux, lora, derive_seed(aux_seed, "lora_aux"))
        require_trainable(aux, n_blocks, lora.target_modules)
        return mark_frozen(aux)

    return aux_factory


def require_trainable(aux: nn.Module, n_blocks: int, targets: list[str]) -> None:
    """An aux with nothing to train would be sent around (or trained) for nothing: refuse it."""
    if not any(p.requires_grad for p in aux.parameters()):
        raise ConfigError("algorithm.aux", f"{n_blocks} block(s) + norm + head",
                          f"nothing in this aux trains under model.lora: target_modules={targets} match no "
                          "layer of its blocks and its norm and head stay frozen; use algorithm.aux.kind=linear "
                          "(LoRA on the output head) or target suffixes its blocks have (e.g. c_attn)")


def mark_frozen(module: nn.Module) -> nn.Module:
    """Tag the parameters LoRA froze: they never change, so they are never exchanged or counted
    (every process builds them identically from the seed or the pretrained weights). The tag is
    set on every parameter, so a trainable one never carries a stale tag."""
    for p in module.parameters():
        p._sfl_frozen = not p.requires_grad  # type: ignore[attr-defined]
    return module
