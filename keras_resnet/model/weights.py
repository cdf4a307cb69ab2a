"""Pretrained weights in and out: PyTorch, safetensors and our own files, in torchvision names.

    state, known = read_state_dict("resnet50-11ad3fa6.pth")   # {torchvision key: np.ndarray}
    model = build_from_weights("resnet50.safetensors")        # architecture read from the file
    load_state_dict(model, state, keep_classifier=False)      # fine-tuning: own classifier
    write_weights(model, "out.pth", "torchvision")            # torch.load + load_state_dict work

Every format becomes a state dict in torchvision's names (keras_resnet.model.torch_names):
  .pth / .pt     torch.save zip files, read without torch by a restricted unpickler
                 (keras_resnet.model.torch_format); nested checkpoints ({"state_dict": ...},
                 {"model": ...}) and DataParallel / torch.compile prefixes are unwrapped
  .safetensors   the safetensors package's NumPy API (bfloat16 widened to float32)
  .keras         our saved models; a training directory (or its checkpoints/) is read through
                 its latest checkpoint and run.json
Names: torchvision's and timm's `resnet*` are the same (classifier `fc`); the PyTorch ResNet
tutorial's `identity_downsample` is renamed `downsample`, and its conv biases need the model's
`conv_bias=True`. Depth, conv biases and class count are read from the shapes; v1 and v1.5 have
the same shapes, so the variant is v1.5 unless the caller says otherwise (or our file records it).
"""

import json
import os
import re
import tarfile
import zipfile

import numpy as np

from keras_resnet import files
from keras_resnet.model import torch_format
from keras_resnet.model.errors import WeightsError
from keras_resnet.model.resnet import STAGES, basic_block, build_resnet
from keras_resnet.model.torch_names import load_torchvision_state_dict, to_torchvision_state_dict

FORMATS = ("torchvision", "safetensors")  # write_weights formats
# Keys under which training scripts nest the state dict, most specific first.
NESTED_KEYS = ("state_dict", "model_state_dict", "model", "net", "state_dict_ema", "model_ema")
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")  # DataParallel, torch.compile, wrappers
RENAMES = ((".identity_downsample.", ".downsample."),)  # the PyTorch ResNet tutorial's names
CLASSIFIER_PREFIX = "fc."
# A training directory as keras_resnet.training.checkpoint writes it (the model layer cannot
# import training; tests/test_weights.py checks the names agree).
RUN_JSON, CHECKPOINT_SUBDIR = "run.json", "checkpoints"
_LAYER_KEY = re.compile(r"^layer([1-4])\.(\d+)\.")
_SHOWN_KEYS = 6


# ------------------------------------------------------------------------------------ reading

def read_state_dict(path):
    """(state dict in torchvision names, {"variant": ...} when the file records it).

    Raises WeightsError (one line) for a missing, truncated or unreadable file, a pickle that
    asks for code, or content that is not a ResNet state dict.
    """
    if not os.path.exists(path):
        raise WeightsError(f"weights file {path} not found.")
    if os.path.isdir(path):
        return _read_training_dir(path)
    try:
        raw, known = _read_file(path)
    except OSError as e:
        raise WeightsError(f"cannot read {path}: {e.strerror or e}.") from None
    state = normalize_state_dict(raw, path)
    state, prefix = resnet_under_prefix(state, path)
    return state, dict(known, prefix=prefix) if prefix else known


def _read_file(path):
    if path.endswith(".safetensors"):
        return _read_safetensors(path), {}
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
        if torch_format.is_torch_zip(names):
            return torch_format.read_torch_file(path), {}
        if "model.weights.h5" in names and "config.json" in names:
            return _read_keras(path)
        raise WeightsError(f"{path} is a zip file but neither a torch.save file nor a .keras model.")
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:2] == b"PK":
        raise WeightsError(f"{path} is an incomplete zip archive (truncated? no central "
                           "directory); download or save it again.")
    if path.endswith((".pth", ".pt", ".bin", ".ckpt", ".tar")) or head[:1] == b"\x80":
        if tarfile.is_tarfile(path):
            raise WeightsError(f"{path} is in torch's legacy tar format (the first torch releases), which "
                               "is not read; re-save it with torch >= 1.6: "
                               "torch.save(torch.load(PATH, weights_only=True), NEW_PATH).")
        if head[:1] == b"\x80":
            raise WeightsError(f"{path} is in torch's legacy pickle format (the default before "
                               "torch 1.6, or _use_new_zipfile_serialization=False), which is not "
                               "read; re-save it in the zip format: "
                               "torch.save(torch.load(PATH, weights_only=True), NEW_PATH).")
        raise WeightsError(f"{path} is not a complete torch.save file (no zip directory: "
                           "truncated, or not a weights file).")
    raise WeightsError(f"{path}: unknown weights format; use a .pth/.pt (torch.save), "
                       ".safetensors or .keras file, or a training directory.")


