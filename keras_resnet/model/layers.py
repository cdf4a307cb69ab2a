"""Keras layers and regularizers computed by TensorFlow's fused ops, with Keras's variables and
maths: BatchNormalization by FusedBatchNormV3, the L2 weight penalty by L2Loss.

Kept apart from resnet.py, which uses Keras APIs only: these are the backend-specific pieces, and
on any other backend (or for masks, synchronized BN, renorm, an L1 term) they run Keras's code.
"""

import keras
from keras import layers


@keras.saving.register_keras_serializable(package="keras_resnet")
class FusedBatchNormalization(layers.BatchNormalization):
    """BatchNormalization computed by one fused kernel each way on the TensorFlow backend.

    Keras 3 computes batch norm from moments with about ten elementwise ops forward and more
    backward; TensorFlow's FusedBatchNormV3 (oneDNN on CPU, cuDNN on GPU) is one op each way, and
    the graph optimizer fuses it with the following ReLU. ResNet-50 training on a 2-core CPU
    spends a third less CPU time per step (see keras_resnet/benchmark.py). Same variables, names
    and moving-average rule (biased batch variance) as Keras, so checkpoints and results do not
    change; other backends, masks and synchronized BN run the Keras code.
    """

    def call(self, inputs, training=None, mask=None):
        if (keras.backend.backend() != "tensorflow" or mask is not None or len(inputs.shape) != 4
                or self.axis not in (3, -1) or self.synchronized or self.renorm
                or not (self.scale and self.center)):
            return super().call(inputs, training=training, mask=mask)
        import tensorflow as tf

        if training and self.trainable:
            outputs, mean, variance = tf.compat.v1.nn.fused_batch_norm(
                inputs, self.gamma.value, self.beta.value, epsilon=self.epsilon,
                data_format="NHWC", is_training=True)
            # The op returns the unbiased batch variance; Keras's moving average takes the biased.
            n = tf.cast(tf.size(inputs) // tf.shape(inputs)[-1], variance.dtype)
            variance = variance * (n - 1.0) / tf.maximum(n, 1.0)
            self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
            self.moving_variance.assign(
                self.moving_variance * self.momentum + variance * (1.0 - self.momentum))
            return outputs
        outputs, _, _ = tf.compat.v1.nn.fused_batch_norm(
            inputs, self.gamma.value, self.beta.value, mean=self.moving_mean.value,
            variance=self.moving_variance.value, epsilon=self.epsilon, data_format="NHWC",
            is_training=False)
        return outputs


@keras.saving.register_keras_serializable(package="keras_resnet")
class L1L2(keras.regularizers.L1L2):
    """Keras's `L1L2` (`l1 * sum(|w|) + l2 * sum(w**2)`), its L2 term by TensorFlow's L2Loss op.

    Keras writes the L2 term as square, sum and scale, whose gradient is a broadcast and two
    multiplies over the whole kernel; `2 * l2 * tf.nn.l2_loss(w)` is the same number from one op
    forward and one multiply backward (`grad * w`). Over ResNet-18's 11M kernel weights that is
    ~5% of a 64 px training step on a 2-core CPU. Other backends, and any L1 term, run Keras's code.
    """

    def __call__(self, x):
        if keras.backend.backend() != "tensorflow" or self.l1 != 0.0:
            return super().__call__(x)
        import tensorflow as tf

        return tf.cast(2.0 * self.l2, x.dtype) * tf.nn.l2_loss(x)


# Our classes and the Keras built-ins they stand in for (same config, variables and maths).
_BUILTINS = {"FusedBatchNormalization": ("keras.layers", "BatchNormalization"),
             "L1L2": ("keras.regularizers", "L1L2")}
_OURS = {builtin: (__name__, ours) for ours, (_, builtin) in _BUILTINS.items()}


def _replace_classes(config, table):
    """`config` (a Keras serialization) with every object whose class is a key of `table` named
    as its value (module, class name) instead."""
    if isinstance(config, list):
        return [_replace_classes(item, table) for item in config]
    if not isinstance(config, dict):
        return config
    config = {key: _replace_classes(value, table) for key, value in config.items()}
    target = table.get(config.get("class_name"))
    if target and "module" in config and "config" in config:
        module, name = target
        config.update(module=module, class_name=name,
                      registered_name=None if module.startswith("keras.") else f"keras_resnet>{name}")
    return config


def _rebuilt(model, table):
    """A copy of the functional `model` whose layers are those of `table`, same weights."""
    copy = keras.Model.from_config(_replace_classes(model.get_config(), table))
    copy.set_weights(model.get_weights())
    return copy


def portable(model):
    """`model` with Keras's own BatchNormalization and L1L2 in place of this module's (the same
    numbers): the .keras files the project writes load with plain `keras.saving.load_model`, on
    any backend, without this package installed."""
    return _rebuilt(model, _BUILTINS)


def fused(model):
    """`model` (as loaded from a portable .keras file) with this module's fused layers again, so
    training and the exported graphs run FusedBatchNormV3 as a freshly built model does."""
    if not any(isinstance(layer, layers.BatchNormalization)
               and not isinstance(layer, FusedBatchNormalization) for layer in model.layers):
        return model
    return _rebuilt(model, _OURS)
