"""FSL-SAGE: alignment makes the aux's cut gradient track the server's; aux down only on
alignment rounds; the buffer keeps only the last M samples; only device blocks are averaged."""

import torch

from tests.helpers import local_coordinator, small_config


def _sage(run_dir, *extra):
    cfg = small_config(run_dir, "algorithm.name=fsl_sage", "train.num_clients=3", "train.clients_per_round=3",
                       "algorithm.align_epochs=30", "algorithm.buffer_size=120", "algorithm.align_batch_size=60",
                       "train.batch_size=20", "algorithm.upload_every=2", *extra)
    return local_coordinator(cfg)


def test_alignment_brings_the_aux_gradient_closer_to_the_server_gradient(run_dir):
    coord, ex = _sage(run_dir, "stop.rounds=1")
    coord.run()  # round 1 fills the buffers (and trains the server on them)
    server = ex.servers[0].program
    before = {c: server.alignment_quality(c) for c in range(3)}
    server.align([0, 1, 2], rnd=2)
    after = {c: server.alignment_quality(c) for c in range(3)}
    for c in range(3):
        assert after[c]["cosine"] > before[c]["cosine"] + 0.05, (before[c], after[c])
        assert after[c]["mse"] < before[c]["mse"]


def test_aux_goes_down_only_on_alignment_rounds(run_dir):
    coord, _ = _sage(run_dir, "stop.rounds=5", "algorithm.align_every=2", "algorithm.align_epochs=2")
    coord.run()
    rows = coord.writer.rows
    aux_down = [r["bytes_by_kind"].get("down/aux_weights", 0) for r in rows]
    assert [a > 0 for a in aux_down] == [True, False, True, False, True]
    assert [r["aligned"] for r in rows] == [True, False, True, False, True]
    assert all("up/aux_weights" not in r["bytes_by_kind"] for r in rows)  # the aux is never averaged
    assert all("down/gradients" not in r["bytes_by_kind"] for r in rows)


def test_buffer_keeps_only_the_last_m_samples(run_dir):
    coord, ex = _sage(run_dir, "stop.rounds=1", "algorithm.buffer_size=50")
    server = ex.servers[0].program
    for i in range(4):  # 4 uploads of 20 samples, tagged by their label value
        server.after_step(7, torch.full((20, 3), float(i)), torch.full((20,), i))
    z, y = server.buffers[7]
    assert len(y) == 50
    assert y.tolist() == [1] * 10 + [2] * 20 + [3] * 20
    assert torch.equal(z[:, 0], y.float())
