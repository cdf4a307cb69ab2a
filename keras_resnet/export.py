"""Export a trained ResNet: a SavedModel version for TF Serving, or one file for ONNX Runtime,
LiteRT (float32 or int8) or OpenVINO.

    python -m keras_resnet.export --model_dir=runs/resnet50_imagenet --export_dir=saved_models/r50
    python -m keras_resnet.export --model=model.keras --export_dir=saved_models/r50
    python -m keras_resnet.export --model_dir=runs/r50 --format=onnx --output=r50.onnx
    python -m keras_resnet.export --model_dir=runs/r50 --format=litert_int8 --output=r50_int8.tflite \
        --dataset=imagenet --data_dir=data/imagenet --calibration_images=200
    python -m keras_resnet.export --model_dir=runs/r50 --format=torchvision --output=r50.pth
    python -m keras_resnet.export --model_dir=runs/r50 --format=safetensors --output=r50.safetensors

--format=torchvision writes a torch.save file that `torch.load(PATH, weights_only=True)` reads and
`torchvision.models.resnetN(num_classes=K).load_state_dict` accepts (strict); safetensors holds the
same tensors (torchvision / timm names). Both are weights only (keras_resnet.model.weights): a
client normalises as torchvision does and gets logits.

Every runtime format (ONNX, LiteRT, OpenVINO) takes float32 [N, S, S, 3] RGB 0..255 after the
evaluation resize and center crop, normalises inside and returns probabilities. Every file format
has its class ids, names, sizes and preprocessing written beside it as `<FILE>.json`, and the
runtime formats inside it too (see keras_resnet/serving/formats.py). The library is
`keras_resnet.serving`; this module parses flags and calls the format's writer from
`formats.FORMATS`.
"""

import os
import sys

from absl import flags

from keras_resnet import cli, files, logs
from keras_resnet.serving import deploy, formats


def define_flags(values):
    flags.DEFINE_string("model_dir", None, "Training directory: uses best.keras, else "
                        "latest.keras, and classes.json from it.", flag_values=values)
    flags.DEFINE_string("model", None, "A .keras file (instead of --model_dir).", flag_values=values)
    flags.DEFINE_string("format", "saved_model", "One of: " + ", ".join(
        f"{name} ({fmt.description})" for name, fmt in formats.FORMATS.items()) + ".",
        flag_values=values)
    flags.DEFINE_string("export_dir", None, "--format=saved_model: base directory of the versions.",
                        flag_values=values)
    flags.DEFINE_string("output", None, "The file to write (model.onnx, model.tflite, model.xml); "
                        "for saved_model, the same as --export_dir.", flag_values=values)
    flags.DEFINE_string("classes", None, "classes.json (default: beside the model file).",
                        flag_values=values)
    flags.DEFINE_integer("image_size", None, "Eval crop size (default: the model's input size; "
                         "required when the model input size is dynamic).", flag_values=values)
    flags.DEFINE_integer("resize_size", None, "Shorter side before the crop (default: the "
                         "training run's --eval_resize_size from config.json beside the model, "
                         "else image_size x 256/224).", flag_values=values)
    flags.DEFINE_integer("calibration_images", 200, "int8 formats: training images to calibrate "
                         "the activation ranges on.", flag_values=values)
    flags.DEFINE_string("dataset", "imagenet", "int8 formats: the dataset whose training split "
                        "calibrates (imagenet, demo, tfds:NAME).", flag_values=values)
    flags.DEFINE_string("data_dir", None, "int8 formats: its directory (default: data/imagenet, "
                        "data/demo).", flag_values=values)


