"""Compression on the link (link.compression): round-trip error bounds per mode; the bytes
counted are the compressed payload sizes; none changes nothing; both backends agree."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from sfl_ray.algorithms.common import upload_batches
from sfl_ray.runtime import codec as codec_mod
from sfl_ray.runtime.codec import Codec, channel_axis, decode, decode_array, from_bf16_bits, to_bf16_bits
from sfl_ray.runtime.finite import NonFiniteError
from sfl_ray.runtime.link import DOWN, UP, Ledger, Link
from sfl_ray.runtime.wire import payload_nbytes
from tests.helpers import local_coordinator, small_config, without_timing

MODES = [("fp16", "channel"), ("bf16", "channel"), ("int8", "tensor"), ("int8", "channel")]


def _data(shape, seed=0) -> np.ndarray:
    """Values over eight decades (within fp16's range), with channels of very different ranges
    (where per-channel scales matter)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * 10.0 ** rng.uniform(-4, 2, size=shape)
    ax = channel_axis(len(shape))
    spread = np.ones(len(shape), int)
    spread[ax] = shape[ax]
    return (x * 10.0 ** rng.uniform(-1.5, 1.5, size=spread)).astype(np.float32)


def _roundtrip(mode: str, scale: str, x: np.ndarray) -> tuple[dict, np.ndarray]:
    wire = Codec(mode, scale).encode_array(x)
    return wire, decode_array(wire)


# -- the codec on its own ------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(32, 16, 7, 7), (8, 12, 64), (32, 300)])
def test_fp16_is_a_round_to_nearest_cast(shape):
    x = _data(shape)
    wire, back = _roundtrip("fp16", "channel", x)
    assert wire["fp16"].dtype == np.float16 and back.dtype == np.float32 and back.shape == x.shape
    np.testing.assert_array_equal(back, torch.from_numpy(x).half().float().numpy())  # torch's cast, bit for bit
    normal = np.abs(x) >= 2.0 ** -14  # fp16's normal range: relative error at most 2^-11
    assert (np.abs(back - x)[normal] <= 2.0 ** -11 * np.abs(x)[normal]).all()
    assert (np.abs(back - x)[~normal] <= 2.0 ** -25).all()  # subnormals: half an ulp, absolute
    # beyond fp16's range a cast gives inf: refused, naming why, rather than sent
    with pytest.raises(NonFiniteError, match="65504"):
        Codec("fp16").encode_array(np.float32([[1.0, 7e4]]))
    with pytest.raises(NonFiniteError, match="non-finite"):
        Codec("fp16").encode_array(np.float32([[1.0, np.nan]]))


@pytest.mark.parametrize("shape", [(32, 16, 7, 7), (8, 12, 64), (32, 300)])
def test_bf16_matches_torch_bfloat16_and_its_error_bound(shape):
    x = _data(shape)
    wire, back = _roundtrip("bf16", "channel", x)
    assert wire["bf16"].dtype == np.uint16 and wire["bf16"].nbytes == 2 * x.size
    np.testing.assert_array_equal(back, torch.from_numpy(x).bfloat16().float().numpy())
    assert (np.abs(back - x) <= 2.0 ** -8 * np.abs(x)).all()  # 8 significant bits: half an ulp
    # the bit conversion: ties go to even; inf and NaN survive; the largest float32 rounds to
    # inf, as torch does
    special = np.array([1 + 2 ** -8, 1 + 3 * 2 ** -8, np.inf, -np.inf, np.nan, 3.4e38, -0.0], np.float32)
    b = from_bf16_bits(to_bf16_bits(special))
    np.testing.assert_array_equal(b, torch.from_numpy(special).bfloat16().float().numpy())
    assert b[0] == 1.0 and b[1] == 1 + 2 ** -6
    for bad in (np.nan, np.inf, 3.4e38):  # a non-finite wire value is refused, not sent
        with pytest.raises(NonFiniteError):
            Codec("bf16").encode_array(np.float32([[1.0, bad]]))


@pytest.mark.parametrize("shape, channels", [((32, 16, 7, 7), 16), ((8, 12, 64), 64), ((32, 300), 300)])
@pytest.mark.parametrize("scale", ["tensor", "channel"])
def test_int8_error_is_at_most_half_a_step_of_its_scale(shape, channels, scale):
    x = _data(shape)
    wire, back = _roundtrip("int8", scale, x)
    q, s = wire["int8"], wire["scale"]
    assert q.dtype == np.int8 and s.dtype == np.float32 and back.dtype == np.float32
    assert np.abs(q.astype(int)).max() == 127  # the largest value of each scale's extent uses the full range
    n_scales = channels if scale == "channel" else 1
    assert s.size == n_scales and s.ndim == x.ndim  # keepdims: broadcasts against the tensor
    if scale == "channel":
        assert s.shape[channel_axis(x.ndim)] == channels
    assert payload_nbytes(wire) == x.size + 4 * n_scales
    # |x - q s| <= s / 2, with s = max|x| / 127 over the scale's extent (plus float32 rounding)
    assert (np.abs(back - x) <= s / 2 * (1 + 1e-5) + 1e-30).all()


def test_per_channel_scales_beat_one_scale_on_channels_of_different_ranges():
    x = _data((32, 16, 7, 7))
    err = {s: np.abs(_roundtrip("int8", s, x)[1] - x) for s in ("tensor", "channel")}
    small = np.abs(x).max(axis=(0, 2, 3)).argmin()  # the quietest channel: one global scale flattens it
    assert err["channel"][:, small].max() < err["tensor"][:, small].max() / 10
    assert err["channel"].mean() < err["tensor"].mean()


def test_int8_edge_cases_are_exact_or_refused():
    z = np.zeros((4, 3, 2, 2), np.float32)
    z[:, 1] = np.linspace(-1, 1, 16).reshape(4, 2, 2)
    back = _roundtrip("int8", "channel", z)[1]
    assert (back[:, 0] == 0).all() and (back[:, 2] == 0).all()  # all-zero channels stay exactly zero
    assert _roundtrip("int8", "channel", np.zeros((0, 3), np.float32))[1].shape == (0, 3)  # empty batch
    for bad in (np.nan, np.inf):
        with pytest.raises(NonFiniteError):
            Codec("int8").encode_array(np.float32([[1.0, bad]]))


@pytest.mark.parametrize("mode, scale", MODES)
def test_encoding_is_deterministic_and_only_touches_float32_activations_and_gradients(mode, scale):
    c = Codec(mode, scale)
    x = _data((16, 8, 5, 5), seed=1)
    payload = {"activations": x, "gradients": x * 2, "labels": np.arange(16), "weights": {"w": x},
               "aux_weights": {"b": x[0]}, "ids": x.astype(np.float64)}
    a, b = c.encode(payload), c.encode(payload)
    for k in ("activations", "gradients"):
        assert isinstance(a[k], dict)
        for name in a[k]:
            np.testing.assert_array_equal(a[k][name], b[k][name])  # no stochastic rounding
    for k in ("labels", "weights", "aux_weights", "ids"):
        assert a[k] is payload[k]  # weights, labels and every other kind travel as they are
    out = decode(a)
    assert out["activations"].dtype == np.float32 and out["labels"] is payload["labels"]
    assert payload_nbytes(a["activations"]) == c.nbytes("activations", x) < x.nbytes


def test_none_passes_every_payload_through_as_the_same_object():
    c = Codec()
    x = _data((4, 3, 2, 2))
    for payload in ({"activations": x, "labels": np.arange(4)}, {"gradients": x}, {"weights": {"w": x}}, {}):
        assert c.encode(payload) is payload
        assert decode(payload) is payload
    assert c.nbytes("activations", x) == x.nbytes
    with pytest.raises(ValueError):
        Codec("int4")


# -- the link: what moves is the compressed form, and it is what is counted ---------------------

class _RecordingEndpoint:
    """A server block stand-in: keeps what arrived and replies with an encoded gradient."""

    def __init__(self, codec: Codec, grad: np.ndarray):
        self.codec, self.grad, self.seen = codec, grad, []

    def call(self, method, client, arrays, info):
        self.seen.append(arrays)
        return self.codec.encode({"gradients": self.grad}), {"loss": 0.0}


@pytest.mark.parametrize("mode, scale", MODES)
def test_link_sends_counts_and_decodes_the_compressed_form(mode, scale):
    c = Codec(mode, scale)
    z, g = _data((8, 6, 4, 4), seed=2), _data((8, 6, 4, 4), seed=3)
    y = torch.arange(8)
    ep = _RecordingEndpoint(c, g)
    ledger = Ledger()
    reply, _ = Link(ep, 0, ledger, c).call("train_step", {"activations": torch.from_numpy(z), "labels": y})
    (sent,) = ep.seen
    assert isinstance(sent["activations"], dict)  # the wire form, not float32
    per_value = 1 if mode == "int8" else 2
    scales = 4 * (6 if scale == "channel" else 1) if mode == "int8" else 0
    assert ledger.bytes[(UP, "activations")] == z.size * per_value + scales == payload_nbytes(sent["activations"])
    assert ledger.bytes[(UP, "labels")] == 8 * 8  # never compressed
    assert ledger.bytes[(DOWN, "gradients")] == g.size * per_value + scales
    got = reply["gradients"]
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float32
    np.testing.assert_array_equal(got.numpy(), decode_array(c.encode_array(g)))


# -- whole rounds: counted bytes equal the closed form of the compressed payloads ------------

def _round(run_dir, algo, mode, scale, *extra):
    cfg = small_config(run_dir, f"algorithm.name={algo}", f"link.compression={mode}", f"link.int8_scale={scale}",
                       "train.num_clients=3", "stop.rounds=1", "data.max_train_samples=310", "train.batch_size=32",
                       "train.optimizer=adam", "train.lr=0.001", *extra)
    coord, ex = local_coordinator(cfg)
    coord.algorithm.init_global(coord.evaluator.parts)
    return cfg, coord, ex, coord.run_one_round(1)


def _tensor_bytes(mode: str, scale: str, samples: int, act_shape: tuple, messages: int) -> int:
    """Closed form of `messages` tensors holding `samples` samples of `act_shape` on the wire."""
    per_sample = math.prod(act_shape)
    if mode == "none":
        return 4 * samples * per_sample
    if mode in ("fp16", "bf16"):
        return 2 * samples * per_sample
    channels = act_shape[channel_axis(len(act_shape) + 1) - 1] if scale == "channel" else 1
    return samples * per_sample + 4 * channels * messages


def _batch_sizes(n: int, bs: int) -> list[int]:
    return [min(bs, n - i) for i in range(0, n, bs)]


@pytest.mark.parametrize("mode, scale", MODES)
def test_splitfed_v2_round_counts_the_compressed_sizes(run_dir, mode, scale):
    cfg, coord, ex, row = _round(run_dir, "splitfed_v2", mode, scale)
    parts = coord.evaluator.parts
    n = [len(ex.pool.shards[c]) for c in range(3)]
    N, batches = sum(n), sum(len(_batch_sizes(k, 32)) for k in n)
    act = _tensor_bytes(mode, scale, N, parts.act_shape, batches)
    w = 3 * sum(v.numel() * v.element_size() for v in parts.device.state_dict().values())
    assert row["bytes_by_kind"] == {"up/activations": act, "down/gradients": act, "up/labels": 8 * N,
                                    "up/weights": w, "down/weights": w}
    assert row["bytes_up"] == act + 8 * N + w and row["bytes_down"] == act + w
    if mode == "int8":  # the closed form of the issue: one byte a value + 4 per channel and message
        assert act == N * math.prod(parts.act_shape) + 4 * batches * (parts.act_shape[0] if scale == "channel" else 1)
    assert math.isfinite(row["train_loss"])


@pytest.mark.parametrize("mode, scale", MODES)
def test_cse_fsl_uploads_count_the_compressed_sizes(run_dir, mode, scale):
    cfg, coord, ex, row = _round(run_dir, "cse_fsl", mode, scale, "algorithm.upload_every=3")
    parts = coord.evaluator.parts
    sizes = []  # the batches each client uploads: the first of every chunk of 3
    for c in range(3):
        b = _batch_sizes(len(ex.pool.shards[c]), 32)
        sizes += [s for k, s in enumerate(b) if upload_batches(k, len(b), 3, "first")]
    assert row["bytes_by_kind"]["up/activations"] == _tensor_bytes(mode, scale, sum(sizes), parts.act_shape, len(sizes))
    assert row["bytes_by_kind"]["up/labels"] == 8 * sum(sizes)
    assert "down/gradients" not in row["bytes_by_kind"]


@pytest.mark.parametrize("mode, scale", [("bf16", "channel"), ("int8", "channel")])
def test_sglr_compresses_through_the_schedule(run_dir, mode, scale):
    """SGLR's activations come up in client replies and its gradients go down as per-client
    payloads: the schedule's side of the link compresses and decodes them."""
    cfg, coord, ex, row = _round(run_dir, "sglr", mode, scale, "algorithm.schedule=table2")
    parts = coord.evaluator.parts
    n = [len(ex.pool.shards[c]) for c in range(3)]
    N, batches = sum(n), sum(len(_batch_sizes(k, 32)) for k in n)
    act = _tensor_bytes(mode, scale, N, parts.act_shape, batches)
    assert row["bytes_by_kind"] == {"up/activations": act, "down/gradients": act, "up/labels": 8 * N}
    # the server's multicast telemetry is in the compressed size too: less than fp32's
    assert 0 < row["server_gradient_send_bytes"] <= act < _tensor_bytes("none", scale, N, parts.act_shape, batches)
    assert math.isfinite(row["train_loss"])


def test_ampere_transfer_counts_the_compressed_activations(run_dir):
    cfg = small_config(run_dir, "algorithm.name=ampere", "link.compression=int8", "train.num_clients=3",
                       "stop.rounds=1", "data.max_train_samples=310", "algorithm.server_epochs=1")
    coord, ex = local_coordinator(cfg)
    coord.run()
    transfer = [r for r in coord.writer.rows if r["phase"] == "transfer"][0]
    act_shape = coord.evaluator.parts.act_shape
    # each device sends its whole data set once: one tensor, one scale per channel
    assert transfer["bytes_by_kind"]["up/activations"] == _tensor_bytes("int8", "channel", 310, act_shape, 3)
    assert coord.writer.rows[-1]["eval_accuracy"] > 0.1


def test_compression_changes_training_but_none_does_not(run_dir):
    losses = {}
    for mode in ("none", "int8"):
        _, _, _, row = _round(run_dir + mode, "splitfed_v2", mode, "channel")
        losses[mode] = row["train_loss"]
    assert losses["int8"] != losses["none"]  # the server did train on dequantized activations
    assert abs(losses["int8"] - losses["none"]) < 0.05 * losses["none"]


@pytest.mark.parametrize("algo", ["splitfed_v2", "sglr", "cse_fsl"])
def test_none_is_bit_identical_to_no_codec_at_all(run_dir, monkeypatch, algo):
    """link.compression=none against a runtime with the codec cut out (what ran before it existed):
    every number of the rows, device memory included, is the same."""
    def run(tag):
        cfg = small_config(run_dir, f"algorithm.name={algo}", "link.compression=none", f"output.name={tag}",
                           "train.optimizer=adam", "train.lr=0.001")
        coord, _ = local_coordinator(cfg)
        coord.run()
        return without_timing(coord.writer.rows)

    with_codec = run("codec")
    import sfl_ray.runtime.coordinator as coordinator
    import sfl_ray.runtime.link as link
    import sfl_ray.runtime.pool as pool
    import sfl_ray.runtime.server as server
    for mod in (coordinator, link, pool, server):
        monkeypatch.setattr(mod, "decode", lambda p: p)
    monkeypatch.setattr(codec_mod.Codec, "encode", lambda self, p: p)
    assert json.dumps(run("bypass"), sort_keys=True) == json.dumps(with_codec, sort_keys=True)


# -- both backends -----------------------------------------------------------------------

@pytest.mark.slow  # starts a Ray cluster
@pytest.mark.parametrize("algo, mode", [("splitfed_v2", "int8"), ("sglr", "bf16")])
def test_ray_and_local_give_identical_metrics_with_compression(ray_cluster, run_dir, algo, mode):
    from sfl_ray.run import prepare
    from sfl_ray.runtime.launch import run_experiment

    rows = {}
    for backend in ("local", "ray"):
        cfg = small_config(run_dir, f"algorithm.name={algo}", f"link.compression={mode}",
                           f"cluster.backend={backend}", f"output.name={algo}-{backend}", "cluster.num_pools=2",
                           "train.optimizer=adam", "train.lr=0.001")
        algorithm_cls, data, shards, _ = prepare(cfg)
        run_experiment(algorithm_cls, cfg, data, shards)
        with open(f"{cfg.run_dir()}/metrics.jsonl") as f:
            rows[backend] = [json.loads(line) for line in f]
    assert len(rows["ray"]) == 2
    assert without_timing(rows["ray"]) == without_timing(rows["local"])
    # what was counted is the compressed form: less than half of fp32's
    from sfl_ray.runtime.launch import make_blueprint
    act = make_blueprint(cfg, data).build_parts().act_shape
    for r in rows["ray"]:
        samples = r["bytes_by_kind"]["up/labels"] // 8
        assert r["bytes_by_kind"]["up/activations"] <= 2 * samples * math.prod(act) + 4 * 1000
        assert r["bytes_by_kind"]["down/gradients"] == r["bytes_by_kind"]["up/activations"]
