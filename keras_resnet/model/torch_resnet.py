"""torchvision's ResNet in plain PyTorch (no torchvision needed), for the benchmark's torch rows.

Same architecture as torchvision `models/resnet.py` (v1.5: stride on the 3x3 conv of a
bottleneck; 1x1 projection + BatchNorm where the shape changes), built from this project's stage
table so the two frameworks train the same network. Imports torch only when called.
"""

from keras_resnet.model.resnet import BOTTLENECK_EXPANSION, STAGES


def build_torch_resnet(depth, num_classes=1000):
    """torch.nn.Module: ResNet-`depth`, NCHW float input, logits out."""
    import torch
    from torch import nn

    def conv(c_in, c_out, k, stride=1):
        return nn.Conv2d(c_in, c_out, k, stride, k // 2, bias=False)

    class Block(nn.Module):
        def __init__(self, c_in, filters, stride, bottleneck):
            super().__init__()
            c_out = filters * (BOTTLENECK_EXPANSION if bottleneck else 1)
            if bottleneck:
                shapes = [(c_in, filters, 1, 1), (filters, filters, 3, stride),
                          (filters, c_out, 1, 1)]
            else:
                shapes = [(c_in, filters, 3, stride), (filters, filters, 3, 1)]
            self.convs = nn.ModuleList(conv(*s) for s in shapes)
            self.bns = nn.ModuleList(nn.BatchNorm2d(s[1]) for s in shapes)
            self.down = None
            if stride != 1 or c_in != c_out:
                self.down = nn.Sequential(conv(c_in, c_out, 1, stride), nn.BatchNorm2d(c_out))

        def forward(self, x):
            y = x
            for i, (c, bn) in enumerate(zip(self.convs, self.bns, strict=True)):
                y = bn(c(y))
                if i < len(self.convs) - 1:
                    y = torch.relu(y)
            return torch.relu(y + (self.down(x) if self.down is not None else x))

    block_fn, counts = STAGES[depth]
    bottleneck = block_fn.__name__ == "bottleneck_block"
    layers = [conv(3, 64, 7, 2), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
    c_in = 64
    for stage, count in enumerate(counts):
        filters = 64 * 2**stage
        for j in range(count):
            layers.append(Block(c_in, filters, 2 if stage > 0 and j == 0 else 1, bottleneck))
            c_in = filters * (BOTTLENECK_EXPANSION if bottleneck else 1)
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes)]
    return nn.Sequential(*layers)
