"""Learning-rate schedules and the loss, as serializable Keras objects (Keras ops only)."""

import math

import keras
from keras import ops

from keras_resnet.model.layers import L1L2


@keras.saving.register_keras_serializable(package="keras_resnet")
class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up from 0 to `peak_lr` over `warmup_steps`, then cosine to 0 or step decay.

    The rate is a function of the optimizer's step counter alone, so a restored optimizer
    resumes the schedule exactly where it stopped.
    """

    def __init__(self, peak_lr, total_steps, warmup_steps, kind="cosine", boundaries=(),
                 decay_factor=0.1):
        self.peak_lr = float(peak_lr)
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.kind = kind
        self.boundaries = tuple(int(b) for b in boundaries)  # in steps
        self.decay_factor = float(decay_factor)

    def __call__(self, step):
        step = ops.cast(step, "float32")
        warmup = self.peak_lr * (step + 1.0) / max(self.warmup_steps, 1)
        if self.kind == "cosine":
            span = max(self.total_steps - self.warmup_steps, 1)
            progress = ops.clip((step - self.warmup_steps) / span, 0.0, 1.0)
            decayed = 0.5 * self.peak_lr * (1.0 + ops.cos(math.pi * progress))
        else:
            passed = sum(ops.cast(step >= b, "float32") for b in self.boundaries) if self.boundaries else 0.0
            decayed = self.peak_lr * ops.power(self.decay_factor, passed)
        return ops.where(step < self.warmup_steps, warmup, decayed)

    def get_config(self):
        return {
            "peak_lr": self.peak_lr,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "kind": self.kind,
            "boundaries": list(self.boundaries),
            "decay_factor": self.decay_factor,
        }


@keras.saving.register_keras_serializable(package="keras_resnet")
class SparseCrossentropy(keras.losses.Loss):
    """Cross-entropy on integer labels, or on soft labels [B, num_classes] (mixup / cutmix),
    with label smoothing (Keras's sparse loss has none). Smoothing a soft label mixes it with the
    uniform distribution, as torch's CrossEntropyLoss(label_smoothing) does."""

    def __init__(self, num_classes, label_smoothing=0.0, from_logits=False, name="crossentropy",
                 reduction="mean_with_sample_weight", **kwargs):
        # The mean over the weighted examples: the weight-0 padding of multi-replica evaluation
        # (pipelines.dataset.build_eval_dataset) does not lower the loss. Without weights, as in
        # training, it is the plain batch mean.
        super().__init__(name=name, reduction=reduction, **kwargs)
        self.num_classes = int(num_classes)
        self.label_smoothing = float(label_smoothing)
        self.from_logits = bool(from_logits)

    def call(self, y_true, y_pred):
        if is_soft(y_true, self.num_classes):
            labels = ops.cast(y_true, "float32")
        else:
            labels = ops.one_hot(ops.reshape(ops.cast(y_true, "int32"), (-1,)), self.num_classes)
        return keras.losses.categorical_crossentropy(
            labels, ops.cast(y_pred, "float32"), from_logits=self.from_logits,
            label_smoothing=self.label_smoothing)

    def get_config(self):
        config = super().get_config()
        config.update(num_classes=self.num_classes, label_smoothing=self.label_smoothing,
                      from_logits=self.from_logits)
        return config


def is_soft(y_true, num_classes) -> bool:
    """True for soft labels [B, num_classes] (static shape), False for class indices."""
    shape = tuple(y_true.shape)
    return len(shape) == 2 and shape[-1] == num_classes and num_classes > 1


@keras.saving.register_keras_serializable(package="keras_resnet")
def dominant_top_k(y_true, y_pred, k=1):
    """Top-k accuracy against the class index, or against the dominant class of a soft label
    (mixup / cutmix training batches: the class with the largest weight)."""
    if is_soft(y_true, y_pred.shape[-1]):
        y_true = ops.argmax(y_true, axis=-1)
    y_true = ops.reshape(ops.cast(y_true, "int32"), (-1,))
    return keras.metrics.sparse_top_k_categorical_accuracy(y_true, y_pred, k=k)


def accuracy_metrics(soft_labels: bool):
    """top1 / top5 metrics; with soft training labels, against the dominant label."""
    if not soft_labels:
        return [keras.metrics.SparseCategoricalAccuracy(name="top1"),
                keras.metrics.SparseTopKCategoricalAccuracy(k=5, name="top5")]
    return [keras.metrics.MeanMetricWrapper(dominant_top_k, name="top1", k=1),
            keras.metrics.MeanMetricWrapper(dominant_top_k, name="top5", k=5)]


def apply_norm_weight_decay(model, weight_decay: float) -> int:
    """Gives every BatchNorm gamma and beta an L2 regularizer of weight_decay / 2 (the SGD weight
    decay `weight_decay`, as for the kernels). Returns the number of variables decayed."""
    if weight_decay <= 0:
        return 0
    regularizer = L1L2(l2=weight_decay / 2.0)
    count = 0
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, keras.layers.BatchNormalization):
            for variable in (layer.gamma, layer.beta):
                if variable is not None and variable.trainable:
                    variable.regularizer = regularizer
                    count += 1
    return count
