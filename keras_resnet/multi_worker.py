"""MultiWorkerMirroredStrategy for Keras 3 `model.fit` (placeholder; see issue 8)."""

import tensorflow as tf


def make_strategy():
    return tf.distribute.MultiWorkerMirroredStrategy()
