"""HERON-SFL: the device runs forward only (nothing saved for backward, less memory than
CSE-FSL), the ZO estimate points along the gradient, the seed trick restores and replays
exactly, only smashed data + labels + weights cross the link, and a short run learns."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sfl_ray.algorithms.common import upload_batches
from sfl_ray.algorithms.heron_sfl import HeronSFL, HeronSFLConfig, directions, perturb_, zo_params, zo_projection
from sfl_ray.config import TrainConfig
from sfl_ray.metrics.device_cost import MemoryTracker
from sfl_ray.models.aux import AuxConfig
from sfl_ray.runtime.link import Ledger, Link
from sfl_ray.runtime.protocol import Blueprint, ClientContext, ClientReply, RoundRuntime
from tests.helpers import local_coordinator, small_config


def _config(run_dir: str, algo: str, *overrides: str):
    """small_config with the same 1-FC aux head for every aux algorithm (set on the object:
    `--set algorithm.aux.kind=...` is dropped when algorithm.name is switched in the same call)."""
    cfg = small_config(run_dir, f"algorithm.name={algo}", *overrides)
    cfg.algorithm = cfg.algorithm.model_copy(update={"aux": AuxConfig(kind="linear")})
    return cfg


def _round_start(cfg):
    coord, ex = local_coordinator(cfg)
    coord.algorithm.init_global(coord.evaluator.parts)
    return coord, ex


def _down(algo) -> dict:
    return {"weights": algo.global_device, "aux_weights": algo.global_aux}


@pytest.fixture(scope="module")
def both(tmp_path_factory) -> dict:
    """HERON-SFL and CSE-FSL at round start on the same data, model, 1-FC aux and batch size."""
    d = str(tmp_path_factory.mktemp("runs"))
    return {a: _round_start(_config(d, a, "train.num_clients=2", "stop.rounds=1")) for a in ("heron_sfl", "cse_fsl")}


# -- 1. nothing is saved for backward on the device -------------------------------------------

@pytest.mark.parametrize("algo", ["heron_sfl", "cse_fsl"])
def test_no_tensor_is_saved_for_backward_on_the_device(both, algo):
    coord, ex = both[algo]
    down, pool = _down(coord.algorithm), ex.pool
    reply = pool.run("client_program", 0, 1, down)  # counted by the runtime's tracker
    assert reply.error is None, reply.error

    # Independently: the client program called by hand inside our own hooks.
    packs: list[tuple] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        packs.append(tuple(t.shape))
        return t

    ctx = ClientContext(0, 1, pool.blueprint, pool.parts, pool.data, pool.shards[0],
                        Link(pool.servers[0], 0, Ledger()), {}, MemoryTracker(), pool.device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        again, _ = pool.algorithm.client_program(ctx, down)
    ex.servers[0].program.pending.clear()  # these uploads are not part of any round
    if algo == "heron_sfl":
        assert reply.saved_tensors == 0 and packs == []
        # and the device program is a pure function of (seed, round, client, down)
        assert all(np.array_equal(again["weights"][k], reply.up["weights"][k]) for k in again["weights"])
    else:  # the same check on a first-order device bites
        assert reply.saved_tensors > 0 and len(packs) > 0


# -- 2. measured device memory: HERON below CSE-FSL --------------------------------------------

def test_device_peak_memory_is_below_cse_fsl(both):
    peaks, weights = {}, {}
    for algo, (coord, ex) in both.items():
        peaks[algo] = coord.run_one_round(1)["device_peak_mem_bytes"]
        aux = ex.pool.algorithm.aux_module(ex.pool.parts)
        weights[algo] = sum(t.numel() * t.element_size() for m in (ex.pool.parts.device, aux)
                            for t in [*m.parameters(), *m.buffers()])
    print(f"device peak memory: heron_sfl {peaks['heron_sfl']} B, cse_fsl {peaks['cse_fsl']} B, "
          f"weights {weights['heron_sfl']} B")
    assert peaks["heron_sfl"] < peaks["cse_fsl"]
    # inference-level: weights plus the live forward activations of one batch (measured), nothing
    # saved for backward; at least the first conv's output (B x 16 x 28 x 28 fp32) is live once
    act1 = 50 * 16 * 28 * 28 * 4
    assert weights["heron_sfl"] + act1 <= peaks["heron_sfl"] < weights["heron_sfl"] + 4 * act1
    assert peaks["cse_fsl"] >= 2 * weights["cse_fsl"]  # weights + grads (+ saved activations)


# -- 3. the ZO estimate points along the gradient ------------------------------------------------

def _toy() -> tuple[nn.Module, list[torch.Tensor], callable, torch.Tensor]:
    """A small MLP on a fixed batch: (model, params, loss_fn, autograd gradient)."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 3))
    x, y = torch.randn(32, 10, generator=gen), torch.randint(0, 3, (32,), generator=gen)
    params = zo_params([model])
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), params)
    return model, params, lambda: float(F.cross_entropy(model(x), y)), torch.cat([g.flatten() for g in grads])


