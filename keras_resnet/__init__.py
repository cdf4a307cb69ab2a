"""keras_resnet: ResNet-18/34/50/101/152 for ImageNet with TensorFlow and Keras 3.

The model API is imported lazily, so light commands (`python -m keras_resnet.download`) do not
start TensorFlow.
"""

__version__ = "0.1.0"
__all__ = ["DEPTHS", "STAGES", "build_resnet", "ResNet18", "ResNet34", "ResNet50", "ResNet101",
           "ResNet152"]


def __getattr__(name):
    if name in __all__:
        from keras_resnet.model import resnet as model

        return getattr(model, name)
    raise AttributeError(f"module 'keras_resnet' has no attribute {name!r}")
