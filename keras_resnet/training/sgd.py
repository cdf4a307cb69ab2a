"""Keras's SGD with momentum, updated by one fused kernel per variable on the TensorFlow backend.

Keras 3's `SGD.update_step` writes the momentum rule as separate ops (two multiplies, a subtract,
an assign and an add per variable, plus casts): for ResNet-18, ~60 variables, that is ~300 small
ops a step, a visible share of a step at 32-64 px on a CPU. TensorFlow's
`ResourceApplyKerasMomentum` is the kernel tf.keras's SGD used: the same rule in one op,

    m = momentum * m - lr * g;  var += m                      (Keras's SGD)
    var += momentum * m - lr * g  (after the same m update)   (nesterov=True)

with the same variables (so checkpoints do not change) and an XLA kernel (GPU, TPU). Other
backends, and SGD without momentum, run Keras's own code.
"""

import keras


@keras.saving.register_keras_serializable(package="keras_resnet")
class SGD(keras.optimizers.SGD):
    """`keras.optimizers.SGD`, same arguments and maths, one fused kernel per variable on TF."""

    def update_step(self, gradient, variable, learning_rate):
        if keras.backend.backend() != "tensorflow" or self.momentum == 0:
            return super().update_step(gradient, variable, learning_rate)
        import tensorflow as tf

        # Inside the TF optimizer's update, `variable` is the tf.Variable (a replica's copy under
        # a distribution strategy); the momentum slot is a Keras variable wrapping one.
        momentum = self.momentums[self._get_variable_index(variable)]
        slot = momentum.value if isinstance(momentum, keras.Variable) else momentum
        tf.raw_ops.ResourceApplyKerasMomentum(
            var=variable.handle,
            accum=slot.handle,
            lr=tf.cast(learning_rate, variable.dtype),
            grad=tf.cast(gradient, variable.dtype),
            momentum=tf.cast(self.momentum, variable.dtype),
            use_nesterov=self.nesterov,
        )