def _estimate(params, loss_fn, seed: int, estimator: str) -> torch.Tensor:
    g, _ = zo_projection(params, loss_fn, seed, 1e-3, estimator)
    return g * torch.cat([u.flatten() for u in directions(params, seed)])


@pytest.mark.parametrize("estimator", ["central", "forward"])
def test_zo_estimate_agrees_with_the_true_gradient(estimator):
    _, params, loss_fn, true = _toy()
    ests = torch.stack([_estimate(params, loss_fn, s, estimator) for s in range(1000)])
    inner = ests @ true  # one probe each: E = |grad|^2
    sq = float(true @ true)
    assert float(inner.mean()) > 5 * float(inner.std()) / math.sqrt(len(inner))  # clearly positive
    assert abs(float(inner.mean()) / sq - 1) < 0.25  # and unbiased-ish (std error ~ 4.5%)
    cos = F.cosine_similarity(ests.mean(0), true, dim=0)
    assert cos > 0.8, cos  # d = 227, 1000 probes: the noise is ~ sqrt(d/N) of the signal


# -- 4. the seed trick -------------------------------------------------------------------------

@pytest.mark.parametrize("estimator", ["central", "forward"])
def test_perturb_restore_and_the_replayed_update(estimator):
    _, params, loss_fn, _ = _toy()
    before = [p.detach().clone() for p in params]
    g, _ = zo_projection(params, loss_fn, 123, 1e-3, estimator)
    # +mu, -2mu, +mu (or +mu, -mu) in fp32 is exact up to a few ulps of mu*|u|; we allow 1e-6 relative.
    for p, b in zip(params, before):
        assert float((p.detach() - b).abs().max()) <= 1e-6 * float(b.abs().max())
    # u is regenerated bit for bit from its seed, and differs for another seed
    first, again = list(directions(params, 123)), list(directions(params, 123))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], next(directions(params, 124)))
    # the update replayed from the seed is theta - lr * g * u with u drawn explicitly
    lr, restored = 0.1, [p.detach().clone() for p in params]
    perturb_(params, 123, -lr * g)
    for p, r, u in zip(params, restored, first):
        torch.testing.assert_close(p, r - lr * g * u, rtol=1e-6, atol=1e-7)


# -- 5. what crosses the link ------------------------------------------------------------------

