"""The FSL-SAGE reference code's default model (`simple_conv`): two 5x5 convs with max-pool and
local response norm on the device, three fully connected layers on the server."""

from collections import OrderedDict

import torch.nn as nn

LINEAR_INIT_STD = 0.05  # the reference draws every Linear weight and bias from N(0, 0.05^2)


def _lrn() -> nn.LocalResponseNorm:
    return nn.LocalResponseNorm(size=4, alpha=0.001 / 9.0, beta=0.75, k=1.0)


def _pooled(side: int) -> int:
    """Side after MaxPool2d(3, stride 2, padding 1)."""
    return (side - 1) // 2 + 1


def simple_conv(in_shape: tuple[int, ...], num_classes: int) -> nn.Sequential:
    """conv-relu-pool-norm, conv-relu-norm-pool, flatten | fc-relu-fc-relu-fc (4096 at the cut on 32x32).

    Initialised from torch's global RNG, which build_model seeds."""
    c, h, w = in_shape
    flat = 64 * _pooled(_pooled(h)) * _pooled(_pooled(w))
    model = nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(c, 64, 5, padding=2)),
        ("relu1", nn.ReLU()),
        ("pool1", nn.MaxPool2d(3, 2, 1)),
        ("norm1", _lrn()),
        ("conv2", nn.Conv2d(64, 64, 5, padding=2)),
        ("relu2", nn.ReLU()),
        ("norm2", _lrn()),
        ("pool2", nn.MaxPool2d(3, 2, 1)),
        ("flatten", nn.Flatten()),            # (B, 64 * H/4 * W/4): the default cut
        ("fc1", nn.Linear(flat, 384)),
        ("relu3", nn.ReLU()),
        ("fc2", nn.Linear(384, 192)),
        ("relu4", nn.ReLU()),
        ("fc3", nn.Linear(192, num_classes)),
    ]))
    for m in model:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, LINEAR_INIT_STD)
            nn.init.normal_(m.bias, 0.0, LINEAR_INIT_STD)
    return model


DEFAULT_CUT = "flatten"
