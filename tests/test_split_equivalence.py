"""SL with one client is centralised training of the unsplit model on the same batches."""

import torch
import torch.nn.functional as F

from sfl_ray.data.batches import batch_indices
from sfl_ray.models.split import build_model, split_model
from tests.helpers import local_coordinator, small_config


def test_split_forward_and_cut_gradient_match_the_unsplit_model():
    model = build_model("cnn", (1, 28, 28), 10, seed=0)
    device, server = split_model(build_model("cnn", (1, 28, 28), 10, seed=0), "pool2")
    x, y = torch.randn(5, 1, 28, 28), torch.arange(5)
    torch.testing.assert_close(server(device(x)), model(x))
    z = device(x).detach().requires_grad_()
    F.cross_entropy(server(z), y).backward()
    x2 = x.clone().requires_grad_()
    F.cross_entropy(model(x2), y).backward()
    # the gradient at the input of the device block, via the cut, equals autograd through the whole model
    xd = x.clone().requires_grad_()
    device(xd).backward(z.grad)
    torch.testing.assert_close(xd.grad, x2.grad)


def test_sl_one_client_equals_centralised_training(run_dir):
    rounds = 3
    cfg = small_config(run_dir, "algorithm.name=sl", "train.num_clients=1", f"stop.rounds={rounds}",
                       "data.max_train_samples=300", "train.batch_size=32", "train.lr=0.1")
    coord, ex = local_coordinator(cfg)
    coord.run()
    indices = ex.pool.shards[0]
    x_all, y_all = ex.pool.data

    model = build_model("cnn", (1, 28, 28), 10, seed=cfg.seed)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.train.lr)
    steps = 0
    for rnd in range(1, rounds + 1):
        for b in batch_indices(indices, cfg.train.batch_size, cfg.seed, rnd, 0):
            loss = F.cross_entropy(model(torch.from_numpy(x_all[b])), torch.from_numpy(y_all[b]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
    assert steps == rounds * 10
    device_ref, server_ref = split_model(model, "pool2")
    for k, v in device_ref.state_dict().items():
        torch.testing.assert_close(torch.from_numpy(coord.algorithm.global_device[k]), v, rtol=1e-5, atol=1e-6)
    for k, v in server_ref.state_dict().items():
        torch.testing.assert_close(ex.servers[0].program.model.state_dict()[k], v, rtol=1e-5, atol=1e-6)
    # and training did move the weights
    fresh = build_model("cnn", (1, 28, 28), 10, seed=cfg.seed)
    assert not torch.allclose(fresh.fc2.weight, model.fc2.weight)
