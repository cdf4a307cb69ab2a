"""Agreement across replicas and workers during `fit`.

BatchNorm statistics: Keras 3 creates `moving_mean` / `moving_variance` with aggregation "none",
so each replica updates its own copy from its own data and the workers drift apart (tf.keras 2
averaged them on read). `SyncWorkers`, a callback, averages every float non-trainable variable
across all replicas before each validation pass and at each epoch end, so validation, the
epoch-end checkpoint, `best.keras` and the export use the same statistics on every worker, and
all workers end with identical weights (it logs a fingerprint of them at the end to show it).
Checkpoints saved inside an epoch hold the chief's own statistics (resuming restores them on
every worker alike).

`any_worker` makes every worker stop (and save) at the same step when any of them is signalled.
"""

import hashlib

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from keras_resnet.training.multi_worker import cluster_tasks, in_multi_worker_mode


def weights_fingerprint(model):
    """sha256 (16 hex digits) of all of `model`'s weights: equal on workers holding equal weights."""
    digest = hashlib.sha256()
    for w in model.get_weights():
        digest.update(np.ascontiguousarray(w).tobytes())
    return digest.hexdigest()[:16]


class SyncWorkers(keras.callbacks.Callback):
    """Averages BatchNorm statistics across replicas (the GPUs of a MirroredStrategy, the workers
    of a MultiWorkerMirroredStrategy) before validation and at each epoch end.

    Place it first in the callback list, so later `on_epoch_end` callbacks (checkpoints, the best
    model) see the averaged values. Every worker must run it (it is a collective operation).
    """

    def set_model(self, model):
        super().set_model(model)
        strategy = model.distribute_strategy
        variables = [v for v in model.non_trainable_variables
                     if v.dtype.startswith(("float", "bfloat"))]

        def average_in_replica():
            # In replica context each variable reads and (aggregation "none") writes its local copy.
            means = tf.distribute.get_replica_context().all_reduce(
                "MEAN", [tf.identity(v.value) for v in variables])
            for variable, mean in zip(variables, means, strict=True):
                variable.assign(mean)

        self._average = tf.function(lambda: strategy.run(average_in_replica))
        self._has_variables = bool(variables)

    def _sync(self):
        if self._has_variables:
            self._average()

    def on_test_begin(self, logs=None):
        self._sync()

    def on_epoch_end(self, epoch, logs=None):
        self._sync()

    def on_train_end(self, logs=None):
        if not in_multi_worker_mode(self.model.distribute_strategy):
            return
        logging.info("Task %s weights fingerprint: %s", cluster_tasks()[1],
                     weights_fingerprint(self.model))


def any_worker(strategy):
    """Returns `agree(flag) -> bool`: True if the flag is set on any worker.

    A preemption signal reaches workers at different steps; if one worker left `fit` alone, the
    others would hang or fail in the next collective. Checking this after every step (one scalar
    all-reduce, small next to a training step) makes all workers stop, and save, at the same step.
    """

    @tf.function
    def reduce(flag):
        per_replica = strategy.run(lambda: tf.identity(flag))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    def agree(flag):
        return bool(reduce(tf.constant(1.0 if flag else 0.0)) > 0)

    return agree
