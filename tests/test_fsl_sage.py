"""FSL-SAGE: every client trains against an estimator aligned on its own uploads from round 1;
alignment makes the aux's cut gradient track the server's; the aux goes down only when a client
is aligned; the buffer keeps only the last M samples; telemetry changes nothing and costs no
counted FLOPs; only device blocks are averaged."""

import numpy as np
import pytest
import torch

from tests.helpers import local_coordinator, small_config


def _sage(run_dir, *extra):
    cfg = small_config(run_dir, "algorithm.name=fsl_sage", "train.num_clients=3", "train.clients_per_round=3",
                       "algorithm.align_epochs=30", "algorithm.buffer_size=120", "algorithm.align_batch_size=60",
                       "train.batch_size=20", "algorithm.upload_every=2", *extra)
    return local_coordinator(cfg)


def test_round_one_trains_against_an_aux_aligned_on_the_clients_own_uploads(run_dir):
    coord, ex = _sage(run_dir, "stop.rounds=1")
    server = ex.servers[0].program
    seen, real_align = [], server.align

    def spy(client, rnd):
        z, y = server.buffers[client]
        seen.append((client, rnd, len(y)))
        return real_align(client, rnd)

    server.align = spy
    initial = {k: v.copy() for k, v in ex.pool.algorithm.aux_module(ex.pool.parts).state_dict().items()
               for v in [v.numpy()]}
    coord.run()
    row = coord.writer.rows[0]
    # Each client aligned once, in round 1, on a buffer holding exactly its first upload (20 samples).
    assert sorted(seen) == [(0, 1, 20), (1, 1, 20), (2, 1, 20)]
    assert row["aligned"] and row["aligned_clients"] == 3
    assert row["align_cosine"] > row["align_cosine_before"] + 0.05, row
    assert row["align_mse"] < row["align_mse_before"], row
    for c in range(3):  # the estimator each device kept is the server's aligned aux, not the initial one
        kept = ex.pool.state[c]["aux_weights"]
        aligned = server.aux[c][0].state_dict()
        assert all(np.array_equal(kept[k], aligned[k].numpy()) for k in kept)
        assert any(not np.array_equal(kept[k], initial[k]) for k in kept)


def test_aux_goes_down_only_when_a_client_is_aligned(run_dir):
    coord, _ = _sage(run_dir, "stop.rounds=5", "algorithm.align_every=2", "algorithm.align_epochs=2")
    coord.run()
    rows = coord.writer.rows
    aux_down = [r["bytes_by_kind"].get("down/aux_weights", 0) for r in rows]
    assert [a > 0 for a in aux_down] == [True, False, True, False, True]
    assert len(set(a for a in aux_down if a)) == 1  # every alignment round ships the 3 auxes once
    assert [r["aligned"] for r in rows] == [True, False, True, False, True]
    assert all(r["align_cosine"] is None for r in rows if not r["aligned"])
    assert all("up/aux_weights" not in r["bytes_by_kind"] for r in rows)  # the aux is never averaged
    assert all("down/gradients" not in r["bytes_by_kind"] for r in rows)


def test_a_client_first_sampled_between_alignment_rounds_is_aligned_then(run_dir):
    coord, ex = _sage(run_dir, "stop.rounds=4", "train.clients_per_round=1", "algorithm.align_every=10",
                      "algorithm.align_epochs=2")
    coord.run()
    first_seen: dict = {}
    for r, row in enumerate(coord.writer.rows, start=1):
        (c,) = coord.sample(r)
        fresh = c not in first_seen
        first_seen.setdefault(c, r)
        # round 1 aligns (l divides 0); afterwards only a client that never had an estimator
        assert row["aligned"] == (r == 1 or fresh), (r, c, row["aligned"])
        assert (row["bytes_by_kind"].get("down/aux_weights", 0) > 0) == row["aligned"]


def test_buffer_keeps_only_the_last_m_samples(run_dir):
    coord, ex = _sage(run_dir, "stop.rounds=1", "algorithm.buffer_size=50")
    server = ex.servers[0].program
    for i in range(4):  # 4 uploads of 20 samples, tagged by their label value
        server.upload(7, {"activations": torch.full((20, 3), float(i)), "labels": torch.full((20,), i)}, {})
    z, y = server.buffers[7]
    assert len(y) == 50
    assert y.tolist() == [1] * 10 + [2] * 20 + [3] * 20
    assert torch.equal(z[:, 0], y.float())


def test_refresh_and_telemetry_leave_the_server_unchanged_and_uncounted(run_dir):
    """With BatchNorm in the server block: the refresh and the cosine/MSE telemetry run in train
    mode yet leave every weight and running statistic bit-identical; telemetry FLOPs are not
    counted as server work."""
    coord, ex = _sage(run_dir, "stop.rounds=1", "model.name=resnet18", "model.cut=layer3", "data.max_train_samples=120",
                      "algorithm.align_epochs=3", "algorithm.aux.kind=linear")
    coord.run()
    block = ex.servers[0]
    server = block.program
    assert any("running_mean" in k for k in server.model.state_dict())
    before = {k: v.clone() for k, v in server.model.state_dict().items()}
    head = server.aux[0][0]
    aux_before = {k: v.clone() for k, v in head.state_dict().items()}
    z, y = server.buffers[0]
    g = server.true_gradients(0)
    server._quality(head, z, y, g)
    assert all(torch.equal(before[k], v) for k, v in server.model.state_dict().items())
    assert all(torch.equal(aux_before[k], v) for k, v in head.state_dict().items())

    block.pop_flops()
    block.control("align", 0, 2)
    with_telemetry = block.pop_flops()
    server._quality = lambda *a: (0.0, 0.0)
    block.control("align", 0, 2)
    assert block.pop_flops() == with_telemetry  # the telemetry's forward/backward were not counted
    assert all(torch.equal(before[k], v) for k, v in server.model.state_dict().items())


@pytest.mark.slow
def test_accuracy_does_not_fall_after_an_alignment_on_the_quickstart_job(tmp_path):
    """The issue's job (quickstart with fsl_sage) up to one round past the second alignment:
    with the default (linear) estimator, aligned from round 1, the realignment of round 11 does
    not undo the training (the conv estimator used to collapse there)."""
    from sfl_ray.config import load_config

    cfg = load_config("jobs/quickstart.yaml", [
        "algorithm.name=fsl_sage", "cluster.backend=local", "stop.target_metric=null", "stop.rounds=12",
        f"output.dir={tmp_path}", "output.progress=false"])
    assert cfg.algorithm.aux.kind == "linear" and cfg.algorithm.align_every == 10
    coord, _ = local_coordinator(cfg)
    coord.run()
    rows = coord.writer.rows
    acc = {r["round"]: r["eval_accuracy"] for r in rows}
    assert rows[10]["aligned_clients"] == 10 and rows[10]["align_cosine"] > 0.9
    assert acc[11] >= acc[10] and acc[12] >= acc[10], acc
    assert max(acc.values()) >= 0.8, acc
