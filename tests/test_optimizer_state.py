"""Optimizer state (Adam moments) is client state: it persists across rounds by default, for
device blocks, aux heads, SplitFed v1's server replicas and the SL relay, so two rounds equal
two local epochs of one continuous run; `train.optimizer_state=reset` starts afresh each round."""

import numpy as np
import pytest
import torch

from tests.helpers import local_coordinator, small_config

# One client, one batch per epoch: a round boundary is then the only difference between
# "2 rounds x 1 epoch" and "1 round x 2 epochs" (the data order inside a batch does not matter).
ONE = ["train.num_clients=1", "data.max_train_samples=64", "train.batch_size=64", "train.optimizer=adam",
       "train.lr=0.01", "partition.name=iid"]


def _final(run_dir, algo, rounds, epochs, state="persist"):
    cfg = small_config(f"{run_dir}/{algo}-{rounds}-{epochs}-{state}", f"algorithm.name={algo}", *ONE,
                       f"stop.rounds={rounds}", f"train.local_epochs={epochs}", f"train.optimizer_state={state}")
    coord, ex = local_coordinator(cfg)
    coord.run()
    a = coord.algorithm
    out = {}
    for name in ("global_device", "global_aux", "global_server", "global_model"):
        for k, v in (getattr(a, name, None) or {}).items():
            out[f"{name}.{k}"] = torch.from_numpy(np.array(v))
    if ex.servers and hasattr(ex.servers[0].program, "model"):
        for k, v in ex.servers[0].program.model.state_dict().items():
            out[f"server.{k}"] = v.clone()
    return out


@pytest.mark.parametrize("algo", ["splitfed_v2", "splitfed_v1", "sl", "cse_fsl", "fedavg"])
def test_two_rounds_with_adam_equal_two_epochs_of_one_run(run_dir, algo):
    continuous = _final(run_dir, algo, rounds=1, epochs=2)
    persisted = _final(run_dir, algo, rounds=2, epochs=1)
    reset = _final(run_dir, algo, rounds=2, epochs=1, state="reset")
    assert continuous.keys() == persisted.keys()
    for k in continuous:
        torch.testing.assert_close(persisted[k], continuous[k], rtol=1e-4, atol=1e-5, msg=k)  # summation order only
    # Restarting Adam's moments at round 2 changes the trajectory, far beyond float noise.
    gap = max(float((reset[k] - continuous[k]).abs().max()) for k in continuous if k.startswith("global_"))
    assert gap > 1e-3, gap


def test_splitfed_v1_replica_keeps_its_own_moments(run_dir):
    cfg = small_config(run_dir, "algorithm.name=splitfed_v1", *ONE, "stop.rounds=2")
    coord, ex = local_coordinator(cfg)
    coord.run()
    server = ex.servers[0].program
    (model, opt), = server.replicas.values()
    state = next(iter(opt.state.values()))
    assert int(state["step"]) == 2  # one step per round, carried over from round 1
    assert float(state["exp_avg_sq"].abs().sum()) > 0


def test_restored_adam_state_counts_as_device_memory(run_dir):
    """Round 2 restores Adam's moments instead of creating them: they must still be measured.
    With one batch per round, round 1 creates them only after the backward (its activation
    peak has none); round 2 holds the restored ones throughout."""
    cfg = small_config(run_dir, "algorithm.name=splitfed_v2", *ONE, "stop.rounds=2")
    coord, ex = local_coordinator(cfg)
    coord.run()
    r1, r2 = (r["device_peak_mem_bytes"] for r in coord.writer.rows)
    device_bytes = sum(p.numel() * 4 for p in ex.pool.parts.device.parameters())
    assert r2 - r1 >= 2 * device_bytes  # exp_avg and exp_avg_sq of every device parameter


def test_weights_written_before_they_are_declared_count_once():
    """load_weights copies into the parameters before the program declares the module: those
    storages are weights (counted once), not live training tensors as well."""
    import torch.nn as nn

    from sfl_ray.metrics.device_cost import MemoryTracker, measure_device
    from sfl_ray.runtime.wire import load_weights, module_weights

    m = nn.Linear(100, 100)
    weights = module_weights(m)
    tracker = MemoryTracker()
    with measure_device(tracker, torch.device("cpu")):
        load_weights(m, weights)
        tracker.track_module(m)
        x = torch.ones(1000, 100)
        y = x * 2  # 400 kB of live tensors, more than the 40 kB of weights
        del x, y
    assert tracker.weights_bytes == 4 * (100 * 100 + 100)
    assert tracker.peak_bytes == tracker.weights_bytes + 2 * 400_000
