"""Print the top-5 classes of images, from any export (SavedModel, ONNX, LiteRT, OpenVINO) or a
.keras checkpoint.

    python -m keras_resnet.predict --model=saved_models/resnet50_imagenet cat.jpg dog.png
    python -m keras_resnet.predict --model=resnet50.onnx cat.jpg
    python -m keras_resnet.predict --model=runs/resnet50_imagenet/best.keras cat.jpg

--model is a SavedModel version directory, an export base directory (its highest version is
used), a .onnx, .tflite or OpenVINO .xml file (run in ONNX Runtime, LiteRT or OpenVINO: install
keras_resnet[onnx], [litert] or [openvino]), a .keras file (class names from the classes.json beside it), or a training directory
(its best.keras, else latest.keras). A folder given as an image stands for the image files in
it and its sub-folders, in name order (Kaggle's test/ split: no shell glob of 100,000 names).
Exits with status 1 if any image could not be read.
The library is `keras_resnet.serving.predict`; this module parses flags and calls it.
"""

import os
import sys

from absl import flags

from keras_resnet import cli, logs


def define_flags(values):
    flags.DEFINE_string("model", None, "SavedModel (version or base directory), .onnx, .tflite "
                        "or OpenVINO .xml file, .keras file or model_dir.", flag_values=values)
    flags.DEFINE_integer("image_size", None, "Eval crop size for a .keras model (default: its "
                         "input size, else its training run's --eval_image_size from config.json "
                         "beside it, else 224).", flag_values=values)
    flags.DEFINE_integer("resize_size", None, "Shorter side before the crop (default: the "
                         "export's, or the training run's --eval_resize_size, else the crop x "
                         "256/224).", flag_values=values)


def main(flag_values, images):
    if not flag_values.model:
        raise cli.UsageError("--model is required: a SavedModel, a .onnx/.tflite/.xml file, a "
                             ".keras file or a model_dir.")
    if not images:
        raise cli.UsageError("name one or more image files (or folders of them) after the "
                             "flags.")
    if not os.path.exists(flag_values.model):
        return cli.fail(f"model {flag_values.model} not found.")
    tf = logs.import_tensorflow()  # without TensorFlow's start-up noise

    from keras_resnet.serving import predict as predict_lib

    try:
        predict = predict_lib.load_predictor(flag_values.model, flag_values.image_size,
                                            flag_values.resize_size)
    except (ValueError, TypeError, OSError, ImportError) as e:  # ImportError: a runtime extra
        return cli.fail(str(e).splitlines()[0])

    predicted = failed = 0
    with logs.filtered_stderr(logs.is_op_failure_echo):  # the error line below says it
        for path in _image_paths(images):
            if path is None or _predict_file(predict, predict_lib, tf, path):
                failed += 1
            else:
                predicted += 1
    if predicted + failed > 1:
        failures = f", {failed:,} failed (the error lines above)" if failed else ""
        print(f"{predicted:,} image{'' if predicted == 1 else 's'} predicted{failures}.",
              file=sys.stderr)
    return 1 if failed else 0


def _image_paths(names):
    """Each name, or for a folder the image files under it (by extension, in name order); None
    (after an error line) for a folder that holds none."""
    from pipelines.sources import IMAGE_EXTENSIONS

    for name in names:
        if not os.path.isdir(name):
            yield name
            continue
        found = 0
        for root, dirs, filenames in os.walk(name):
            dirs.sort()
            for filename in sorted(filenames):
                if os.path.splitext(filename)[1].lower() in IMAGE_EXTENSIONS:
                    found += 1
                    yield os.path.join(root, filename)
        if not found:
            print(f"error: {name} is a folder with no image files "
                  f"({', '.join(sorted(IMAGE_EXTENSIONS))}).", file=sys.stderr)
            yield None


def _predict_file(predict, predict_lib, tf, path):
    """Prints the top classes of the image at `path`; returns 1 when it failed, else 0."""
    try:
        with open(path, "rb") as f:
            scores, labels, names = predict(f.read())
    except OSError as e:
        print(f"error: cannot read {path}: {e.strerror}.", file=sys.stderr)
        return 1
    except (tf.errors.OpError, UnicodeDecodeError) as e:
        # OpError: any decoder failure, not only InvalidArgument (a runtime's own error for odd
        # bytes); UnicodeDecodeError: an error message holding the file's raw bytes.
        print(f"error: cannot decode {path}: {predict_lib.error_line(e)}.", file=sys.stderr)
        return 1
    print(path, flush=True)
    for score, label, name in zip(scores, labels, names, strict=True):
        print(f"  {score:.4f}  {predict_lib.text(label)}  {predict_lib.text(name)}")
    return 0


def run(argv=None):
    """The command with `argv` (without the program name; default: sys.argv); exit status."""
    return cli.run(define_flags, main, argv, prog="keras_resnet.predict", doc=__doc__,
                   positional=True)


if __name__ == "__main__":
    sys.exit(run())