def _read_safetensors(path):
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(path)
    except (SafetensorError, ValueError, TypeError, OSError) as e:
        if "bf16" in str(e).lower() or "bfloat16" in str(e).lower():
            return _read_safetensors_bf16(path)
        raise WeightsError(f"{path} is not a readable safetensors file ("
                           f"{str(e).splitlines()[0][:120]}); download or save it again.") from None


def _read_safetensors_bf16(path):
    """The safetensors layout by hand (8-byte header length, JSON header, raw little-endian
    data), for bfloat16 tensors, which have no NumPy dtype: widened to float32."""
    import json

    dtypes = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8",
              "I32": "<i4", "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?"}
    with open(path, "rb") as f:
        blob = f.read()
    size = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + size])
    data = blob[8 + size:]
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        start, end = info["data_offsets"]
        array = np.frombuffer(data[start:end], dtypes[info["dtype"]]).reshape(info["shape"])
        out[key] = (array.astype(np.uint32) << 16).view(np.float32) if info["dtype"] == "BF16" \
            else array.copy()
    return out


def load_keras(path):
    """The model of the .keras file `path` (uncompiled, with this project's fused layers), or a
    one-line WeightsError: Keras says "File not found" for a file that is there but not a
    .keras archive. Files of earlier versions, which name our layers, load too."""
    import keras

    from keras_resnet.model import layers

    if os.path.isfile(path) and not zipfile.is_zipfile(path):
        raise WeightsError(f"{path} is not a .keras file (a zip archive; damaged, or another "
                           "format renamed): pass the best.keras or latest.keras a run wrote.")
    try:
        model = keras.saving.load_model(path, compile=False)
    except Exception as e:  # Keras raises many types for a damaged archive
        raise WeightsError(f"cannot load the Keras model {path} "
                           f"({str(e).splitlines()[0][:120]}).") from None
    return layers.fused(model)


def _read_keras(path):
    model = load_keras(path)
    return to_torchvision_state_dict(model), {"variant": _model_variant(model)}


def _model_variant(model):
    """v1 when a bottleneck's first 1x1 conv is strided, else v1.5 (basic blocks: v1.5)."""
    layer = next((x for x in model.layers if x.name == "stage2_block1_conv1"), None)
    return "v1" if layer is not None and layer.kernel_size == (1, 1) and layer.strides == (2, 2) \
        else "v1.5"


def _read_training_dir(path):
    """A training directory (or its checkpoints/): the latest checkpoint's model weights."""
    import tensorflow as tf

    model_dir = path
    if os.path.basename(os.path.normpath(path)) == CHECKPOINT_SUBDIR:
        model_dir = os.path.dirname(os.path.normpath(path))
    identity = files.read_json(os.path.join(model_dir, RUN_JSON))
    latest = tf.train.latest_checkpoint(os.path.join(model_dir, CHECKPOINT_SUBDIR))
    if identity is None or latest is None:
        raise WeightsError(f"{path} is a directory without a training checkpoint ({RUN_JSON} and "
                           f"{CHECKPOINT_SUBDIR}/); pass a weights file or a run's --model_dir.")
    # Built as training builds it (keras_resnet.training.run.make_model), so the checkpoint's
    # object graph matches; the check below refuses a checkpoint that left weights unset.
    model = build_resnet(identity["depth"], num_classes=identity["num_classes"],
                         variant=identity.get("variant", "v1.5"),
                         conv_bias=identity.get("conv_bias", False), include_preprocessing=True)
    status = tf.train.Checkpoint(model=model).restore(latest).expect_partial()
    try:
        status.assert_existing_objects_matched()
    except AssertionError as e:
        raise WeightsError(f"{latest} does not match the network in {model_dir}/run.json "
                           f"({str(e).splitlines()[0][:120]}).") from None
    return to_torchvision_state_dict(model), {"variant": identity.get("variant", "v1.5")}


# ------------------------------------------------------------------------------- normalising

