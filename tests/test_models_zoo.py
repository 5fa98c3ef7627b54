"""The papers' models, reproduced exactly: ResNet-18 with the ImageNet stem, the FSL-SAGE
reference's simple_conv, and the server_layer aux head (sizes from the FSL-SAGE reference on 32x32
CIFAR-10, cut after layer2). No Ray."""

import math

import pytest
import torch
import torch.nn as nn

from sfl_ray.config import ModelConfig
from sfl_ray.config_base import ConfigError
from sfl_ray.models.aux import AuxConfig, build_aux
from sfl_ray.models.split import build_model, build_parts, split_model
from sfl_ray.runtime.wire import module_weights
from tests.helpers import local_coordinator, small_config

MIB = 1024 ** 2


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def wire_bytes(m: nn.Module) -> int:
    """What a block costs on the link: parameters and buffers (BatchNorm statistics and counters)."""
    return sum(a.nbytes for a in module_weights(m).values())


@pytest.fixture(scope="module")
def imagenet_parts():
    return build_parts("resnet18", None, (3, 32, 32), 10, 0, ModelConfig(name="resnet18", stem="imagenet"))


def test_resnet18_imagenet_stem_sizes_at_layer2(imagenet_parts):
    p = imagenet_parts
    assert p.cut == "layer2"
    assert [n for n, _ in p.device.named_children()] == ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2"]
    stem = p.device.conv1
    assert (stem.kernel_size, stem.stride, stem.padding, stem.bias) == ((7, 7), (2, 2), (3, 3), None)
    pool = p.device.maxpool
    assert (pool.kernel_size, pool.stride, pool.padding) == (3, 2, 1)
    assert p.act_shape == (128, 4, 4)
    assert math.prod(p.act_shape) * 4 == 8 * 1024                       # 8 KiB of fp32 per sample
    assert n_params(p.device) == 683_072
    assert wire_bytes(p.device) == 2_740_048                            # 2.61 MiB
    assert round(wire_bytes(p.device) / MIB, 2) == 2.61
    assert n_params(p.server) == 10_498_570                             # about 10.50 M
    assert wire_bytes(p.server) == 42_025_080                           # 40.08 MiB
    assert round(wire_bytes(p.server) / MIB, 2) == 40.08


def test_stems_split_like_the_unsplit_model_and_cifar_is_the_default():
    cifar = build_parts("resnet18", None, (3, 32, 32), 10, 0, None)
    assert cifar.act_shape == (128, 16, 16) and not hasattr(cifar.device, "maxpool")
    assert cifar.device.conv1.kernel_size == (3, 3)
    model = build_model("resnet18", (3, 32, 32), 10, 0, stem="imagenet").eval()
    device, server = split_model(build_model("resnet18", (3, 32, 32), 10, 0, stem="imagenet"), "layer2")
    device.eval(), server.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(server(device(x)), model(x))
    # every cut name still works
    for cut in ("maxpool", "layer1", "layer3", "layer4"):
        build_parts("resnet18", cut, (3, 32, 32), 10, 0, ModelConfig(name="resnet18", stem="imagenet"))


@pytest.mark.parametrize("name", ["cnn", "simple_conv", "vgg11", "gpt2", "vit"])
def test_stem_imagenet_is_refused_on_other_models(name):
    with pytest.raises(ConfigError) as err:
        build_parts(name, None, (3, 32, 32), 10, 0, ModelConfig(name=name, stem="imagenet"))
    assert err.value.key == "model.stem" and "resnet18" in str(err.value)


def test_server_layer_aux_is_the_papers_resnet_aux(imagenet_parts):
    p = imagenet_parts
    aux = build_aux(AuxConfig(kind="server_layer"), p.act_shape, 10, seed=0, server=p.server)
    assert n_params(aux) == 2_102_282
    assert wire_bytes(aux) == 8_419_408                                 # the spec's 8.029 MiB
    assert round(wire_bytes(aux) / MIB, 3) == 8.029
    # layer3 (2 BasicBlocks 128->256) + global pool + Linear(256, 10)
    assert [type(m).__name__ for m in aux.layer] == ["BasicBlock", "BasicBlock"]
    assert aux.layer[0].conv1.in_channels == 128 and aux.fc.in_features == 256 and aux.fc.out_features == 10
    assert n_params(aux.layer) == n_params(p.server.layer3)
    assert aux(torch.randn(2, *p.act_shape)).shape == (2, 10)


