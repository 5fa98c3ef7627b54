"""ResNet-18 flattened into named top-level layers, with either stem:
cifar (3x3 conv, no max-pool) or imagenet (torchvision's 7x7/2 conv and 3x3/2 max-pool, as the
SFL papers use on 32x32 CIFAR)."""

from collections import OrderedDict

import torch
import torch.nn as nn


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def _stage(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1))


STEMS = ("cifar", "imagenet")


def _stem(c: int, stem: str) -> list[tuple[str, nn.Module]]:
    if stem == "imagenet":  # 32x32 -> 8x8 before layer1
        return [("conv1", nn.Conv2d(c, 64, 7, 2, 3, bias=False)), ("bn1", nn.BatchNorm2d(64)),
                ("relu", nn.ReLU()), ("maxpool", nn.MaxPool2d(3, 2, 1))]
    return [("conv1", nn.Conv2d(c, 64, 3, 1, 1, bias=False)), ("bn1", nn.BatchNorm2d(64)), ("relu", nn.ReLU())]


def resnet18(in_shape: tuple[int, ...], num_classes: int, stem: str = "cifar") -> nn.Sequential:
    return nn.Sequential(OrderedDict(_stem(in_shape[0], stem) + [
        ("layer1", _stage(64, 64, 1)),
        ("layer2", _stage(64, 128, 2)),      # the default cut: (B, 128, H/2, W/2); imagenet stem (B, 128, H/8, W/8)
        ("layer3", _stage(128, 256, 2)),
        ("layer4", _stage(256, 512, 2)),
        ("pool", nn.AdaptiveAvgPool2d(1)),
        ("flatten", nn.Flatten()),
        ("fc", nn.Linear(512, num_classes)),
    ]))


DEFAULT_CUT = "layer2"