def test_bytes_uploads_and_no_gradient_down(run_dir):
    every, bs, epochs = 3, 10, 2
    cfg = _config(run_dir, "heron_sfl", "stop.rounds=1", "partition.name=iid", f"train.batch_size={bs}",
                  f"train.local_epochs={epochs}", f"algorithm.upload_every={every}")
    coord, ex = _round_start(cfg)
    program = ex.servers[0].program
    calls: dict[int, int] = {}
    real = program.upload

    def spy(client, arrays, info):
        calls[client] = calls.get(client, 0) + 1
        return real(client, arrays, info)

    program.upload = spy
    row = coord.run_one_round(1)
    parts = ex.pool.parts
    aux = ex.pool.algorithm.aux_module(parts)
    act = 4 * math.prod(parts.act_shape)  # fp32 bytes per sample
    n = {c: len(ex.pool.shards[c]) for c in range(cfg.train.num_clients)}
    m = len(n)
    k = {c: -(-n[c] // bs) for c in n}
    uploaded = {c: sum(min(bs, n[c] - j * bs) for j in range(k[c]) if upload_batches(j, k[c], every, "first"))
                for c in n}
    w = lambda mod: sum(t.numel() * t.element_size() for t in mod.state_dict().values())  # noqa: E731
    kinds = row["bytes_by_kind"]
    assert "down/gradients" not in kinds
    assert kinds == {"down/weights": m * w(parts.device), "down/aux_weights": m * w(aux),
                     "up/weights": m * w(parts.device), "up/aux_weights": m * w(aux),
                     "up/activations": epochs * act * sum(uploaded.values()),
                     "up/labels": epochs * 8 * sum(uploaded.values())}
    assert calls == {c: epochs * math.ceil(k[c] / every) for c in n}
    assert all(n[c] % bs == 0 for c in n)  # full batches: bytes / per-upload bytes = number of uploads
    assert kinds["up/activations"] // (bs * act) == m * epochs * math.ceil(k[0] / every)
    assert row["server_steps"] == sum(calls.values())  # one optimizer step per upload
    assert row["server_samples"] == epochs * sum(uploaded.values())


class _FakeRound(RoundRuntime):
    """Hands back prepared replies; the server accepts the schedule's calls."""

    num_servers = 1

    def __init__(self, replies):
        self._replies = replies

    def clients(self, ids, down, parallel=True, program="client_program", per_client=None):
        return [self._replies[c] for c in ids]

    def server(self, method, *args, index=0):
        return {}


def test_device_models_are_averaged_unweighted():
    assert HeronSFLConfig().weighted is False
    algo = HeronSFL(Blueprint("cnn", None, (1, 28, 28), 10, 0, TrainConfig(), HeronSFLConfig()))
    rng = np.random.default_rng(0)
    n = {0: 10, 1: 30, 2: 60}
    up = {c: {"weights": {"w": rng.normal(size=4).astype(np.float32)},
              "aux_weights": {"a": rng.normal(size=2).astype(np.float32)}} for c in n}
    replies = {c: ClientReply(client=c, up=up[c], info={"num_samples": n[c]}) for c in n}
    algo.global_device, algo.global_aux = {}, {}  # what went down does not matter here
    algo.run_round(_FakeRound(replies), 1, [0, 1, 2])
    for got, kind, key in ((algo.global_device, "weights", "w"), (algo.global_aux, "aux_weights", "a")):
        expect = np.mean([up[c][kind][key].astype(np.float64) for c in n], axis=0)  # not by n[c]
        np.testing.assert_allclose(got[key], expect, rtol=1e-6)


# -- 6. a short run learns ---------------------------------------------------------------------

def test_short_run_lowers_the_loss(run_dir):
    cfg = _config(run_dir, "heron_sfl", "train.batch_size=10", "stop.rounds=3", "algorithm.server_lr=0.01")
    coord, _ = _round_start(cfg)
    rows = [coord.run_one_round(r) for r in (1, 2, 3)]
    aux = [r["train_loss"] for r in rows]     # the devices' local (aux) loss: ZO only
    server = [r["server_loss"] for r in rows]  # the server's loss on the uploads: first order
    assert aux[2] < aux[0] - 0.05, aux
    assert server[2] < server[0] - 0.02, server
    assert all(np.isfinite(aux))
