"""ResNet-18/34/50/101/152 with the Keras 3 functional API, built from one stage table.

The network computes exactly what torchvision's `resnet{18,34,50,101,152}` compute for the same
weights: every strided layer pads symmetrically by hand (PyTorch's `padding=k//2`) instead of
Keras's `"same"`, which pads more on the bottom/right for stride 2 and shifts every feature map.
BatchNorm uses PyTorch's epsilon 1e-5 and momentum 0.1 (Keras momentum 0.9).

Only Keras APIs are used here, so the model stays backend-portable. BatchNorm layers are
`FusedBatchNormalization` (keras_resnet/fused_batch_norm.py): Keras's BatchNormalization with the
same variables and maths, computed by TensorFlow's fused kernel on the TensorFlow backend only.
"""

from functools import partial

import keras
from keras import layers

from keras_resnet.constants import DEPTHS, VARIANTS
from keras_resnet.model.layers import L1L2, FusedBatchNormalization

# ImageNet RGB statistics on the [0, 1] scale (torchvision's `Normalize`); the optional first
# layer applies them to uint8 / [0, 255] inputs so the input pipeline can ship uint8 pixels.
MEAN_RGB = (0.485, 0.456, 0.406)
STDDEV_RGB = (0.229, 0.224, 0.225)

BOTTLENECK_EXPANSION = 4
STEM_FILTERS = 64


def _conv(filters, kernel_size, stride, name, *, use_bias, regularizer, padding="valid"):
    return layers.Conv2D(
        filters,
        kernel_size,
        strides=stride,
        padding=padding,  # see `conv_bn`
        use_bias=use_bias,
        kernel_initializer=keras.initializers.VarianceScaling(2.0, "fan_out", "untruncated_normal"),
        kernel_regularizer=regularizer,
        name=name,
    )


# PyTorch BatchNorm2d defaults: eps=1e-5, momentum=0.1 (== Keras momentum 0.9).
_bn = partial(FusedBatchNormalization, axis=-1, momentum=0.9, epsilon=1e-5)


def conv_bn(x, filters, kernel_size, stride, name, opts, *, relu=True, zero_gamma=False):
    """Conv (PyTorch padding `kernel_size // 2`) -> BatchNorm [-> ReLU]. Layer names: name_conv.."""
    pad = kernel_size // 2
    # Stride 1: "same" pads k//2 on every side, as PyTorch does, inside the convolution (no pad op
    # forward, no slice backward). Strided: Keras's "same" would pad only bottom/right, so pad here.
    padding = "same" if stride == 1 else "valid"
    if pad and stride != 1:
        x = layers.ZeroPadding2D(pad, name=f"{name}_pad")(x)
    x = _conv(filters, kernel_size, stride, name, use_bias=opts["conv_bias"],
              regularizer=opts["regularizer"], padding=padding)(x)
    bn_name = name.replace("conv", "bn")
    x = _bn(name=bn_name, gamma_initializer="zeros" if zero_gamma else "ones")(x)
    if relu:
        x = layers.ReLU(name=bn_name.replace("bn", "relu"))(x)
    return x


def basic_block(x, filters, stride, name, opts):
    """Two 3x3 convs (ResNet-18/34). Output channels: `filters`."""
    shortcut = _shortcut(x, filters, stride, name, opts)
    y = conv_bn(x, filters, 3, stride, f"{name}_conv1", opts)
    y = conv_bn(y, filters, 3, 1, f"{name}_conv2", opts, relu=False,
                zero_gamma=opts["zero_init_residual"])
    return _merge(shortcut, y, name)


def bottleneck_block(x, filters, stride, name, opts):
    """1x1 reduce, 3x3, 1x1 expand (ResNet-50/101/152). Output channels: 4 * `filters`.

    v1.5 strides the 3x3 conv (torchvision, NVIDIA); v1 strides the first 1x1 (the paper and
    keras.applications), which skips 3/4 of the input pixels and costs about 0.5% top-1.
    """
    stride1, stride3 = (1, stride) if opts["variant"] == "v1.5" else (stride, 1)
    shortcut = _shortcut(x, filters * BOTTLENECK_EXPANSION, stride, name, opts)
    y = conv_bn(x, filters, 1, stride1, f"{name}_conv1", opts)
    y = conv_bn(y, filters, 3, stride3, f"{name}_conv2", opts)
    y = conv_bn(y, filters * BOTTLENECK_EXPANSION, 1, 1, f"{name}_conv3", opts, relu=False,
                zero_gamma=opts["zero_init_residual"])
    return _merge(shortcut, y, name)


def _shortcut(x, out_channels, stride, name, opts):
    """Identity, or a strided 1x1 projection + BN where the shape changes (torchvision option B)."""
    if stride == 1 and x.shape[-1] == out_channels:
        return x
    return conv_bn(x, out_channels, 1, stride, f"{name}_downsample_conv", opts, relu=False)


def _merge(shortcut, y, name):
    y = layers.Add(name=f"{name}_add")([shortcut, y])
    return layers.ReLU(name=f"{name}_out")(y)


