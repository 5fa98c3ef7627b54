"""Ray Train server checkpoints: tensors only, so reading one back from shared storage cannot
run code; and the temporary storage a fit makes for itself is removed afterwards."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn as nn
from safetensors import SafetensorError

from sfl_ray.config import ClusterConfig
from sfl_ray.runtime.ray_train_fit import CHECKPOINT_FILE, load_server_state, save_server_state


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5, 3)
        self.head = nn.Linear(3, 5, bias=False)
        self.head.weight = self.emb.weight  # shared storage, as a tied LM head
        self.norm = nn.BatchNorm1d(3)  # buffers, including an int64 one


def test_round_trip_keeps_every_tensor_and_dtype(tmp_path):
    m = _Tied()
    m.norm.running_mean.add_(1.5)
    save_server_state(m, str(tmp_path))
    back = load_server_state(str(tmp_path))
    state = m.state_dict()
    assert set(back) == set(state)
    for k, v in state.items():
        assert isinstance(back[k], np.ndarray) and back[k].dtype == v.numpy().dtype
        np.testing.assert_array_equal(back[k], v.numpy())
    back["emb.weight"][0, 0] = 42.0  # a copy: the module is untouched
    assert m.emb.weight[0, 0].item() != 42.0


class _Payload:
    def __reduce__(self):
        return (os.mkdir, (str(_Payload.marker),))


def test_a_pickled_checkpoint_is_refused_without_running_it(tmp_path):
    """Someone with write access to the storage swaps in a pickle whose loading runs code."""
    _Payload.marker = tmp_path / "pwned"
    torch.save({"w": _Payload()}, str(tmp_path / CHECKPOINT_FILE))
    with pytest.raises(SafetensorError):
        load_server_state(str(tmp_path))
    assert not _Payload.marker.exists()
    os.rename(tmp_path / CHECKPOINT_FILE, tmp_path / "server.pt")
    torch.load(str(tmp_path / "server.pt"), weights_only=False)  # what the old loader did:
    assert _Payload.marker.exists()  # the payload runs, so the check above is not vacuous


def _executor(storage_path=None):
    from sfl_ray.runtime.ray_backend import RayExecutor

    return RayExecutor([], [], 1.0, blueprint=None, cluster=ClusterConfig(storage_path=storage_path))


@pytest.mark.parametrize("fails", [False, True])
def test_fit_server_removes_the_temp_storage_it_made(monkeypatch, fails):
    import sfl_ray.runtime.ray_train_fit as rtf

    seen = []

    def fake_fit(blueprint, request, cluster, storage):
        seen.append(storage)
        open(os.path.join(storage, "checkpoint"), "w").close()
        if fails:
            raise RuntimeError("fit failed")
        return [{"loss": 0.0}]

    monkeypatch.setattr(rtf, "fit_with_ray_train", fake_fit)
    if fails:
        with pytest.raises(RuntimeError):
            _executor().fit_server(None)
    else:
        assert _executor().fit_server(None) == [{"loss": 0.0}]
    assert len(seen) == 1 and not os.path.exists(seen[0])


def test_fit_server_leaves_a_user_storage_path_alone(monkeypatch, tmp_path):
    import sfl_ray.runtime.ray_train_fit as rtf

    user = tmp_path / "shared"
    user.mkdir()
    monkeypatch.setattr(rtf, "fit_with_ray_train",
                        lambda bp, req, cluster, storage: open(os.path.join(storage, "ckpt"), "w").close() or [])
    _executor(str(user)).fit_server(None)
    assert (user / "ckpt").exists()
