"""LoRA on HF blocks: exact at init, only adapters train, Conv1D layout, determinism, errors,
and cut sub-modules. Tiny models built from configs (no network)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from pydantic import ValidationError

pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel, ViTConfig, ViTForImageClassification  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

from sfl_ray.models.lora import (  # noqa: E402
    LoRAConfig, LoRALinear, apply_lora, load_trainable_state, lora_parameters, trainable_state)


def gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32)).eval()


def vit() -> ViTForImageClassification:
    torch.manual_seed(0)
    return ViTForImageClassification(ViTConfig(
        image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64, num_labels=10)).eval()


IDS = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(1))
PIX = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))


def test_identity_at_init_gpt2_conv1d():
    base = gpt2()
    model = copy.deepcopy(base)
    names = apply_lora(model, LoRAConfig(), seed=0)
    assert names == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    assert isinstance(model.transformer.h[0].attn.c_attn, LoRALinear)
    assert isinstance(model.transformer.h[0].attn.c_attn.base, Conv1D)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, base(IDS).logits, rtol=0, atol=0)


def test_identity_at_init_vit_linear():
    base = vit()
    model = copy.deepcopy(base)
    # ViT's attention projections are q_proj/v_proj in transformers>=5, query/value before.
    targets = ["q_proj", "v_proj"] if hasattr(model.vit, "layers") else ["query", "value"]
    names = apply_lora(model, LoRAConfig(target_modules=targets), seed=0)
    assert len(names) == 4 and all(n.endswith(tuple("." + t for t in targets)) for n in names)
    with torch.no_grad():
        torch.testing.assert_close(model(PIX).logits, base(PIX).logits, rtol=0, atol=0)


def test_only_lora_trains_and_trainable_state_is_exact():
    model = gpt2().train()
    cfg = LoRAConfig(r=4, target_modules=["c_attn", "attn.c_proj"])
    names = apply_lora(model, cfg, seed=3)
    assert len(names) == 4  # c_attn and attn.c_proj in 2 blocks; mlp.c_proj not matched
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        model(IDS, labels=IDS).loss.backward()
        opt.step()
    after = model.state_dict()
    for k, v in after.items():
        if k.endswith((".lora_A", ".lora_B")):
            assert not torch.equal(v, before[k]), k
        else:
            assert torch.equal(v, before[k]), k

    state = trainable_state(model)
    assert set(state) == {f"{n}.lora_{x}" for n in names for x in "AB"}
    assert len(state) == 2 * len(names) == len(lora_parameters(model))
    n = 32  # n_embd: c_attn is 32 -> 96, attn.c_proj 32 -> 32
    assert sum(t.numel() for t in state.values()) == 2 * cfg.r * ((n + 3 * n) + (n + n))
    assert "transformer.h.0.attn.c_attn.base.weight" in after  # readable, stable keys


def test_train_bias_makes_wrapped_biases_trainable():
    model = gpt2()
    names = apply_lora(model, LoRAConfig(train_bias=True), seed=0)
    assert set(trainable_state(model)) == {f"{n}.{s}" for n in names for s in ("lora_A", "lora_B", "base.bias")}


def test_conv1d_layout_matches_explicit_formula():
    torch.manual_seed(4)
    holder = nn.Module()
    holder.c_attn = Conv1D(12, 8)  # nf=12 out, nx=8 in: weight (8, 12)
    cfg = LoRAConfig(r=3, alpha=6)
    apply_lora(holder, cfg, seed=0)
    lora = holder.c_attn
    with torch.no_grad():
        lora.lora_B.normal_()
    x = torch.randn(5, 7, 8)
    w, b = lora.base.weight, lora.base.bias
    expected = x @ (w + lora.lora_A.t() @ lora.lora_B.t() * (cfg.alpha / cfg.r)) + b
    torch.testing.assert_close(lora(x), expected)
    assert lora.lora_A.shape == (3, 8) and lora.lora_B.shape == (12, 3)


def test_same_seed_same_adapters_different_seed_different():
    def a_matrices(seed: int) -> list[torch.Tensor]:
        m = gpt2()
        apply_lora(m, LoRAConfig(), seed=seed)
        return [p.detach() for n, p in m.named_parameters() if n.endswith("lora_A")]

    a1, a2, a3 = a_matrices(7), a_matrices(7), a_matrices(8)
    assert all(torch.equal(x, y) for x, y in zip(a1, a2))
    assert not any(torch.equal(x, y) for x, y in zip(a1, a3))
    assert not torch.equal(a1[0], a1[1])  # per-layer seeds differ by name
    bound = 1 / 32 ** 0.5  # kaiming-uniform(a=sqrt(5)) on fan_in=32
    assert all(x.abs().max() <= bound for x in a1)


def test_bad_target_names_targets_and_available():
    with pytest.raises(ValueError, match=r"nope.*available.*c_attn"):
        apply_lora(gpt2(), LoRAConfig(target_modules=["nope"]), seed=0)
    m = gpt2()
    apply_lora(m, LoRAConfig(), seed=0)
    with pytest.raises(ValueError, match="already"):
        apply_lora(m, LoRAConfig(), seed=0)


def test_config_validation():
    for bad in ({"r": 0}, {"dropout": 1.0}, {"dropout": -0.1}, {"target_modules": []}, {"rank": 4}):
        with pytest.raises(ValidationError):
            LoRAConfig(**bad)


def test_cut_submodules_names_relative_and_model_unchanged():
    base = gpt2()
    model = copy.deepcopy(base)
    h = model.transformer.h
    device, server = nn.ModuleList(h[:1]), nn.ModuleList(h[1:])  # share the block objects
    assert apply_lora(device, LoRAConfig(), seed=0) == ["0.attn.c_attn"]
    assert apply_lora(server, LoRAConfig(target_modules=["c_attn", "c_fc"]), seed=0) == [
        "0.attn.c_attn", "0.mlp.c_fc"]
    assert set(trainable_state(device)) == {"0.attn.c_attn.lora_A", "0.attn.c_attn.lora_B"}
    # Wrapped in place: the full model sees the adapters and is still exact at init.
    assert isinstance(model.transformer.h[1].mlp.c_fc, LoRALinear)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, base(IDS).logits, rtol=0, atol=0)


def test_load_trainable_state_roundtrip():
    src, dst = gpt2(), gpt2()
    apply_lora(src, LoRAConfig(), seed=0)
    apply_lora(dst, LoRAConfig(), seed=1)
    with torch.no_grad():
        for p in lora_parameters(src):
            p.add_(1.0)
    load_trainable_state(dst, {k: v.clone() for k, v in trainable_state(src).items()})
    for k, v in trainable_state(src).items():
        assert torch.equal(trainable_state(dst)[k], v)
    with pytest.raises(KeyError, match="missing"):
        load_trainable_state(dst, {})
