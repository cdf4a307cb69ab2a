"""Move weights between our Keras ResNets and torchvision's `resnet{18,34,50,101,152}`.

State dicts are plain `{name: array}` mappings in torchvision naming (`conv1.weight`,
`layer2.0.downsample.1.running_var`, `fc.bias`, ...). No torch import: torch tensors are accepted
(anything `np.asarray` or `.numpy()` understands), and `torch.save(
{k: torch.from_numpy(v) for k, v in to_torchvision_state_dict(model).items()}, path)` writes a
checkpoint `torchvision.models.resnet50().load_state_dict` accepts.

Layouts: conv kernels OIHW (torch) <-> HWIO (Keras); Dense (out, in) <-> (in, out).
"""

import re

import keras
import numpy as np

# BatchNormalization variable -> torchvision buffer/parameter suffix.
_BN_PARAMS = (("gamma", "weight"), ("beta", "bias"), ("moving_mean", "running_mean"),
              ("moving_variance", "running_var"))
_STAGE_LAYER = re.compile(r"^stage(\d+)_block(\d+)_(conv\d|bn\d|downsample_conv|downsample_bn)$")
_MAX_LISTED = 12


def _torch_prefix(layer_name):
    """Keras layer name -> torchvision module path, or None for unknown names."""
    if layer_name in ("conv1", "bn1"):
        return layer_name
    if layer_name == "predictions":
        return "fc"
    match = _STAGE_LAYER.match(layer_name)
    if not match:
        return None
    stage, block, part = match.groups()
    part = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}.get(part, part)
    return f"layer{stage}.{int(block) - 1}.{part}"


def _conv_to_torch(kernel):
    return np.transpose(kernel, (3, 2, 0, 1))  # HWIO -> OIHW


def _conv_from_torch(weight):
    return np.transpose(weight, (2, 3, 1, 0))  # OIHW -> HWIO


def _identity(value):
    return value


def _weight_map(model):
    """torchvision key -> (Keras variable, to_keras, to_torch), for every weight of `model`."""
    mapping = {}
    for layer in model.layers:
        if not layer.weights:
            continue
        prefix = _torch_prefix(layer.name)
        if prefix is None:
            raise ValueError(f"Layer {layer.name!r} has weights but no torchvision counterpart.")
        if isinstance(layer, keras.layers.BatchNormalization):
            for attr, suffix in _BN_PARAMS:
                mapping[f"{prefix}.{suffix}"] = (getattr(layer, attr), _identity, _identity)
        elif isinstance(layer, keras.layers.Conv2D):
            mapping[f"{prefix}.weight"] = (layer.kernel, _conv_from_torch, _conv_to_torch)
            if layer.use_bias:
                mapping[f"{prefix}.bias"] = (layer.bias, _identity, _identity)
        elif isinstance(layer, keras.layers.Dense):
            mapping[f"{prefix}.weight"] = (layer.kernel, np.transpose, np.transpose)
            if layer.use_bias:
                mapping[f"{prefix}.bias"] = (layer.bias, _identity, _identity)
        else:
            raise ValueError(f"Layer {layer.name!r} ({type(layer).__name__}) has weights but no "
                             "torchvision counterpart.")
    return mapping


def _to_numpy(value):
    if hasattr(value, "detach"):  # torch.Tensor: leave autograd and the GPU
        value = value.detach().cpu()
    if hasattr(value, "numpy"):
        value = value.numpy()
    return np.asarray(value)


def _listed(keys):
    keys = sorted(keys)
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown + (f", ... ({len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else "")


def load_torchvision_state_dict(model, state_dict, *, exclude=()):
    """Sets every weight of `model` from a torchvision ResNet state dict (strict).

    `num_batches_tracked` entries are ignored, and so are keys starting with a prefix in
    `exclude` on both sides (`("fc.",)`: keep the model's own classifier). Raises ValueError
    listing the missing, unexpected and shape-mismatched keys (a checkpoint of another depth or
    class count fails here) and sets nothing unless every weight matches.
    """
    exclude = tuple(exclude)
    mapping = {k: v for k, v in _weight_map(model).items() if not k.startswith(exclude)}
    given = {k: v for k, v in state_dict.items()
             if not k.endswith(".num_batches_tracked") and not k.startswith(exclude)}
    missing = mapping.keys() - given.keys()
    unexpected = given.keys() - mapping.keys()
    converted, mismatched = {}, []
    for key in sorted(mapping.keys() & given.keys()):
        variable, to_keras, to_torch = mapping[key]
        array = _to_numpy(given[key])
        expected = to_torch(np.empty(variable.shape, np.int8)).shape  # torch layout, no copy
        if tuple(array.shape) != tuple(expected):
            mismatched.append(f"{key} (checkpoint {tuple(array.shape)}, model {tuple(expected)})")
        else:
            converted[key] = to_keras(array)
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"missing keys: {_listed(missing)}")
        if unexpected:
            problems.append(f"unexpected keys: {_listed(unexpected)}")
        if mismatched:
            problems.append(f"shape mismatches: {_listed(mismatched)}")
        raise ValueError(f"State dict does not match {model.name} "
                         f"({len(mapping)} weights): " + "; ".join(problems) + ".")
    for key, value in converted.items():
        variable = mapping[key][0]
        variable.assign(value.astype(variable.dtype))


def to_torchvision_state_dict(model, *, include_num_batches_tracked=True):
    """`{torchvision key: numpy array}` of `model`'s weights (float32, torch layouts).

    With `include_num_batches_tracked`, each BatchNorm also gets torchvision's int64
    `num_batches_tracked` buffer (0), so `load_state_dict(strict=True)` accepts the dict.
    """
    state = {}
    for key, (variable, _, to_torch) in _weight_map(model).items():
        state[key] = np.ascontiguousarray(to_torch(keras.ops.convert_to_numpy(variable)))
        if include_num_batches_tracked and key.endswith(".running_var"):
            state[key[: -len("running_var")] + "num_batches_tracked"] = np.array(0, np.int64)
    return state
