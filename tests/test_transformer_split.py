"""Cutting GPT-2 and ViT at block k and running device then server gives the unsplit logits."""

import pytest
import torch

from sfl_ray.config import ModelConfig, TransformerConfig
from sfl_ray.config_base import ConfigError
from sfl_ray.models.hf_transformers import build_gpt2, build_vit
from sfl_ray.models.split import build_parts

TINY = TransformerConfig(n_layer=4, n_embd=32, n_head=2, n_positions=16, patch_size=8)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_gpt2_split_matches_the_unsplit_model(k):
    model, device, server, _, kk = build_gpt2(TINY, f"block{k}", 16, 100, seed=0)
    assert kk == k and len(device.h) == k and len(server.h) == 4 - k
    model.eval(), device.eval(), server.eval()
    ids = torch.randint(0, 100, (3, 16), generator=torch.Generator().manual_seed(k))
    with torch.no_grad():
        ref = model(ids).logits
        h = device(ids)  # (B, T, H): all that crosses the cut
        assert h.shape == (3, 16, 32)
        torch.testing.assert_close(server(h), ref, rtol=1e-4, atol=1e-5)


def test_gpt2_head_is_untied_but_starts_equal():
    model, device, server, _, _ = build_gpt2(TINY, "block2", 16, 100, seed=0)
    assert model.lm_head.weight is model.transformer.wte.weight  # tied in the HF model
    assert server.lm_head.weight is not device.wte.weight        # untied at the cut
    torch.testing.assert_close(server.lm_head.weight, device.wte.weight)


@pytest.mark.parametrize("k", [1, 3])
def test_vit_split_matches_the_unsplit_model(k):
    model, device, server, _, _ = build_vit(TINY, f"block{k}", (3, 32, 32), 10, seed=0)
    model.eval(), device.eval(), server.eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(k))
    with torch.no_grad():
        torch.testing.assert_close(server(device(x)), model(x).logits, rtol=1e-4, atol=1e-5)


def test_cut_gradient_matches_autograd_through_the_whole_gpt2():
    model, device, server, _, _ = build_gpt2(TINY, "block2", 16, 100, seed=0)
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    loss_full = model(ids).logits.square().mean()
    loss_full.backward()
    # a device-only weight (the embedding also feeds the tied head in the unsplit model)
    ref = device.h[0].attn.c_attn.weight.grad.clone()
    device.zero_grad(), server.zero_grad()
    z = device(ids)
    zd = z.detach().requires_grad_()
    server(zd).square().mean().backward()
    z.backward(zd.grad)
    torch.testing.assert_close(device.h[0].attn.c_attn.weight.grad, ref, rtol=1e-4, atol=1e-6)


def test_parts_know_the_activation_shape_and_reject_bad_cuts():
    cfg = ModelConfig(name="gpt2", transformer=TINY)
    parts = build_parts("gpt2", "block1", (16,), 100, 0, cfg)
    assert parts.act_shape == (16, 32) and parts.cut == "block1"
    aux = parts.aux_factory(1, True, 0)
    torch.testing.assert_close(aux.h[0].attn.c_attn.weight, parts.server.h[0].attn.c_attn.weight)
    with pytest.raises(ConfigError, match="model.cut"):
        build_parts("gpt2", "block4", (16,), 100, 0, cfg)
    with pytest.raises(ConfigError, match="model.cut"):
        build_parts("gpt2", "layer2", (16,), 100, 0, cfg)
    vparts = build_parts("vit", None, (3, 32, 32), 10, 0, ModelConfig(name="vit", transformer=TINY))
    assert vparts.act_shape == (17, 32)  # 16 patches + [CLS]


def test_transformer_aux_kinds():
    from sfl_ray.models.aux import AuxConfig, build_aux

    parts = build_parts("gpt2", "block1", (16,), 100, 0, ModelConfig(name="gpt2", transformer=TINY))
    minimal = build_aux(AuxConfig(kind="linear"), parts.act_shape, 100, 0, parts.aux_factory)
    assert len(minimal.h) == 0  # norm + LM head: the transformer analogue of one FC layer
    two = build_aux(AuxConfig(kind="blocks", blocks=2), parts.act_shape, 100, 0, parts.aux_factory)
    assert len(two.h) == 2 and two(torch.zeros(2, 16, 32)).shape == (2, 16, 100)
    with pytest.raises(ConfigError, match="algorithm.aux.kind"):
        build_aux(AuxConfig(kind="conv"), parts.act_shape, 100, 0, parts.aux_factory)


def test_from_pretrained_local_folders_split_to_the_saved_models(tmp_path):
    """`model.transformer.pretrained` = a folder written by `save_pretrained`: the split halves
    reproduce the saved model, not a fresh init (ViT gets a new head for the task's classes)."""
    from transformers import GPT2Config, GPT2LMHeadModel, ViTConfig, ViTForImageClassification

    torch.manual_seed(1)
    saved = GPT2LMHeadModel(GPT2Config(vocab_size=100, n_positions=16, n_embd=32, n_layer=3, n_head=2)).eval()
    saved.save_pretrained(tmp_path / "gpt2")
    cfg = TINY.model_copy(update={"pretrained": str(tmp_path / "gpt2")})
    _, device, server, _, k = build_gpt2(cfg, "block1", 16, 100, seed=0)
    assert k == 1 and len(server.h) == 2  # the saved depth, not TINY's
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(server.eval()(device.eval()(ids)), saved(ids).logits, rtol=1e-4, atol=1e-5)

    vit = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=32,
                                              num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                              num_labels=5)).eval()
    vit.save_pretrained(tmp_path / "vit")
    _, vdev, vserv, _, _ = build_vit(TINY.model_copy(update={"pretrained": str(tmp_path / "vit")}), "block1",
                                     (3, 32, 32), 10, seed=0)
    saved_vit = vit.vit.state_dict()
    for name, value in vdev.state_dict().items():  # embeddings.*, layers.0.*: the saved tensors
        torch.testing.assert_close(value, saved_vit[name])
    for name, value in vserv.layers[0].state_dict().items():
        torch.testing.assert_close(value, saved_vit[f"layers.1.{name}"])
    assert vserv.classifier.out_features == 10  # the task's classes, not the saved 5
