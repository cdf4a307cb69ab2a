"""Deployment formats: one table of format name -> writer, and the model every file format is
converted from.

The preprocessing contract, the same for every file format (ONNX, LiteRT, OpenVINO, their int8
versions):

    input  `images`: float32 [N, S, S, 3], RGB in 0..255, N dynamic, S the evaluation size: the
           image decoded, its shorter side resized to S * 256/224 (bilinear, antialiased), then
           center-cropped to S x S, as `pipelines.preprocessing.preprocess_for_eval` does.
    output `probabilities`: float32 [N, C] (softmax over the classes).

The ImageNet mean/std normalisation is inside the model, so a client only decodes, resizes and
crops. The class ids and names travel beside every file in `<FILE>.json` (and inside an ONNX file
as metadata). The int8 formats keep float32 input and output (quantize and dequantize inside). The SavedModel is different: it takes JPEG/PNG bytes (see serving/export.py).

A writer is `writer(model, output, *, image_size, class_ids, class_names, calibration) -> path`,
where `calibration` is a zero-argument callable yielding float32 [1, S, S, 3] images from the
training split (only quantizing writers call it). Adding a format is one `FORMATS` entry.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

from keras_resnet import files

INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"
SIDECAR_SUFFIX = ".json"
CONTRACT = ("float32 [N, S, S, 3] RGB 0..255 at S=image_size after resizing the shorter side to "
            "S*256/224 and a center crop; mean/std normalisation inside; output probabilities "
            "float32 [N, C]")


class MissingExtra(ImportError):
    """A runtime or converter is not installed: the message names the pip extra to install."""


def require(module, extra):
    """Imports `module`, or raises MissingExtra saying `pip install 'keras_resnet[extra]'`."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtra(f"{module} is not installed; pip install 'keras_resnet[{extra}]' "
                           f"(or pip install {module.split('.')[0].replace('_', '-')})") from None


@dataclasses.dataclass(frozen=True)
class Format:
    """How to write one deployment format."""
    writer: Callable  # writer(model, output, *, image_size, class_ids, class_names, calibration)
    suffix: str       # the output file's extension ("" for a directory)
    extra: str        # the pip extra that runs (and converts) it
    description: str
    calibrated: bool = False  # needs calibration images from the training split
    converters: tuple = ()    # modules the writer imports (checked before a model is loaded)


def _saved_model(model, output, *, image_size, class_ids, class_names, calibration=None):
    from keras_resnet.serving import export

    return export.export_saved_model(model, output, image_size=image_size, class_ids=class_ids,
                                     class_names=class_names)


def _onnx(*args, **kwargs):
    from keras_resnet.serving import onnx
    return onnx.write_onnx(*args, **kwargs)


def _onnx_int8(*args, **kwargs):
    from keras_resnet.serving import onnx
    return onnx.write_onnx(*args, quantized=True, **kwargs)


def _litert(*args, **kwargs):
    from keras_resnet.serving import litert
    return litert.write_litert(*args, **kwargs)


def _litert_int8(*args, **kwargs):
    from keras_resnet.serving import litert
    return litert.write_litert(*args, quantize=True, **kwargs)


def _openvino(*args, **kwargs):
    from keras_resnet.serving import openvino
    return openvino.write_openvino(*args, **kwargs)


def _weights_file(fmt):
    """A writer of PyTorch-named weights (keras_resnet.model.weights): weights only, no
    preprocessing or class names in the file."""
    def writer(model, output, *, image_size, class_ids, class_names, calibration=None):
        from keras_resnet.model import weights

        return weights.write_weights(model, output, fmt)
    return writer


FORMATS = {
    "saved_model": Format(_saved_model, "", "", "TF Serving SavedModel version directory "
                          "(takes JPEG/PNG bytes); --output is the export base directory"),
    "onnx": Format(_onnx, ".onnx", "onnx", "ONNX (opset 17) for ONNX Runtime",
                   converters=("tf2onnx",)),
    "onnx_int8": Format(_onnx_int8, ".onnx", "onnx", "ONNX int8 (QDQ, static, float32 input "
                        "and output)", calibrated=True, converters=("tf2onnx", "onnxruntime")),
    "litert": Format(_litert, ".tflite", "litert", "LiteRT (TFLite) float32"),
    "litert_int8": Format(_litert_int8, ".tflite", "litert", "LiteRT full-integer int8 "
                          "(float32 input and output)", calibrated=True),
    "openvino": Format(_openvino, ".xml", "openvino", "OpenVINO IR (.xml + .bin)",
                       converters=("openvino",)),
    "torchvision": Format(_weights_file("torchvision"), ".pth", "", "torch.save state dict "
                          "for torchvision.models.resnetN (torch.load(weights_only=True))"),
    "safetensors": Format(_weights_file("safetensors"), ".safetensors", "", "safetensors state "
                          "dict in torchvision / timm names"),
}


