"""A small CNN for 28x28 / 32x32 images: trains to >97% on MNIST in a minute on a CPU."""

from collections import OrderedDict

import torch.nn as nn


def cnn(in_shape: tuple[int, ...], num_classes: int) -> nn.Sequential:
    """conv-pool-conv-pool-fc-fc, each a named top-level layer (the cut candidates)."""
    c, h, w = in_shape
    flat = 32 * (h // 4) * (w // 4)
    return nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(c, 16, 3, padding=1)),
        ("relu1", nn.ReLU()),
        ("pool1", nn.MaxPool2d(2)),           # (B, 16, H/2, W/2)
        ("conv2", nn.Conv2d(16, 32, 3, padding=1)),
        ("relu2", nn.ReLU()),
        ("pool2", nn.MaxPool2d(2)),           # (B, 32, H/4, W/4): the default cut
        ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(flat, 128)),
        ("relu3", nn.ReLU()),
        ("fc2", nn.Linear(128, num_classes)),
    ]))


DEFAULT_CUT = "pool2"