def _is_tensor_dict(value):
    return isinstance(value, dict) and value and all(
        isinstance(k, str) and isinstance(v, np.ndarray) for k, v in value.items())


def normalize_state_dict(raw, path="the file"):
    """Finds the state dict in a checkpoint object and renames it to torchvision's names."""
    state = raw
    if not _is_tensor_dict(state):
        nested = [k for k in NESTED_KEYS if isinstance(raw, dict) and _is_tensor_dict(raw.get(k))]
        if not nested:
            found = list(raw)[:8] if isinstance(raw, dict) else type(raw).__name__
            raise WeightsError(f"{path} holds no state dict of tensors (found {found}); expected "
                               f"{{name: tensor}} or one nested under {', '.join(NESTED_KEYS)}.")
        state = raw[nested[0]]
    state = dict(state)
    for prefix in WRAPPER_PREFIXES:
        while all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    for old, new in RENAMES:
        state = {k.replace(old, new): v for k, v in state.items()}
    return state


def resnet_under_prefix(state, path="the file"):
    """(`state`, "") when it is a ResNet state dict; (the ResNet's entries without their prefix,
    the prefix) when it holds one ResNet under a prefix that is not a plain wrapper: a
    detection or segmentation backbone (`backbone.body.`, `backbone.`), a self-supervised
    checkpoint's encoder (`encoder.`, `backbone.`). Several candidate ResNets (MoCo's
    `encoder_q.` and `encoder_k.`, DINO's student and teacher) are refused, naming them."""
    if "conv1.weight" in state:
        return state, ""
    marker = "layer1.0.conv1.weight"
    prefixes = sorted(key[:-len(marker)] for key in state if key.endswith(marker)
                      and key[:-len(marker)] + "conv1.weight" in state)
    if not prefixes:
        return state, ""
    if len(prefixes) > 1:
        raise WeightsError(
            f"{path} holds {len(prefixes)} ResNets (under {', '.join(map(repr, prefixes))}); "
            "save the one to start from on its own: torch.save({k[len(P):]: v for k, v in "
            "sd.items() if k.startswith(P)}, 'resnet.pth') with P one of those prefixes.")
    (prefix,) = prefixes
    return {key[len(prefix):]: value for key, value in state.items()
            if key.startswith(prefix)}, prefix


def detect(state_dict, path="the file"):
    """{"depth", "conv_bias", "num_classes"} from a torchvision-named state dict's keys/shapes
    (num_classes None when it has no classifier)."""
    if "conv1.weight" not in state_dict:
        if "conv1.0.weight" in state_dict:
            raise WeightsError(f"{path} holds a deep-stem ResNet (timm resnet*d / resnet*c: "
                               "conv1.0, conv1.1, ...); only the torchvision stem is supported.")
        raise WeightsError(f"{path} is not a ResNet state dict (no conv1.weight; first keys: "
                           f"{', '.join(list(state_dict)[:_SHOWN_KEYS])}).")
    blocks = [0, 0, 0, 0]
    for key in state_dict:
        match = _LAYER_KEY.match(key)
        if match:
            stage = int(match.group(1)) - 1
            blocks[stage] = max(blocks[stage], int(match.group(2)) + 1)
    bottleneck = "layer1.0.conv3.weight" in state_dict
    depth = next((d for d, (fn, counts) in STAGES.items()
                  if tuple(blocks) == counts and (fn is not basic_block) == bottleneck), None)
    if depth is None:
        kind = "bottleneck" if bottleneck else "basic"
        raise WeightsError(f"{path} holds a ResNet with {tuple(blocks)} {kind} blocks per stage, "
                           "which is none of ResNet-18/34/50/101/152.")
    fc = state_dict.get("fc.weight")
    return {"depth": depth, "conv_bias": "conv1.bias" in state_dict,
            "num_classes": int(fc.shape[0]) if fc is not None else None}


def check_architecture(found, *, depth=None, conv_bias=None, path="the file"):
    """Raises WeightsError when the caller's depth / conv_bias contradict the file's."""
    wrong = [(name, want) for name, want in (("depth", depth), ("conv_bias", conv_bias))
             if want is not None and want != found[name]]
    if wrong:
        flags = " ".join(f"--{name}={str(found[name]).lower()}" for name, _ in wrong)
        raise WeightsError(f"{path} does not fit: "
                           + "; ".join(f"--{name}={str(want).lower()} but the file holds "
                                       f"{name}={str(found[name]).lower()}" for name, want in wrong)
                           + f". Pass the file's: {flags}.")


