"""CSE-FSL: no gradient ever comes down; one upload per h batches; device and aux FedAvg'd."""

import math

import numpy as np
import pytest

from tests.helpers import local_coordinator, small_config


@pytest.mark.parametrize("h, phase", [(3, "first"), (4, "last"), (1, "first")])
def test_no_gradients_down_and_ceil_k_over_h_uploads(run_dir, h, phase):
    cfg = small_config(run_dir, "algorithm.name=cse_fsl", f"algorithm.upload_every={h}",
                       f"algorithm.upload_phase={phase}", "train.num_clients=3", "stop.rounds=1",
                       "data.max_train_samples=310", "train.batch_size=32")
    coord, ex = local_coordinator(cfg)
    coord.algorithm.init_global(coord.evaluator.parts)
    calls = []
    program = ex.servers[0].program
    real = program.upload
    program.upload = lambda c, a, i: (calls.append((c, len(a["labels"]))), real(c, a, i))[1]
    row = coord.run_one_round(1)
    assert "down/gradients" not in row["bytes_by_kind"]
    assert not any(k.startswith("down/") and k not in ("down/weights", "down/aux_weights") for k in row["bytes_by_kind"])
    act = 4 * math.prod(coord.evaluator.parts.act_shape)
    uploaded_samples = 0
    for c in range(3):
        k = math.ceil(len(ex.pool.shards[c]) / 32)
        assert sum(1 for cc, _ in calls if cc == c) == math.ceil(k / h)
        uploaded_samples += sum(n for cc, n in calls if cc == c)
    assert row["bytes_by_kind"]["up/activations"] == uploaded_samples * act
    assert row["server_steps"] == len(calls)  # one optimizer step per upload
    assert row["server_samples"] == uploaded_samples


def test_device_and_aux_are_fedavgd(run_dir):
    cfg = small_config(run_dir, "algorithm.name=cse_fsl", "train.num_clients=3", "stop.rounds=1")
    coord, ex = local_coordinator(cfg)
    algo = coord.algorithm
    algo.init_global(coord.evaluator.parts)
    seen = {}
    real = ex.run_clients

    def spy(program, clients, rnd, down, parallel, on_done, per_client=None, measure=None):
        replies = real(program, clients, rnd, down, parallel, on_done, per_client, measure)
        seen["replies"] = replies
        return replies

    ex.run_clients = spy
    coord.run_one_round(1)
    reps = seen["replies"]
    n = np.array([r.info["num_samples"] for r in reps], float)
    for kind, glob in (("weights", algo.global_device), ("aux_weights", algo.global_aux)):
        for key, value in glob.items():
            expect = sum(w * r.up[kind][key].astype(np.float64) for w, r in zip(n / n.sum(), reps))
            np.testing.assert_allclose(value, expect, rtol=1e-5, atol=1e-7)
