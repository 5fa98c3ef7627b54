"""State trees crossing a process boundary (round-start snapshots, restores): tensors travel as
numpy arrays (Ray sends those out of band; a pickled tensor costs a torch.save each) and come
back as the same tensors, in memory the receiver owns."""

import pickle

import numpy as np
import torch

from sfl_ray.runtime.checkpoint import from_tree, pack, to_tree, unpack


def _leaves(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _leaves(v)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            yield from _leaves(v)
    else:
        yield tree


def _state():
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    return {"model": model, "opt": opt, "aux_weights": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)},
            "buffers": (torch.randn(2, 4), torch.tensor([1, 0])), "half": torch.ones(2, dtype=torch.bfloat16),
            "round": 3}


def test_packed_trees_hold_arrays_and_unpack_to_the_same_tensors():
    tree = to_tree(_state())
    packed = pack(tree)
    leaves = list(_leaves(packed))
    # every tensor numpy can hold is an array; bfloat16, which it cannot, stays a (CPU) tensor
    assert [t.dtype for t in leaves if isinstance(t, torch.Tensor)] == [torch.bfloat16]
    assert sum(isinstance(a, np.ndarray) for a in leaves) >= 8
    back = unpack(pickle.loads(pickle.dumps(packed)))
    flat_a, flat_b = list(_leaves(tree)), list(_leaves(back))
    assert len(flat_a) == len(flat_b)
    for a, b in zip(flat_a, flat_b):
        if isinstance(a, torch.Tensor):
            assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
        else:
            assert a == b
    # restoring from the packed form gives what restoring from the tensor form gives
    m1, m2 = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    m1.load_state_dict(from_tree(tree["model"]["__module__"]))
    m2.load_state_dict(from_tree(packed["model"]["__module__"]))
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))
    assert np.array_equal(from_tree(packed["aux_weights"])["w"], np.arange(6, dtype=np.float32).reshape(2, 3))
    opt_state = from_tree(packed["opt"])
    assert isinstance(opt_state["state"][0]["exp_avg"], torch.Tensor)


def test_an_array_read_only_as_from_the_object_store_is_copied_out():
    a = np.arange(4, dtype=np.float32)
    a.setflags(write=False)
    t = unpack({"x": a})["x"]
    t += 1  # writable, and not the store's memory
    assert a.tolist() == [0, 1, 2, 3] and t.tolist() == [1, 2, 3, 4]
    writable = np.zeros(3, dtype=np.float32)
    assert unpack(writable).data_ptr() == writable.ctypes.data  # already owned: no copy
