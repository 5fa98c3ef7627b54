"""Transformers from `transformers`, cut after block k.

GPT-2 (`GPT2LMHeadModel`): device = token + position embeddings + blocks[:k]; server =
blocks[k:] + final LayerNorm + LM head. ViT (`ViTForImageClassification`): device = patch
embeddings + layers[:k]; server = layers[k:] + LayerNorm + classifier on the [CLS] token.
Built from a config (random init, from the seed) or `from_pretrained(name_or_local_dir)`.

What crosses the cut: only the hidden states (B, T, H). GPT-2 is cut with right padding and
causal attention: position ids are 0..T-1 on both sides and a padded position is never
attended by a real one, so neither an attention mask nor position ids need to be sent (the
loss on padding is masked by the labels). ViT needs nothing but the hidden states.

Weight tying: GPT-2 ties the LM head to the token embedding. The embedding lives on the
device, the head on the server, so the cut unties them: the server holds its own copy of the
matrix, equal at the start. Nothing is sent to keep them equal: with LoRA both stay frozen and
equal; under full fine-tuning they diverge (each side trains its own), and the bytes counted
are the device block's and the server block's own parameters.
"""

from __future__ import annotations

import copy
import functools
import inspect
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.nn as nn

from sfl_ray.config_base import ConfigError
from sfl_ray.seeding import seeded_torch

if TYPE_CHECKING:
    from sfl_ray.models.lora import LoRAConfig


def parse_cut(cut: Optional[str], n_layer: int, default: int) -> int:
    """'block3' -> 3: the device holds the first 3 blocks."""
    k = default if cut is None else None
    if cut is not None:
        if cut.startswith("block") and cut[5:].isdigit():
            k = int(cut[5:])
    if k is None or not 1 <= k < n_layer:
        raise ConfigError("model.cut", cut, f"block1 .. block{n_layer - 1} (the device keeps the first k blocks)")
    return k


class GPT2Device(nn.Module):
    """Embeddings and the first k GPT-2 blocks: input ids (B, T) -> hidden states (B, T, H)."""

    def __init__(self, transformer: nn.Module, k: int):
        super().__init__()
        self.config = transformer.config
        self.wte, self.wpe, self.drop = transformer.wte, transformer.wpe, transformer.drop
        self.h = nn.ModuleList(transformer.h[:k])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        h = self.drop(self.wte(input_ids) + self.wpe(pos))
        return run_gpt2_blocks(self.h, self.config, h)  # (B, T, H) smashed activations


@functools.lru_cache(maxsize=1)
def _no_cache_kwarg() -> dict:
    """create_causal_mask's "no KV cache" argument: `cache` in newer transformers, which warn
    that `past_key_values` is going away; `past_key_values` in older ones."""
    from transformers.masking_utils import create_causal_mask
    return {"cache": None} if "cache" in inspect.signature(create_causal_mask).parameters else {"past_key_values": None}


def run_gpt2_blocks(blocks: nn.ModuleList, config, h: torch.Tensor) -> torch.Tensor:
    from transformers.masking_utils import create_causal_mask

    pos = torch.arange(h.shape[1], device=h.device)[None]
    mask = create_causal_mask(config=config, inputs_embeds=h, attention_mask=None, position_ids=pos,
                              **_no_cache_kwarg())
    for block in blocks:
        h = block(h, None, mask, position_ids=pos)
    return h


class GPT2Head(nn.Module):
    """GPT-2 blocks (possibly none), the final LayerNorm and the LM head: (B, T, H) -> logits (B, T, V)."""

    def __init__(self, config, blocks: nn.ModuleList, ln_f: nn.Module, lm_head: nn.Linear):
        super().__init__()
        self.config = config
        self.h, self.ln_f, self.lm_head = blocks, ln_f, lm_head

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.ln_f(run_gpt2_blocks(self.h, self.config, h)))


class ViTDevice(nn.Module):
    """Patch embeddings and the first k ViT layers: pixels (B, C, H, W) -> tokens (B, N+1, D)."""

    def __init__(self, vit: nn.Module, k: int):
        super().__init__()
        self.embeddings = vit.embeddings
        self.layers = nn.ModuleList(vit.layers[:k])

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        h = self.embeddings(pixels)
        for layer in self.layers:
            h = layer(h, None)
        return h


class ViTHead(nn.Module):
    """ViT layers (possibly none), LayerNorm and the classifier on [CLS]: (B, N+1, D) -> logits."""

    def __init__(self, layers: nn.ModuleList, layernorm: nn.Module, classifier: nn.Module):
        super().__init__()
        self.layers, self.layernorm, self.classifier = layers, layernorm, classifier

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            h = layer(h, None)
        return self.classifier(self.layernorm(h)[:, 0])


def lora_aux(aux: nn.Module, lora: LoRAConfig, seed: int) -> None:
    """LoRA on an auxiliary head built by an `aux_factory` here, in place; everything else frozen.

    Blocks get adapters on `lora.target_modules` (blocks copied from the adapted server keep
    theirs). GPT-2's head with no blocks (the `linear` aux) adapts its LM head: it is a copy
    of the frozen server's, so LoRA on it is the small thing left to train (A: r x H, B: V x r).
    """
    from sfl_ray.models.lora import apply_lora, has_adapters

    targets = list(lora.target_modules)
    if isinstance(aux, GPT2Head) and len(aux.h) == 0:
        targets.append("lm_head")
    if not has_adapters(aux):
        try:
            apply_lora(aux, lora.model_copy(update={"target_modules": targets}), seed)
        except ValueError:
            aux.requires_grad_(False)  # no target here; split.require_trainable refuses it if nothing trains
    if isinstance(aux, ViTHead):
        # The aux's classifier is fresh (num_classes outputs), not pretrained: a low-rank update of a
        # random matrix has nothing to preserve, and the whole layer (H x classes) is about the size
        # of its adapters (r x (H + classes)), so it trains whole, as peft's modules_to_save does.
        aux.classifier.requires_grad_(True)