def test_server_layer_aux_is_fresh_from_the_aux_seed(imagenet_parts):
    p = imagenet_parts
    aux = build_aux(AuxConfig(kind="server_layer"), p.act_shape, 10, seed=0, server=p.server)
    server_w = p.server.layer3.state_dict()
    aux_w = aux.layer.state_dict()
    assert not torch.equal(aux_w["0.conv1.weight"], server_w["0.conv1.weight"])   # not copied
    # The server's weights (trained or not) do not matter: only the seed does.
    trained = build_parts("resnet18", None, (3, 32, 32), 10, 0, ModelConfig(name="resnet18", stem="imagenet"))
    with torch.no_grad():
        for t in trained.server.layer3.parameters():
            t.add_(1.0)
        trained.server.layer3[0].bn1.running_mean.fill_(3.0)
    again = build_aux(AuxConfig(kind="server_layer"), p.act_shape, 10, seed=0, server=trained.server)
    for k, v in aux.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    assert torch.equal(again.layer[0].bn1.running_mean, torch.zeros(256))
    other = build_aux(AuxConfig(kind="server_layer"), p.act_shape, 10, seed=1, server=p.server)
    assert not torch.equal(other.layer[0].conv1.weight, aux.layer[0].conv1.weight)


def test_server_layer_errors_name_the_aux_kind():
    with pytest.raises(ConfigError) as err:
        build_aux(AuxConfig(kind="server_layer"), (128, 4, 4), 10, seed=0)
    assert err.value.key == "algorithm.aux.kind"
    flat = build_parts("simple_conv", None, (3, 32, 32), 10, 0, None)   # first server layer is a Linear
    with pytest.raises(ConfigError) as err:
        build_aux(AuxConfig(kind="server_layer"), flat.act_shape, 10, seed=0, server=flat.server)
    assert err.value.key == "algorithm.aux.kind" and "fc1" in str(err.value)
    p = build_parts("cnn", "pool1", (1, 28, 28), 10, 0, None)
    with pytest.raises(ConfigError):
        build_aux(AuxConfig(kind="server_layer", max_params=100), p.act_shape, 10, seed=0, server=p.server)


def test_simple_conv_is_the_fsl_sage_reference_model():
    p = build_parts("simple_conv", None, (3, 32, 32), 10, 0, ModelConfig(name="simple_conv"))
    assert p.cut == "flatten" and p.act_shape == (4096,) and 64 * 8 * 8 == 4096
    conv = lambda cin, cout, k: cin * cout * k * k + cout  # noqa: E731
    fc = lambda n_in, n_out: n_in * n_out + n_out           # noqa: E731
    assert n_params(p.device) == conv(3, 64, 5) + conv(64, 64, 5) == 107_328
    assert n_params(p.server) == fc(4096, 384) + fc(384, 192) + fc(192, 10) == 1_649_098
    kinds = [type(m).__name__ for m in p.device]
    assert kinds == ["Conv2d", "ReLU", "MaxPool2d", "LocalResponseNorm", "Conv2d", "ReLU",
                     "LocalResponseNorm", "MaxPool2d", "Flatten"]
    lrn = p.device.norm1
    assert (lrn.size, lrn.alpha, lrn.beta, lrn.k) == (4, 0.001 / 9, 0.75, 1.0)
    linears = [m for m in p.server if isinstance(m, nn.Linear)]
    weights = torch.cat([torch.cat([m.weight.detach().flatten(), m.bias.detach()]) for m in linears])
    assert abs(float(weights.std()) - 0.05) < 1e-3 and abs(float(weights.mean())) < 1e-3
    assert p.server(p.device(torch.randn(2, 3, 32, 32))).shape == (2, 10)
    # the same seed gives the same model (built inside seeded_torch)
    again = build_parts("simple_conv", None, (3, 32, 32), 10, 0, None)
    assert torch.equal(again.server.fc1.weight, p.server.fc1.weight)
    aux = build_aux(AuxConfig(kind="linear"), p.act_shape, 10, seed=0)
    assert [type(m).__name__ for m in aux] == ["Flatten", "Linear"] and aux[1].in_features == 4096


@pytest.mark.parametrize("algorithm", ["cse_fsl", "fsl_sage"])
def test_server_layer_aux_trains_under_cse_fsl_and_fsl_sage(run_dir, algorithm):
    """The algorithms hand their server block to build_aux: the cnn cut after pool1 gets a fresh conv2."""
    extra = ["algorithm.align_epochs=2"] if algorithm == "fsl_sage" else []
    cfg = small_config(run_dir, f"algorithm.name={algorithm}", "model.cut=pool1", "algorithm.aux.kind=server_layer",
                       "data.max_train_samples=200", "stop.rounds=1", *extra)
    coord, _ = local_coordinator(cfg)
    summary = coord.run()
    assert math.isfinite(summary["final"]["train_loss"])
