"""Fine-tuning: start from pretrained weights, freeze early parts, a faster-learning head.

- `init_from(model, path)`: weights from any file `keras_resnet.model.weights` reads; when the
  class count differs, the model keeps its own freshly initialised classifier (and says so).
- `freeze(model, groups)`: layers of the named groups (`stem`, `stage1`..`stage4`, `head`) stop
  training. Their BatchNorm layers then run in inference mode (moving statistics, not batch
  statistics, and no update of them): Keras 3 and our fused BatchNorm use batch statistics only
  when `training and layer.trainable`, so a frozen part computes what it computed when it was
  trained, the fine-tuning pitfall of keras-team/keras#9214.
- `HeadScaledSGD`: SGD whose classifier variables step with `learning_rate * multiplier`.

Nothing here is random or stateful beyond the model and optimizer variables, so a fine-tuning run
resumes exactly like any other (the checkpoint holds every variable; a resumed run does not
re-read `init_from`).
"""

import keras
from absl import logging

from keras_resnet.model import weights
from keras_resnet.training.config import FREEZE_GROUPS as GROUPS  # noqa: F401  (one table)
from keras_resnet.training.sgd import SGD

STEM_LAYERS = ("conv1", "bn1", "relu1", "conv1_pad", "pool1", "pool1_pad")
HEAD_LAYERS = ("predictions",)


def layer_group(name):
    """The group of a layer of `build_resnet`, or None for layers without weights of a group."""
    if name in STEM_LAYERS:
        return "stem"
    if name.startswith("stage"):
        return name.split("_", 1)[0]
    if name in HEAD_LAYERS:
        return "head"
    return None


def freeze(model, groups):
    """Sets `trainable=False` on every layer of `groups`; returns the number of frozen weights.
    Call before `compile` (Keras collects the trainable variables when it builds the step)."""
    groups = set(groups)
    frozen = 0
    for layer in model.layers:
        if layer_group(layer.name) in groups:
            layer.trainable = False
            frozen += sum(int(keras.ops.size(w)) for w in layer.weights)
    if groups:
        logging.info("Frozen: %s (%d weights; their BatchNorm runs in inference mode).",
                     ", ".join(g for g in GROUPS if g in groups), frozen)
    return frozen


def init_from(model, path, *, num_classes, variant=None):
    """Loads the weights at `path` into `model` (built for `num_classes`, and `variant`). Returns
    a one-line description of what was loaded. Raises WeightsError for a file that does not fit.

    A .keras file or a run folder records its variant; a torchvision or timm file does not (the
    same weights fit both, with other strides), so only the former can be checked."""
    state, known = weights.read_state_dict(path)
    found = weights.detect(state, path)
    depth = int(model.name.removeprefix("resnet")) if model.name.startswith("resnet") else None
    conv_bias = model.get_layer("conv1").use_bias
    weights.check_architecture(found, depth=depth, conv_bias=conv_bias, path=path)
    if (variant and known.get("variant") and known["variant"] != variant
            and found["depth"] >= 50):  # basic blocks have no variants
        raise weights.WeightsError(
            f"{path} holds a {known['variant']} ResNet-{found['depth']} (stride on the "
            f"{'first 1x1' if known['variant'] == 'v1' else '3x3'} conv) but this run builds "
            f"{variant}: pass --variant={known['variant']}.")
    keep = found["num_classes"] == num_classes
    weights.load_state_dict(model, state, keep_classifier=keep, path=path)
    source = f"{path} (the ResNet under {known['prefix']!r})" if known.get("prefix") else path
    if keep:
        return f"Initialised all weights from {source}."
    if found["num_classes"] is None:
        return (f"Initialised from {source}; it has no classifier, so the classifier is newly "
                "initialised.")
    return (f"Initialised from {source}; its classifier ({found['num_classes']} classes) does "
            f"not fit the dataset's {num_classes} classes, so the classifier is newly "
            "initialised.")


@keras.saving.register_keras_serializable(package="keras_resnet")
class HeadScaledSGD(SGD):
    """SGD in which the variables of `head_layers` (the classifier) step with the learning rate
    times `head_lr_multiplier`: the momentum buffer and weight decay (an L2 term of the loss)
    scale with it, as a per-parameter-group `lr` does in PyTorch's SGD."""

    def __init__(self, *args, head_lr_multiplier=1.0, head_layers=HEAD_LAYERS, **kwargs):
        super().__init__(*args, **kwargs)
        self.head_lr_multiplier = float(head_lr_multiplier)
        self.head_layers = tuple(head_layers)
        self._head_indices = frozenset()

    def build(self, variables):
        super().build(variables)
        self._head_indices = frozenset(
            i for i, v in enumerate(variables) if v.path.split("/", 1)[0] in self.head_layers)

    def update_step(self, gradient, variable, learning_rate):
        if self._get_variable_index(variable) in self._head_indices:
            learning_rate = learning_rate * self.head_lr_multiplier
        return super().update_step(gradient, variable, learning_rate)

    def get_config(self):
        return {**super().get_config(), "head_lr_multiplier": self.head_lr_multiplier,
                "head_layers": list(self.head_layers)}
