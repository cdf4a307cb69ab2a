"""The network: one stage table for all depths (`resnet`), its BatchNorm layer (`layers`),
counts, MACs and memory (`stats`), and weights in PyTorch naming (`torch_names`)."""

from keras_resnet.model.resnet import (  # noqa: F401
    DEPTHS,
    STAGES,
    VARIANTS,
    ResNet18,
    ResNet34,
    ResNet50,
    ResNet101,
    ResNet152,
    build_resnet,
)
