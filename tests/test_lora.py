"""LoRA on HF blocks through peft (sfl_ray.models.lora): exact at init, only adapters train,
Conv1D layout, determinism, errors, cut sub-modules, and older checkpoints. Tiny models built
from configs (no network)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn
from pydantic import ValidationError

pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel, ViTConfig, ViTForImageClassification  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

from peft import get_peft_model_state_dict  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402

from sfl_ray.models.lora import LoRAConfig, apply_lora, has_adapters  # noqa: E402
from sfl_ray.models.split import mark_frozen  # noqa: E402
from sfl_ray.runtime.wire import load_weights, module_weights  # noqa: E402

A, B = "lora_A.default.weight", "lora_B.default.weight"  # peft's names for an adapter's matrices


def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Name -> tensor of every parameter that trains."""
    return {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}


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
    assert isinstance(model.transformer.h[0].attn.c_attn, LoraLayer)
    assert isinstance(model.transformer.h[0].attn.c_attn.base_layer, Conv1D)
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
        if k.endswith(("." + A, "." + B)):
            assert not torch.equal(v, before[k]), k
        else:
            assert torch.equal(v, before[k]), k

    state = trainable_state(model)
    assert set(state) == {f"{n}.{x}" for n in names for x in (A, B)}
    # Exactly peft's own adapter state (its keys drop the adapter name).
    peft_state = get_peft_model_state_dict(model)
    assert len(state) == 2 * len(names) == len(peft_state)
    assert all(torch.equal(state[k.replace(".weight", ".default.weight")], v) for k, v in peft_state.items())
    n = 32  # n_embd: c_attn is 32 -> 96, attn.c_proj 32 -> 32
    assert sum(t.numel() for t in state.values()) == 2 * cfg.r * ((n + 3 * n) + (n + n))
    assert "transformer.h.0.attn.c_attn.base_layer.weight" in after  # readable, stable keys


def test_train_bias_makes_wrapped_biases_trainable():
    model = gpt2()
    names = apply_lora(model, LoRAConfig(train_bias=True), seed=0)
    assert set(trainable_state(model)) == {f"{n}.{s}" for n in names for s in (A, B, "base_layer.bias")}


def test_conv1d_layout_matches_explicit_formula():
    torch.manual_seed(4)
    holder = nn.Module()
    holder.c_attn = Conv1D(12, 8)  # nf=12 out, nx=8 in: weight (8, 12)
    cfg = LoRAConfig(r=3, alpha=6)
    apply_lora(holder, cfg, seed=0)
    lora = holder.c_attn
    lora_a, lora_b = lora.lora_A["default"].weight, lora.lora_B["default"].weight
    with torch.no_grad():
        lora_b.normal_()
    x = torch.randn(5, 7, 8)
    w, b = lora.base_layer.weight, lora.base_layer.bias
    expected = x @ (w + lora_a.t() @ lora_b.t() * (cfg.alpha / cfg.r)) + b
    torch.testing.assert_close(lora(x), expected)
    assert lora_a.shape == (3, 8) and lora_b.shape == (12, 3)


def test_same_seed_same_adapters_different_seed_different():
    def a_matrices(seed: int) -> list[torch.Tensor]:
        m = gpt2()
        apply_lora(m, LoRAConfig(), seed=seed)
        return [p.detach() for n, p in m.named_parameters() if n.endswith(A)]

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
    assert set(trainable_state(device)) == {f"0.attn.c_attn.{A}", f"0.attn.c_attn.{B}"}
    # Wrapped in place: the full model sees the adapters and is still exact at init.
    assert isinstance(model.transformer.h[1].mlp.c_fc, LoraLayer)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, base(IDS).logits, rtol=0, atol=0)


def test_load_trainable_state_roundtrip():
    # Through the runtime's exchange (wire.module_weights / load_weights) on cut blocks (the whole
    # model's tied LM head would show up as a second, untagged name of the embedding).
    src, dst = gpt2().transformer.h, gpt2().transformer.h
    apply_lora(src, LoRAConfig(), seed=0)
    apply_lora(dst, LoRAConfig(), seed=1)
    mark_frozen(src), mark_frozen(dst)
    with torch.no_grad():
        for p in src.parameters():
            if p.requires_grad:
                p.add_(1.0)
    sent = module_weights(src)
    assert set(sent) == set(trainable_state(src))  # adapters only, as numpy
    peft_state = get_peft_model_state_dict(src)  # peft's adapter state: the same tensors
    assert {k.replace(".weight", ".default.weight") for k in peft_state} == set(sent)
    assert all((sent[k.replace(".weight", ".default.weight")] == v.numpy()).all() for k, v in peft_state.items())
    load_weights(dst, sent)
    for k, v in trainable_state(src).items():
        assert torch.equal(trainable_state(dst)[k], v)
    with pytest.raises(KeyError, match="missing"):
        load_weights(dst, {})