# depth -> (block function, blocks per stage). Widths (64 * 2**i) and strides (2 at the first
# block of stages 2-4) are derived, as in the paper's Table 1.
STAGES = {
    18: (basic_block, (2, 2, 2, 2)),
    34: (basic_block, (3, 4, 6, 3)),
    50: (bottleneck_block, (3, 4, 6, 3)),
    101: (bottleneck_block, (3, 4, 23, 3)),
    152: (bottleneck_block, (3, 8, 36, 3)),
}
assert tuple(STAGES) == DEPTHS, "keep constants.DEPTHS in step with the stage table"


def check_depth(depth):
    """Raises ValueError (one line, lists the valid depths) unless `depth` is in `STAGES`."""
    if depth not in STAGES:
        raise ValueError(
            f"Unsupported ResNet depth. Received: depth={depth!r}; valid depths: "
            f"{', '.join(map(str, DEPTHS))}."
        )


def _regularizer(l1, l2):
    if l1 < 0 or l2 < 0:
        raise ValueError(f"Regularizer strengths must be >= 0. Received: l1={l1}, l2={l2}.")
    if l1 == 0 and l2 == 0:
        return None
    return L1L2(l1=l1, l2=l2)


def build_resnet(
    depth,
    num_classes=1000,
    input_shape=(224, 224, 3),
    *,
    include_top=True,
    classifier_activation="softmax",
    dropout=0.0,
    l2=0.0,
    l1=0.0,
    zero_init_residual=False,
    variant="v1.5",
    conv_bias=False,
    include_preprocessing=False,
    name=None,
):
    """Builds a ResNet as a `keras.Model`.

    Args:
      depth: 18, 34, 50, 101 or 152.
      num_classes: classifier width (ignored when `include_top=False`).
      input_shape: (height, width, 3), channels last; height/width may be None.
      include_top: add global average pooling, dropout and the Dense classifier.
      classifier_activation: "softmax" (probabilities) or None (logits). Always float32.
      dropout: dropout rate before the classifier (0 disables it).
      l2, l1: kernel regularizer strengths on conv and Dense kernels only (never on BatchNorm or
        biases). Keras adds `l2 * sum(w**2)` to the loss, so SGD weight decay `wd` is `l2 = wd/2`.
      zero_init_residual: start the last BatchNorm gamma of each block at zero, so each residual
        block begins as the identity (Goyal et al. 2017).
      variant: "v1.5" (stride on the 3x3 conv of bottleneck blocks) or "v1" (on the first 1x1).
      conv_bias: give every convolution a bias (as PyTorch's `nn.Conv2d` default, used by
        the PyTorch ResNet-152 tutorial's model).
      include_preprocessing: take RGB in [0, 255] (uint8 or float) and normalise it with the
        ImageNet mean/std in the first layer (`normalize`), on the accelerator.
      name: model name; defaults to "resnet{depth}".
    """
    check_depth(depth)
    if variant not in VARIANTS:
        raise ValueError(f"Unknown ResNet variant. Received: variant={variant!r}; valid: {VARIANTS}.")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1). Received: dropout={dropout}.")
    block_fn, blocks_per_stage = STAGES[depth]
    opts = {
        "conv_bias": conv_bias,
        "regularizer": _regularizer(l1, l2),
        "variant": variant,
        "zero_init_residual": zero_init_residual,
    }

    inputs = keras.Input(shape=input_shape, name="images",
                         dtype="uint8" if include_preprocessing else None)
    x = inputs
    if include_preprocessing:
        x = layers.Normalization(
            mean=[255.0 * m for m in MEAN_RGB],
            variance=[(255.0 * s) ** 2 for s in STDDEV_RGB],
            dtype="float32",
            name="normalize",
        )(x)

    x = conv_bn(x, STEM_FILTERS, 7, 2, "conv1", opts)
    # Zero padding is equivalent to PyTorch's -inf padding here because inputs are post-ReLU (>= 0).
    x = layers.ZeroPadding2D(1, name="pool1_pad")(x)
    x = layers.MaxPooling2D(3, strides=2, name="pool1")(x)

    for stage, num_blocks in enumerate(blocks_per_stage):
        filters = STEM_FILTERS * 2**stage
        for block in range(num_blocks):
            stride = 2 if stage > 0 and block == 0 else 1
            x = block_fn(x, filters, stride, f"stage{stage + 1}_block{block + 1}", opts)

    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        if dropout:
            x = layers.Dropout(dropout, name="dropout")(x)
        # float32 under mixed precision: logits, softmax and the loss need the range.
        x = layers.Dense(num_classes, kernel_regularizer=opts["regularizer"], dtype="float32",
                         kernel_initializer=keras.initializers.RandomNormal(stddev=0.01),
                         name="predictions")(x)
        x = layers.Activation(classifier_activation or "linear", dtype="float32",
                              name="probabilities" if classifier_activation else "logits")(x)
    return keras.Model(inputs, x, name=name or f"resnet{depth}")


def _shortcut_builder(depth):
    def builder(**kwargs):
        return build_resnet(depth, **kwargs)

    builder.__name__ = builder.__qualname__ = f"ResNet{depth}"
    builder.__doc__ = f"ResNet-{depth}: `build_resnet({depth}, **kwargs)`."
    return builder


ResNet18, ResNet34, ResNet50, ResNet101, ResNet152 = (_shortcut_builder(d) for d in DEPTHS)