def _quiet_loading() -> None:
    """No per-load progress bar: every pool, server and evaluator loads the same weights."""
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()


def _untied_head(lm_head: nn.Linear) -> nn.Linear:
    head = nn.Linear(lm_head.in_features, lm_head.out_features, bias=lm_head.bias is not None)
    head.weight = nn.Parameter(lm_head.weight.detach().clone())
    return head


def _from_pretrained(cls: Any, name: str, **kw: Any) -> Any:
    """`cls.from_pretrained(name)`; a missing folder or an unreachable hub name is a ConfigError."""
    from sfl_ray.local_paths import hub_access, not_on_hub, reason, require_local

    require_local("model.transformer.pretrained", name)
    try:
        with hub_access():
            return cls.from_pretrained(name, **kw)
    except Exception as e:  # a folder without weights, or the hub offline: one line naming what was asked
        if Path(name).exists():
            raise ConfigError("model.transformer.pretrained", name, f"cannot load a {cls.__name__} from it: "
                              f"{reason(e)}") from None
        raise not_on_hub("model.transformer.pretrained", name, e, "model") from None


def build_gpt2(tcfg, cut: Optional[str], seq_len: int, vocab: int, seed: int):
    """(full model, device, server, aux factory) for GPT-2."""
    from transformers import GPT2Config, GPT2LMHeadModel

    with seeded_torch(seed, "model_init"):
        if tcfg.pretrained:
            _quiet_loading()
            model = _from_pretrained(GPT2LMHeadModel, tcfg.pretrained)
        else:
            model = GPT2LMHeadModel(GPT2Config(
                vocab_size=vocab, n_positions=max(seq_len, tcfg.n_positions), n_embd=tcfg.n_embd,
                n_layer=tcfg.n_layer, n_head=tcfg.n_head, resid_pdrop=tcfg.dropout, embd_pdrop=tcfg.dropout,
                attn_pdrop=tcfg.dropout))
    model.config._attn_implementation = "eager" if tcfg.attention == "eager" else "sdpa"
    n_layer = model.config.n_layer
    k = parse_cut(cut, n_layer, min(3, n_layer - 1))
    t = model.transformer
    device = GPT2Device(t, k)
    server = GPT2Head(model.config, nn.ModuleList(t.h[k:]), t.ln_f, _untied_head(model.lm_head))

    def aux_factory(n_blocks: int, from_server: bool, aux_seed: int) -> nn.Module:
        """n blocks + LayerNorm + LM head, fresh (from aux_seed) or copied from the server's first blocks."""
        if from_server:
            blocks = nn.ModuleList(copy.deepcopy(list(server.h[:n_blocks])))
        else:
            with seeded_torch(aux_seed, "aux_init"):
                from transformers.models.gpt2.modeling_gpt2 import GPT2Block
                blocks = nn.ModuleList(GPT2Block(model.config, layer_idx=k + i) for i in range(n_blocks))
        return GPT2Head(model.config, blocks, copy.deepcopy(server.ln_f), copy.deepcopy(server.lm_head))

    return model, device, server, aux_factory, k


def build_vit(tcfg, cut: Optional[str], in_shape: tuple[int, ...], num_classes: int, seed: int):
    """(full model, device, server, aux factory) for ViT."""
    from transformers import ViTConfig, ViTForImageClassification

    c, h, w = in_shape
    with seeded_torch(seed, "model_init"):
        if tcfg.pretrained:
            _quiet_loading()
            model = _from_pretrained(ViTForImageClassification, tcfg.pretrained, num_labels=num_classes,
                                     ignore_mismatched_sizes=True)
        else:
            model = ViTForImageClassification(ViTConfig(
                image_size=h, patch_size=tcfg.patch_size, num_channels=c, hidden_size=tcfg.n_embd,
                num_hidden_layers=tcfg.n_layer, num_attention_heads=tcfg.n_head,
                intermediate_size=4 * tcfg.n_embd, num_labels=num_classes,
                hidden_dropout_prob=tcfg.dropout, attention_probs_dropout_prob=tcfg.dropout))
    model.config._attn_implementation = "eager" if tcfg.attention == "eager" else "sdpa"
    vit = model.vit
    n_layer = model.config.num_hidden_layers
    k = parse_cut(cut, n_layer, min(3, n_layer - 1))
    device = ViTDevice(vit, k)
    server = ViTHead(nn.ModuleList(vit.layers[k:]), vit.layernorm, model.classifier)

    def aux_factory(n_blocks: int, from_server: bool, aux_seed: int) -> nn.Module:
        if from_server:
            layers = nn.ModuleList(copy.deepcopy(list(server.layers[:n_blocks])))
        else:
            with seeded_torch(aux_seed, "aux_init"):
                from transformers.models.vit.modeling_vit import ViTLayer
                layers = nn.ModuleList(ViTLayer(model.config) for _ in range(n_blocks))
        with seeded_torch(aux_seed, "aux_head"):
            return ViTHead(layers, copy.deepcopy(server.layernorm), nn.Linear(model.config.hidden_size, num_classes))

    return model, device, server, aux_factory, k