def test_global_rng_untouched_and_a_depends_only_on_seed_and_name():
    """peft draws its layers' init from the global RNG: apply_lora must leave it as it was, and
    a layer's A must not depend on which other layers are adapted."""
    torch.manual_seed(11)
    expected = torch.rand(3)
    m1, m2 = gpt2(), gpt2()
    torch.manual_seed(11)
    apply_lora(m1, LoRAConfig(target_modules=["c_attn"]), seed=5)
    assert torch.equal(torch.rand(3), expected)
    apply_lora(m2, LoRAConfig(target_modules=["mlp.c_fc", "c_attn"]), seed=5)
    a1, a2 = dict(m1.named_parameters()), dict(m2.named_parameters())
    for i in range(2):
        k = f"transformer.h.{i}.attn.c_attn.{A}"
        assert torch.equal(a1[k], a2[k]), k
    assert has_adapters(m1) and not has_adapters(gpt2())


def test_only_linear_and_conv1d_are_adapted_even_when_other_layers_match():
    """A target suffix that also names an embedding adapts only the Linear/Conv1D layers (peft's
    own matching would adapt the embedding too)."""
    holder = nn.Module()
    holder.proj, holder.emb = nn.Module(), nn.Module()
    holder.proj.wte, holder.emb.wte = nn.Linear(4, 4), nn.Embedding(10, 4)
    assert apply_lora(holder, LoRAConfig(r=2, target_modules=["wte"]), seed=0) == ["proj.wte"]
    assert isinstance(holder.proj.wte, LoraLayer) and isinstance(holder.emb.wte, nn.Embedding)


def test_a_checkpoint_of_the_hand_written_lora_loads_into_peft_blocks():
    """Before peft, an adapted layer P held P.base.weight/bias, P.lora_A, P.lora_B: checkpoints
    written then are renamed on load (runtime.checkpoint.peft_lora_names) and load strictly."""
    from sfl_ray.runtime.checkpoint import peft_lora_names

    block = gpt2().transformer.h
    apply_lora(block, LoRAConfig(), seed=0)
    new = {k: v.clone() for k, v in block.state_dict().items()}
    old_names = {f"{i}.attn.c_attn.{o}": f"{i}.attn.c_attn.{n}" for i in range(2) for o, n in
                 (("base.weight", "base_layer.weight"), ("base.bias", "base_layer.bias"), ("lora_A", A), ("lora_B", B))}
    legacy = {}
    for k, v in new.items():
        old = [o for o, n in old_names.items() if n == k]
        legacy[old[0] if old else k] = v.clone() + 1
    assert "0.attn.c_attn.lora_A" in legacy and "0.mlp.c_fc.weight" in legacy
    tree = {"servers": [{"model": {"__module__": legacy}}], "algorithm": {"global_device": dict(legacy)},
            "other": {"x.base.weight": 1}}  # not an adapted layer's: kept
    migrated = peft_lora_names(tree)
    assert migrated["other"] == {"x.base.weight": 1}
    assert set(migrated["algorithm"]["global_device"]) == set(new)
    block.load_state_dict(migrated["servers"][0]["model"]["__module__"])  # strict
    assert all(torch.equal(v, new[k] + 1) for k, v in block.state_dict().items())
    assert peft_lora_names({"n": new}) == {"n": new}  # peft's own names are left alone


def test_conv1d_and_linear_targets_together_each_keep_their_layout():
    torch.manual_seed(5)
    holder = nn.Module()
    holder.c_attn, holder.lm_head = Conv1D(12, 8), nn.Linear(8, 6)  # Conv1D: x @ W; Linear: x @ W^T
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # peft's per-layer fan_in_fan_out notice is expected and silenced
        apply_lora(holder, LoRAConfig(r=2, alpha=4, target_modules=["c_attn", "lm_head"]), seed=0)
    x = torch.randn(3, 8)
    for layer, base in ((holder.c_attn, lambda w: x @ w), (holder.lm_head, lambda w: x @ w.t())):
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        with torch.no_grad():
            b.normal_()
        delta = (b @ a * 2.0).t() if isinstance(layer.base_layer, Conv1D) else b @ a * 2.0
        torch.testing.assert_close(layer(x), base(layer.base_layer.weight + delta) + layer.base_layer.bias)
