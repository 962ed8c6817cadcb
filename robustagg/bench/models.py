"""Real model definitions (plain torch.nn) that give the benchmark shapes (docs/backends.md, "Benchmark").

Only parameter shapes are used: the benchmark's d is the parameter count and the per-parameter
layout (``Layout.from_shapes(model)``) drives ``maxpool_amplify``. The constructors are written
from the papers' architecture descriptions; ``EXPECTED_D`` pins each count.
"""
from __future__ import annotations

import torch
from torch import nn

from ..layout import Layout


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, width, stride=1):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class ResNet(nn.Module):
    """He et al. 2016. ``cifar=True``: 3x3 stem, no max-pool (Kuang Liu's CIFAR variant used in FL papers)."""

    def __init__(self, block, layers, num_classes, cifar):
        super().__init__()
        if cifar:
            self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        else:
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        cin, stages = 64, []
        for i, (width, count) in enumerate(zip((64, 128, 256, 512), layers)):
            blocks = []
            for j in range(count):
                blocks.append(block(cin, width, stride=2 if (i > 0 and j == 0) else 1))
                cin = width * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(cin, num_classes)


def _conv_bn(cin, cout):
    # FetchSGD/SparseFed's ResNet-9 (after Page's DAWNBench net): bias-free convs, BatchNorm
    # without affine parameters, bias-free classifier.
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout, affine=False), nn.ReLU())


class ResNet9(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.prep = _conv_bn(3, 64)
        self.layer1 = _conv_bn(64, 128)
        self.res1 = nn.Sequential(_conv_bn(128, 128), _conv_bn(128, 128))
        self.layer2 = _conv_bn(128, 256)
        self.layer3 = _conv_bn(256, 512)
        self.res3 = nn.Sequential(_conv_bn(512, 512), _conv_bn(512, 512))
        self.fc = nn.Linear(512, num_classes, bias=False)


class MnistCNN(nn.Module):
    """The CNN of the RLR paper's MNIST experiments (two 3x3 convs, 9216-128-10 classifier)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3)
        self.conv2 = nn.Conv2d(32, 64, 3)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, 10)


class TwitterLSTM(nn.Module):
    """LEAF Sent140 sentiment LSTM: frozen 300-d GloVe embeddings (not trained, so not part of the
    update), a 2-layer LSTM with 200 hidden units and a 2-class linear head."""

    def __init__(self, embed=300, hidden=200, layers=2, num_classes=2):
        super().__init__()
        self.lstm = nn.LSTM(embed, hidden, layers, batch_first=True)
        self.fc = nn.Linear(hidden, num_classes)


class PhishingMLP(nn.Module):
    """One-hidden-layer MLP for the phishing tabular data (74 features, 512 hidden units, 2 classes).

    The preset pins only the parameter count (39,426); this is the plainest net that has it.
    """

    def __init__(self, features=74, hidden=(512,), num_classes=2):
        super().__init__()
        sizes = (features, *hidden, num_classes)
        self.layers = nn.Sequential(*[nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:])])


MODELS = {
    "resnet18-cifar": lambda: ResNet(BasicBlock, (2, 2, 2, 2), 10, cifar=True),
    "resnet18-imagenet": lambda: ResNet(BasicBlock, (2, 2, 2, 2), 1000, cifar=False),
    "resnet9-sparsefed": ResNet9,
    "resnet101": lambda: ResNet(Bottleneck, (3, 4, 23, 3), 1000, cifar=False),
    "lstm-twitter": TwitterLSTM,
    "cnn-mnist-rlr": MnistCNN,
    "mlp-phishing": PhishingMLP,
}

EXPECTED_D = {
    "resnet18-cifar": 11_173_962,
    "resnet18-imagenet": 11_689_512,
    "resnet9-sparsefed": 6_568_640,
    "resnet101": 44_549_160,
    "lstm-twitter": 723_602,
    "cnn-mnist-rlr": 1_199_882,
    "mlp-phishing": 39_426,
}


def model_layout(name: str) -> Layout:
    """The per-parameter layout of a preset model, built on the meta device (no memory)."""
    if name not in MODELS:
        raise ValueError(f"model={name!r} is not a preset; choose one of {sorted(MODELS)}")
    with torch.device("meta"):
        model = MODELS[name]()
    return Layout.from_shapes(model)