def _destination(flag_values, name, fmt):
    """The --output (or --export_dir) to write to, checked before any model is loaded."""
    if name == "saved_model":
        if (flag_values.output and flag_values.export_dir and os.path.abspath(flag_values.output)
                != os.path.abspath(flag_values.export_dir)):
            raise cli.UsageError(f"--output={flag_values.output} and --export_dir="
                                 f"{flag_values.export_dir} name two destinations; for "
                                 "--format=saved_model pass one of them (--export_dir).")
        destination = flag_values.output or flag_values.export_dir
        if not destination:
            raise cli.UsageError("--export_dir is required, e.g. --export_dir=saved_models/r50.")
        if os.path.exists(destination) and not os.path.isdir(destination):
            flag = "--output" if flag_values.output else "--export_dir"
            raise cli.UsageError(f"{flag}={destination} is a file; --format=saved_model "
                                 "writes version directories (1/, 2/, ...) under a directory: "
                                 "pass a directory, e.g. --export_dir=saved_models/r50.")
        return destination
    if flag_values.export_dir:
        raise cli.UsageError(f"--format={name} writes one file: pass --output=model{fmt.suffix} "
                             "instead of --export_dir.")
    if not flag_values.output:
        raise cli.UsageError(f"--output is required for --format={name}, "
                             f"e.g. --output=model{fmt.suffix}.")
    try:
        formats.check_output(flag_values.output, name)
    except ValueError as e:
        raise cli.UsageError(str(e)) from None
    return flag_values.output


def main(flag_values, args):
    if bool(flag_values.model) == bool(flag_values.model_dir):
        raise cli.UsageError("pass exactly one of --model=FILE.keras or --model_dir=DIR.")
    try:
        fmt = formats.get_format(flag_values.format)
    except ValueError as e:
        raise cli.UsageError(str(e)) from None
    destination = _destination(flag_values, flag_values.format, fmt)
    if flag_values.resize_size is not None and flag_values.resize_size < 1:
        raise cli.UsageError("--resize_size must be >= 1 (the shorter side before the center "
                             f"crop; leave it out for image_size x 256/224). Received: "
                             f"{flag_values.resize_size}.")
    if fmt.calibrated and flag_values.calibration_images < 1:
        raise cli.UsageError("--calibration_images must be >= 1. Received: "
                             f"{flag_values.calibration_images}.")
    logs.import_tensorflow()  # before any TensorFlow import (converters import it too)
    try:
        for module in fmt.converters:  # before the model loads: say at once what to install
            deploy.require(module, fmt.extra)
    except ImportError as e:
        return cli.fail(str(e))
    from keras_resnet.model import weights
    from keras_resnet.serving import export
    from pipelines.layout import DataError

    path = flag_values.model
    if flag_values.model_dir:
        path = export.find_checkpoint(flag_values.model_dir)
        if path is None:
            return cli.fail(f"no {' or '.join(export.CHECKPOINT_NAMES)} in {flag_values.model_dir}; train "
                         "first or pass --model=FILE.keras.")
    if not os.path.isfile(path):
        return cli.fail(f"model file {path} not found.")
    try:
        model = weights.load_keras(path)
        image_size, resize_size = export.eval_sizes(path, model, flag_values.image_size,
                                                    flag_values.resize_size)
        if image_size is None:
            return cli.fail(f"{path} takes images of any size; pass --image_size.")
        if resize_size and resize_size < image_size:  # every request would fail to crop
            return cli.fail(f"--resize_size={resize_size} is smaller than the crop ({image_size}); "
                            f"the shorter side must be at least the crop size: pass "
                            f"--resize_size>={image_size}, or leave it out.")
        class_ids, class_names = export.load_classes_for(path, model.outputs[0].shape[-1],
                                                         flag_values.classes)
        calibration = (_calibration(flag_values, image_size, resize_size) if fmt.calibrated
                       else None)
        written = fmt.writer(model, destination, image_size=image_size, class_ids=class_ids,
                             class_names=class_names, calibration=calibration,
                             resize_size=resize_size)
    except Exception as e:
        message = files.no_space_message(e, os.path.dirname(os.path.abspath(destination)),
                                         "the previous export there is kept")
        if message is None and not isinstance(e, (ValueError, TypeError, OSError, ImportError,
                                                  DataError)):
            raise
        return cli.fail(message or str(e).splitlines()[0])
    print(written)
    return 0


def _calibration(flag_values, image_size, resize_size):
    from keras_resnet.serving import calibration

    return calibration.calibration_images(
        flag_values.dataset, calibration.default_data_dir(flag_values.dataset, flag_values.data_dir),
        image_size=image_size, resize_size=resize_size, count=flag_values.calibration_images)


def run(argv=None):
    """The command with `argv` (without the program name; default: sys.argv); exit status."""
    return cli.run(define_flags, main, argv, prog="keras_resnet.export", doc=__doc__)


if __name__ == "__main__":
    sys.exit(run())
