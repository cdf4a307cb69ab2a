"""Deployment formats: one table of format name -> writer, and which runtime runs each file.

The SavedModel takes JPEG/PNG bytes (see serving/export.py); every other format follows the
input contract of serving/deploy.py. A writer is
`writer(model, output, *, image_size, class_ids, class_names, calibration, resize_size)
-> path` (resize_size: the shorter side before the crop, 0: image_size x 256/224), where
`calibration` is a zero-argument callable yielding float32 [1, S, S, 3] images from the
training split (only quantizing writers call it). Adding a format is one `FORMATS` entry.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

from keras_resnet.serving.deploy import TORCHVISION_CONTRACT, metadata, sidecar_path


@dataclasses.dataclass(frozen=True)
class Format:
    """How to write one deployment format."""
    writer: Callable  # writer(model, output, *, image_size, class_ids, class_names, calibration)
    suffix: str       # the output file's extension ("" for a directory)
    extra: str        # the pip extra that runs (and converts) it
    description: str
    calibrated: bool = False  # needs calibration images from the training split
    converters: tuple = ()    # modules the writer imports (checked before a model is loaded)
    runnable: bool = True     # a model a runtime serves (not a weights-only file)


def _saved_model(model, output, *, image_size, class_ids, class_names, calibration=None,
                 resize_size=0):
    from keras_resnet.serving import export

    return export.export_saved_model(model, output, image_size=image_size, class_ids=class_ids,
                                     class_names=class_names, resize_size=resize_size)


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
    """A writer of PyTorch-named weights (keras_resnet.model.weights) with `<FILE>.json` beside:
    the class ids and names, the sizes and what a torchvision client feeds
    (`TORCHVISION_CONTRACT`)."""
    def writer(model, output, *, image_size, class_ids, class_names, resize_size=0, **_):
        from keras_resnet.model import weights

        meta = metadata(fmt=fmt, image_size=image_size, class_ids=class_ids,
                        class_names=class_names, resize_size=resize_size,
                        contract=TORCHVISION_CONTRACT)
        return weights.write_weights(model, output, fmt, sidecar=(sidecar_path(output), meta))
    return writer


FORMATS = {
    "saved_model": Format(_saved_model, "", "", "TF Serving SavedModel version directory "
                          "(takes JPEG/PNG bytes); --output is the export base directory"),
    "onnx": Format(_onnx, ".onnx", "onnx", "ONNX (opset 17) for ONNX Runtime",
                   converters=("tf2onnx",)),
    "onnx_int8": Format(_onnx_int8, ".onnx", "onnx", "ONNX int8 (QDQ, static, float32 input "
                        "and output)", calibrated=True, converters=("tf2onnx", "onnxruntime")),
    "litert": Format(_litert, ".tflite", "litert", "LiteRT (TFLite) float32"),
    "litert_int8": Format(_litert_int8, ".tflite", "litert", "LiteRT int8 (normalisation, "
                          "residual additions and head float32; float32 input and output)", calibrated=True),
    "openvino": Format(_openvino, ".xml", "openvino", "OpenVINO IR (.xml + .bin)",
                       converters=("openvino",)),
    "torchvision": Format(_weights_file("torchvision"), ".pth", "", "torch.save state dict "
                          "for torchvision.models.resnetN (torch.load(weights_only=True))",
                          runnable=False),
    "safetensors": Format(_weights_file("safetensors"), ".safetensors", "", "safetensors state "
                          "dict in torchvision / timm names", runnable=False),
}
RUNNABLE = tuple(name for name, fmt in FORMATS.items() if fmt.runnable)


def get_format(name):
    """The Format called `name`; ValueError listing the valid names otherwise."""
    if name not in FORMATS:
        raise ValueError(f"Unknown export format. Received: format={name!r}; valid: "
                         f"{', '.join(FORMATS)}.")
    return FORMATS[name]


def check_output(output, fmt):
    """One-line ValueError unless `output` is a file path with the format's extension."""
    suffix = FORMATS[fmt].suffix
    if os.path.isdir(output):
        raise ValueError(f"--output={output!r} is a directory; --format={fmt} writes one file: "
                         f"pass a file path (e.g. --output={os.path.join(output, 'model' + suffix)}).")
    if not output.endswith(suffix):
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
    with `image_size`, `resize_size` (the shorter side before the crop), `class_ids`,
    `class_names` and `format`, read from the file, else its sidecar; threads=0: the runtime's
    default."""
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
