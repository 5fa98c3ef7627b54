"""The training loss: next-token cross-entropy over target tokens, as GPT-2's own loss, and a
batch with no target token (its prompts fill data.max_length) teaches nothing instead of NaN."""

import warnings

import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from sfl_ray.models.task import IGNORE, task_loss

CFG = GPT2Config(vocab_size=97, n_positions=16, n_embd=16, n_layer=1, n_head=2)


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, CFG.vocab_size, (4, 12), generator=g)
    labels = ids.clone()
    labels[:, :5] = IGNORE  # prompts
    labels[1, 8:] = IGNORE  # padding
    return ids, labels


def test_lm_loss_equals_gpt2s_own_loss_and_its_gradient():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(CFG).eval()
    ids, labels = _batch()
    ours = task_loss(model(ids).logits, labels)
    theirs = model(ids, labels=labels).loss
    assert torch.allclose(ours, theirs, rtol=1e-6, atol=1e-6)
    g_ours = torch.autograd.grad(ours, model.lm_head.weight)[0]
    g_theirs = torch.autograd.grad(model(ids, labels=labels).loss, model.lm_head.weight)[0]
    assert torch.allclose(g_ours, g_theirs, rtol=1e-5, atol=1e-7)
    assert torch.allclose(task_loss(model(ids).logits, labels, "sum"),
                          ours * (labels[:, 1:] != IGNORE).sum(), rtol=1e-5)


def test_a_batch_without_targets_gives_zero_loss_and_gradient_and_adam_stays_finite():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(CFG)
    ids, _ = _batch()
    empty = torch.full_like(ids, IGNORE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.isnan(F.cross_entropy(model(ids).logits[:, :-1].reshape(-1, CFG.vocab_size),
                                           empty[:, 1:].reshape(-1), ignore_index=IGNORE))  # what it was
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for labels in (_batch(1)[1], empty, _batch(2)[1]):  # an empty batch between two real ones
        loss = task_loss(model(ids).logits, labels)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        if labels is empty:
            assert float(loss.detach()) == 0.0
            assert all(p.grad is None or not p.grad.any() for p in model.parameters())
        opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_per_sample_loss_of_a_sample_without_targets_is_zero():
    logits = torch.randn(2, 6, 11)
    labels = torch.randint(0, 11, (2, 6))
    labels[0] = IGNORE
    per = task_loss(logits, labels, "none")
    assert per[0] == 0 and torch.isfinite(per).all() and per[1] > 0