# ----------------------------------------------------------------------------- into a model

def load_state_dict(model, state_dict, *, keep_classifier=True, path="the file"):
    """Sets `model`'s weights from a torchvision-named state dict (strict: nothing is set unless
    every weight fits). keep_classifier=False leaves the model's own `fc` (its classifier)."""
    try:
        load_torchvision_state_dict(model, state_dict,
                                    exclude=() if keep_classifier else (CLASSIFIER_PREFIX,))
    except WeightsError:
        raise
    except ValueError as e:
        raise WeightsError(
            f"{path}: {str(e).rstrip('.')}; these weights are not torchvision's {model.name} "
            "architecture (ResNeXt, Wide ResNet or SE-ResNet weights have other shapes or extra "
            "layers): start from torchvision or timm resnet18/34/50/101/152 weights.") from None


def build_from_weights(path, *, depth=None, variant=None, input_shape=(None, None, 3),
                       classifier_activation=None):
    """A uint8-input model (include_preprocessing) built for and loaded from `path`."""
    state, known = read_state_dict(path)
    found = detect(state, path)
    check_architecture(found, depth=depth, path=path)
    if found["num_classes"] is None:
        raise WeightsError(f"{path} has no classifier (fc.weight); it cannot predict classes.")
    model = build_resnet(found["depth"], num_classes=found["num_classes"],
                         input_shape=input_shape, conv_bias=found["conv_bias"],
                         variant=variant or known.get("variant", "v1.5"),
                         classifier_activation=classifier_activation, include_preprocessing=True)
    load_state_dict(model, state, path=path)
    return model


# ------------------------------------------------------------------------------------ writing

def export_state_dict(model):
    """torchvision's `resnetN(num_classes=K)` state dict of `model`, float32 + int64 buffers.

    Conv biases (the conv_bias variant) are folded into the following BatchNorm's running mean,
    `BN(conv(x) + b) == BN'(conv(x))` with `running_mean' = running_mean - b` exactly at
    inference, because torchvision's convolutions have no bias.
    """
    state = to_torchvision_state_dict(model)
    for key in [k for k in state if k.endswith(".bias") and k[:-5] + ".weight" in state
                and state[k[:-5] + ".weight"].ndim == 4]:
        bn = _bn_after(key[:-len(".bias")])
        state[f"{bn}.running_mean"] = state[f"{bn}.running_mean"] - state.pop(key)
    return state


def _bn_after(conv):
    """torchvision name of the BatchNorm after conv `conv` (conv1->bn1, downsample.0->.1)."""
    if conv.endswith("downsample.0"):
        return conv[:-1] + "1"
    head, _, name = conv.rpartition(".")
    return (head + "." if head else "") + name.replace("conv", "bn")


def write_weights(model, path, fmt, sidecar=None):
    """Writes `model`'s weights as `fmt` ("torchvision": a torch.save file; "safetensors"),
    atomically. `sidecar`: None, or (its path, a dict with class_ids, class_names, sizes and
    preprocessing) written as a pair with the weights (`files.write_with_companion`); a
    safetensors file also holds the class ids and names in its metadata. Returns `path`."""
    if fmt not in FORMATS:
        raise WeightsError(f"unknown weights format {fmt!r}; valid: {', '.join(FORMATS)}.")
    if _model_variant(model) == "v1":
        # Same tensor shapes as v1.5, so torchvision would load it strictly and compute
        # something else (its bottleneck strides the 3x3 conv, v1 the first 1x1).
        raise WeightsError(
            f"this is a ResNet v1 model (stride in the bottleneck's first 1x1 conv); "
            f"torchvision's and timm's ResNets are v1.5, so --format={fmt} would load there and "
            "give wrong outputs. Export it with --format=onnx, litert or saved_model instead.")
    state = export_state_dict(model)
    if fmt == "torchvision":
        data = torch_format.torch_file_bytes(state)
    else:
        from safetensors.numpy import save

        # safetensors metadata holds strings only; loaders read the tensors and ignore the rest.
        meta = {"format": "pt", **{k: json.dumps(sidecar[1][k], ensure_ascii=False)
                                   for k in ("class_ids", "class_names") if sidecar}}
        data = save(state, metadata=meta)
    if sidecar is not None:
        return files.write_with_companion(path, data, sidecar[0], files.json_bytes(sidecar[1]))
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    files.remove_stale_temps(parent, names=(os.path.basename(path),))   # a killed export's
    return files.write_bytes_atomic(path, data)
