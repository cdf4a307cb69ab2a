"""keras_resnet: ResNet-18/34/50/101/152 for ImageNet with TensorFlow and Keras 3."""

from keras_resnet.model import (
    DEPTHS,
    STAGES,
    ResNet18,
    ResNet34,
    ResNet50,
    ResNet101,
    ResNet152,
    build_resnet,
)

__all__ = ["DEPTHS", "STAGES", "build_resnet", "ResNet18", "ResNet34", "ResNet50", "ResNet101",
           "ResNet152"]
__version__ = "0.1.0"
