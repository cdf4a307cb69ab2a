"""torchvision's ResNet as plain `torch.nn` modules (torchvision itself is not installed here).

Same module names, shapes and forward pass as `torchvision.models.resnet{18..152}`, so
`load_state_dict(strict=True)` here accepts exactly the state dicts torchvision accepts.
Imported only by tests that have torch.
"""

import torch
from torch import nn

from tests.torch_reference import BLOCKS


class Block(nn.Module):
    def __init__(self, kind, c_in, width, stride):
        super().__init__()
        out = width * (4 if kind == "bottleneck" else 1)
        self.kind = kind
        if kind == "basic":
            self.conv1 = nn.Conv2d(c_in, width, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(width)
        else:  # v1.5: stride on the 3x3
            self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(width)
            self.conv3 = nn.Conv2d(width, out, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU()
        self.downsample = None
        if stride != 1 or c_in != out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, out, 1, stride, bias=False),
                                            nn.BatchNorm2d(out))

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        if self.kind == "basic":
            y = self.bn2(self.conv2(y))
        else:
            y = self.relu(self.bn2(self.conv2(y)))
            y = self.bn3(self.conv3(y))
        return self.relu(y + (self.downsample(x) if self.downsample is not None else x))


class ResNet(nn.Module):
    def __init__(self, depth, num_classes=1000):
        super().__init__()
        kind, blocks = BLOCKS[depth]
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        c_in = 64
        for stage, count in enumerate(blocks):
            width = 64 * 2**stage
            layer = []
            for block in range(count):
                layer.append(Block(kind, c_in, width, 2 if stage and not block else 1))
                c_in = width * (4 if kind == "bottleneck" else 1)
            setattr(self, f"layer{stage + 1}", nn.Sequential(*layer))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for stage in range(1, 5):
            x = getattr(self, f"layer{stage}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))
