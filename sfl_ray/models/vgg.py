"""VGG-11 (with batch norm) for 32x32 inputs, as named top-level layers."""

from collections import OrderedDict

import torch.nn as nn

_CFG = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]


def vgg11(in_shape: tuple[int, ...], num_classes: int) -> nn.Sequential:
    layers: list[tuple[str, nn.Module]] = []
    cin, conv, pool, side = in_shape[0], 0, 0, in_shape[1]
    for v in _CFG:
        if v == "M":
            pool += 1
            side //= 2
            layers.append((f"pool{pool}", nn.MaxPool2d(2)))
        else:
            conv += 1
            layers += [(f"conv{conv}", nn.Conv2d(cin, v, 3, padding=1)),
                       (f"bn{conv}", nn.BatchNorm2d(v)), (f"relu{conv}", nn.ReLU())]
            cin = v
    layers += [("flatten", nn.Flatten()), ("fc1", nn.Linear(512 * max(side, 1) ** 2, 512)), ("relu_fc1", nn.ReLU()),
               ("fc2", nn.Linear(512, 512)), ("relu_fc2", nn.ReLU()), ("fc3", nn.Linear(512, num_classes))]
    return nn.Sequential(OrderedDict(layers))


DEFAULT_CUT = "pool2"
