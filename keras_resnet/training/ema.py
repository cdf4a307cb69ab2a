"""Exponential moving average of the weights, BatchNorm statistics included.

Keras's optimizer `use_ema=True` averages trainable variables only (not BatchNorm's moving
mean/variance), has no warm-up of the decay and overwrites the model at the end of `fit`;
torchvision's and timm's EMA average every weight and buffer. This one:

    ema <- d_n * ema + (1 - d_n) * w        every `every_steps` optimizer steps, n = updates so far
    d_n  = min(decay, (1 + n) / (10 + n))   with warm-up (tf.train.ExponentialMovingAverage's
                                            num_updates rule), else d_n = decay

over all of `model.weights` (kernels, BatchNorm gamma/beta and moving statistics). With the
warm-up, the first updates follow the raw weights closely, so the average of a run of a few
hundred steps is not stuck near the initial weights. The averages and the update count are
variables: put `ema.trackables()` in the training checkpoint and a resumed run continues the same
average.
"""

import contextlib

import keras
import tensorflow as tf
from absl import logging

WARMUP_OFFSET = 10.0  # d_n = (1 + n) / (10 + n): 0.1, 0.18, 0.25, ... -> 0.99 after 890 updates


def decay_at(num_updates, decay, warmup=True):
    """The decay of update number `num_updates` (0-based), as a float tensor."""
    n = tf.cast(num_updates, tf.float32)
    if not warmup:
        return tf.constant(decay, tf.float32)
    return tf.minimum(tf.constant(decay, tf.float32), (1.0 + n) / (WARMUP_OFFSET + n))


class WeightEMA:
    """The moving average of `model.weights`. Create it in the strategy scope, after the model
    is built; the averages start as copies of the weights."""

    def __init__(self, model, decay, every_steps=1, warmup=True):
        self.model = model
        self.decay, self.every_steps, self.warmup = float(decay), int(every_steps), bool(warmup)
        self.weights = list(model.weights)
        self.averages = [tf.Variable(w.value, trainable=False, name="ema/" + w.path.replace("/", "_"))
                         for w in self.weights]
        self.num_updates = tf.Variable(0, dtype=tf.int64, trainable=False, name="ema/num_updates")
        self._update_fn = tf.function(self._update)

    def trackables(self):
        """Objects for a tf.train.Checkpoint: the averages and the update count."""
        return {"ema_num_updates": self.num_updates,
                "ema_averages": {f"v{i}": v for i, v in enumerate(self.averages)}}

    def _update(self):
        d = decay_at(self.num_updates, self.decay, self.warmup)
        for average, weight in zip(self.averages, self.weights, strict=True):
            w = tf.cast(weight.value, average.dtype)
            average.assign(d * average + (1.0 - d) * w)
        self.num_updates.assign_add(1)

    def update(self):
        """One EMA update from the current weights."""
        self._update_fn()

    def maybe_update(self, global_step):
        """Updates after optimizer step `global_step` (1-based) if it is a multiple of every_steps."""
        if global_step % self.every_steps == 0:
            self.update()

    @contextlib.contextmanager
    def swapped(self):
        """Inside: the model holds the averages; after: its own weights again."""
        saved = [tf.identity(w.value) for w in self.weights]
        for weight, average in zip(self.weights, self.averages, strict=True):
            weight.assign(tf.cast(average, weight.dtype))
        try:
            yield self.model
        finally:
            for weight, value in zip(self.weights, saved, strict=True):
                weight.assign(value)

    def copy_to_model(self):
        """Leaves the averages in the model (for the final export)."""
        for weight, average in zip(self.weights, self.averages, strict=True):
            weight.assign(tf.cast(average, weight.dtype))


class EMACallback(keras.callbacks.Callback):
    """Updates the EMA after each optimizer step and, at each epoch end, evaluates it on the
    validation data: logs gain `val_<metric>_ema` (the raw weights' `val_<metric>` stay).

    Put it before the checkpoint callback, so the best model is chosen on the EMA's logs.
    """

    def __init__(self, ema, validation_data=None, validation_steps=None):
        super().__init__()
        self.ema = ema
        self.validation_data, self.validation_steps = validation_data, validation_steps

    def on_train_batch_end(self, batch, logs=None):
        self.ema.maybe_update(int(self.model.optimizer.iterations.numpy()))

    def on_epoch_end(self, epoch, logs=None):
        if logs is None or self.validation_data is None:
            return
        with self.ema.swapped():
            results = self.model.evaluate(self.validation_data, steps=self.validation_steps,
                                          verbose=0, return_dict=True)
        for name, value in results.items():
            logs[f"val_{name}_ema"] = value
        logging.info("Epoch %d: EMA %s", epoch + 1,
                     ", ".join(f"val_{k} {v:.4f}" for k, v in results.items()))