def get_format(name):
    """The Format called `name`; ValueError listing the valid names otherwise."""
    if name not in FORMATS:
        raise ValueError(f"Unknown export format. Received: format={name!r}; valid: "
                         f"{', '.join(FORMATS)}.")
    return FORMATS[name]


# --- the model every file format is converted from --------------------------------------------

def deploy_model(model, image_size):
    """A float32 copy of `model` that takes float32 [N, S, S, 3] RGB 0..255 and returns
    probabilities, built from plain Keras layers.

    The training model takes uint8 (a float 127.6 would be cast to 127), may compute in bfloat16
    or float16 and uses FusedBatchNormalization (a TF raw op): the copy swaps in Keras's own
    BatchNormalization (the same variables and maths) and float32 everywhere, so converters see
    ordinary ops and the file computes what the float32 Keras model computes.
    """
    import keras

    from keras_resnet.model.layers import FusedBatchNormalization
    from keras_resnet.serving import export

    export._check_model(model, image_size)

    def clone_layer(layer):
        config = layer.get_config()
        config["dtype"] = "float32"
        if isinstance(layer, FusedBatchNormalization):
            return keras.layers.BatchNormalization.from_config(config)
        return layer.__class__.from_config(config)

    inputs = keras.Input((image_size, image_size, 3), dtype="float32", name=INPUT_NAME)
    clone = keras.models.clone_model(model, input_tensors=inputs, clone_function=clone_layer)
    clone.set_weights(model.get_weights())
    outputs = clone.outputs[0]
    if model.layers[-1].name == "logits":
        outputs = keras.layers.Softmax(name=OUTPUT_NAME, dtype="float32")(outputs)
    return keras.Model(inputs, outputs, name=f"{model.name}_deploy")


def serving_function(model, image_size):
    """`tf.function(images) -> {"probabilities": ...}` over `deploy_model`'s output, with a
    dynamic batch dimension; what the converters trace."""
    import tensorflow as tf

    deployed = deploy_model(model, image_size)

    @tf.function(input_signature=[tf.TensorSpec([None, image_size, image_size, 3], tf.float32,
                                                name=INPUT_NAME)])
    def serve(images):
        return {OUTPUT_NAME: deployed(images, training=False)}

    serve.deployed = deployed  # keeps the variables alive with the function
    return serve


# --- class names beside the file ---------------------------------------------------------------

def sidecar_path(path):
    """`<FILE>.json`: class ids, names, image size and the input contract of export `path`."""
    return path + SIDECAR_SUFFIX


def write_sidecar(path, *, fmt, image_size, class_ids, class_names):
    """Written before the model file, so a client that sees the model also sees its classes."""
    files.write_json_atomic(sidecar_path(path), {
        "format": fmt, "image_size": image_size, "input": INPUT_NAME, "output": OUTPUT_NAME,
        "preprocessing": CONTRACT, "class_ids": list(class_ids),
        "class_names": list(class_names)})


def read_sidecar(path):
    """The sidecar of export `path` as a dict, or None when there is none."""
    return files.read_json(sidecar_path(path))


def check_output(output, fmt):
    """One-line ValueError unless `output` is a file path with the format's extension."""
    suffix = FORMATS[fmt].suffix
    if not output.endswith(suffix) or os.path.isdir(output):
        raise ValueError(f"--format={fmt} writes a {suffix} file; got --output={output!r} "
                         f"(e.g. --output=model{suffix}).")


# --- running a file in its own runtime ---------------------------------------------------------

RUNNERS = {  # file extension -> (module, class): each runs in its own runtime, without TensorFlow
    ".onnx": ("keras_resnet.serving.onnx", "OnnxRunner"),
    ".tflite": ("keras_resnet.serving.litert", "LiteRTRunner"),
    ".xml": ("keras_resnet.serving.openvino", "OpenVINORunner"),
}


def is_deploy_file(path):
    return os.path.splitext(path)[1] in RUNNERS


def load_runner(path, threads=0):
    """`runner(images float32 [N, S, S, 3]) -> probabilities float32 [N, C]` for an exported file,
    with `image_size`, `class_ids`, `class_names` and `format`; threads=0: the runtime's default."""
    import importlib

    suffix = os.path.splitext(path)[1]
    if suffix not in RUNNERS:
        raise ValueError(f"{path}: not an exported file; expected one of {', '.join(RUNNERS)}.")
    if not os.path.isfile(path):
        raise ValueError(f"model file {path} not found.")
    module, name = RUNNERS[suffix]
    runner = getattr(importlib.import_module(module), name)(path, threads)
    if runner.class_ids is None:
        raise ValueError(f"{path} carries no class list and {sidecar_path(path)} is missing; "
                         "export it again with python -m keras_resnet.export.")
    return runner
