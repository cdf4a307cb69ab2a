"""Print the top-5 classes of images, from an exported SavedModel, ONNX, LiteRT or OpenVINO file,
or a .keras checkpoint.

    python -m keras_resnet.predict --model=saved_models/resnet50_imagenet cat.jpg dog.png
    python -m keras_resnet.predict --model=runs/resnet50_imagenet/best.keras cat.jpg

--model is a SavedModel version directory, an export base directory (its highest version is
used), a .onnx / .tflite / .xml file (run in ONNX Runtime, LiteRT or OpenVINO, after the same
decode, resize and center crop as evaluation), a .keras file (class names from the classes.json beside it), or a training directory
(its best.keras, else latest.keras). Exits with status 1 if any image could not be read.
"""

import os
import re

import numpy as np
import tensorflow as tf

from keras_resnet.model import weights
from keras_resnet.serving import export
from keras_resnet.serving import formats as deploy_formats
from pipelines import formats
from pipelines.preprocessing import preprocess_for_eval


def load_predictor(path, image_size=None, resize_size=None):
    """Returns `predict(image_bytes) -> (scores, labels, names)`, the top 5 for one image.

    A .keras model is evaluated at `image_size` / `resize_size`, else at its training run's
    evaluation sizes (export.eval_sizes), else at 224 / 256. An exported file or SavedModel
    carries its own sizes; a `resize_size` given overrides an exported file's."""
    if deploy_formats.is_deploy_file(path):
        runner = deploy_formats.load_runner(path)  # the export's resize size: in it or its sidecar
        return _file_predictor(runner, resize_size or runner.resize_size)
    saved_model = export.latest_version_dir(path) if os.path.isdir(path) else None
    if saved_model:
        serve = tf.saved_model.load(saved_model).signatures["serving_default"]

        def predict(image_bytes):
            out = serve(image_bytes=tf.constant([image_bytes]))
            return tuple(out[k][0].numpy() for k in ("scores", "labels", "names"))

        return predict

    checkpoint = export.find_checkpoint(path) if os.path.isdir(path) else path
    if not checkpoint or not os.path.isfile(checkpoint):
        raise ValueError(f"{path} is neither a SavedModel, an export directory with versions, "
                         "a .keras file nor a directory with best.keras / latest.keras.")
    model = weights.load_keras(checkpoint)
    image_size, resize_size = export.eval_sizes(checkpoint, model, image_size, resize_size)
    image_size = image_size or 224
    num_classes = model.outputs[0].shape[-1]
    class_ids, class_names = export.load_classes_for(checkpoint, num_classes)
    probabilities = export.probabilities_fn(model)
    k = min(export.TOP_K, num_classes)

    def predict(image_bytes):
        _check_image_bytes(image_bytes)  # the checks the SavedModel makes, with the same words
        pixels = preprocess_for_eval(image_bytes, image_size, recover_truncated=False,
                                     resize_size=resize_size)
        probs = probabilities(pixels[None])[0].numpy()
        top = np.argsort(-probs, kind="stable")[:k]
        return probs[top], [class_ids[i] for i in top], [class_names[i] for i in top]

    return predict


def _file_predictor(runner, resize_size=0):
    """The model runs in its own runtime; decoding and cropping are the evaluation pipeline's.
    resize_size: the shorter side before the crop (0: runner.image_size x 256/224)."""
    k = min(export.TOP_K, len(runner.class_ids))

    def predict(image_bytes):
        _check_image_bytes(image_bytes)
        pixels = preprocess_for_eval(image_bytes, runner.image_size, recover_truncated=False,
                                     resize_size=resize_size)
        probs = runner(tf.cast(pixels, tf.float32)[None].numpy())[0]
        top = np.argsort(-probs, kind="stable")[:k]
        return probs[top], [runner.class_ids[i] for i in top], [runner.class_names[i] for i in top]

    return predict


def _check_image_bytes(data):
    kind = formats.image_format(data[:formats.HEADER_BYTES])
    if kind is None:
        raise tf.errors.InvalidArgumentError(None, None, formats.NOT_AN_IMAGE.format(len(data)))
    if kind in formats.END_MARKERS and formats.END_MARKERS[kind] not in data:
        raise tf.errors.InvalidArgumentError(None, None, formats.TRUNCATED.format(len(data)))


def error_line(e):
    """The informative line of a TensorFlow error (not the graph and node boilerplate), said of
    one file (the SavedModel's messages name the batch element: always 0 here)."""
    if isinstance(e, UnicodeDecodeError):
        return "the decoder rejected the bytes (its message was not text)"
    line = formats.error_line(str(getattr(e, "message", e)))
    return re.sub(r"^image_bytes\[\d+\] is ", "", line) if line else type(e).__name__


def text(value):
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
