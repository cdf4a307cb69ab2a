"""Export a trained ResNet as a versioned SavedModel that serves raw JPEG/PNG bytes.

    python -m keras_resnet.export --model_dir=runs/resnet50_imagenet --export_dir=saved_models/r50
    python -m keras_resnet.export --model=model.keras --export_dir=saved_models/r50

Each export is a new integer version directory, `<export_dir>/<version>/`, as TF Serving expects.
It is written to a hidden temporary directory and renamed into place only when complete, so a
server watching `export_dir` never sees a half-written version and old versions are never touched.

Signatures (both return the same outputs):
  serving_default(image_bytes: string [N])        JPEG, PNG, GIF, BMP or WebP bytes, decoded and
                                                   preprocessed exactly as the eval pipeline does.
  serve_images(images: uint8 [N, H, W, 3])        decoded RGB images of any size, given the same
                                                   eval preprocessing (resize the shorter side to
                                                   resize_size, default image_size * 256/224,
                                                   center crop).
Outputs: probabilities float32 [N, C]; the top 5 as classes int64, scores float32, labels string
(wnid / folder name) and names string (human-readable name, or the label when unknown).
Class ids and names are constants inside the graph (and the `class_ids` / `class_names` variable
collections), so the export is self-contained.
"""

import json
import os
import re
import shutil
import sys

import keras
import tensorflow as tf

# Registers the model's custom layer with Keras, so `.keras` checkpoints load without the model
# module having been imported first.
import keras_resnet.model.layers  # noqa: F401
from keras_resnet import files
from keras_resnet.files import write_json_atomic
from pipelines import formats, preprocessing

TOP_K = 5
_VERSION_RE = re.compile(r"^\d+$")
CHECKPOINT_NAMES = ("best.keras", "latest.keras")
CLASSES_JSON = "classes.json"


# --- classes.json ------------------------------------------------------------------------------

def write_classes_json(path, class_ids, class_names=None):
    """Writes `{"class_ids": [...], "class_names": [...]}` (names default to the ids)."""
    class_ids, class_names = _check_classes(class_ids, class_names)
    write_json_atomic(path, {"class_ids": class_ids, "class_names": class_names})


def read_classes_json(path):
    """Returns (class_ids, class_names) from a file written by `write_classes_json`."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return _check_classes(data["class_ids"], data.get("class_names"))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"Cannot read class list {path}: {e}. Expected JSON "
                         '{"class_ids": [...], "class_names": [...]}.') from None


def _check_classes(class_ids, class_names, num_classes=None):
    """(class_ids, class_names) as strings; refused unless one name per id and, when
    `num_classes` (the model's output size) is given, one id per output."""
    class_ids = [str(c) for c in class_ids]
    class_names = class_ids if class_names is None else [str(n) for n in class_names]
    if not class_ids or len(class_names) != len(class_ids):
        raise ValueError(f"Need one name per class id. Received: {len(class_ids)} class_ids, "
                         f"{len(class_names)} class_names.")
    if num_classes is not None and num_classes != len(class_ids):
        raise ValueError(f"The model has {num_classes} classes but {len(class_ids)} class ids "
                         "were given; pass the class list the model was trained with.")
    return class_ids, class_names


# --- versions ----------------------------------------------------------------------------------

def list_versions(export_dir):
    """Sorted integer versions under `export_dir` (complete exports only)."""
    if not os.path.isdir(export_dir):
        return []
    return sorted(int(d) for d in os.listdir(export_dir)
                  if _VERSION_RE.match(d) and os.path.isdir(os.path.join(export_dir, d)))


def latest_version_dir(path):
    """`path` if it is a SavedModel, else its highest version directory; None when neither."""
    if os.path.isfile(os.path.join(path, "saved_model.pb")):
        return path
    versions = list_versions(path)
    return os.path.join(path, str(versions[-1])) if versions else None


# --- export ------------------------------------------------------------------------------------

def float32_model(model, input_tensors=None, layer_class=None):
    """`model` computing in float32: a copy sharing its weights' values when any layer computes
    in another precision (a mixed-precision run's model computes in bfloat16 or float16, which
    moved served probabilities by up to 1e-2 from the float32 maths of every deploy format).

    input_tensors: new inputs for the copy (copied even when already float32);
    layer_class(layer): the class to rebuild a layer with (default: its own)."""
    if input_tensors is None and all(
            layer.dtype_policy.compute_dtype == "float32" for layer in model.layers
            if not isinstance(layer, keras.layers.InputLayer)):
        return model

    def clone_layer(layer):
        config = layer.get_config()
        config["dtype"] = "float32"
        return (layer_class(layer) if layer_class else layer.__class__).from_config(config)

    clone = keras.models.clone_model(model, input_tensors=input_tensors,
                                     clone_function=clone_layer)
    clone.set_weights(model.get_weights())
    return clone


def probabilities_fn(model):
    """The model's output as float32 probabilities (softmax applied when it ends in logits),
    computed in float32 whatever precision the model was trained in."""
    model = float32_model(model)
    is_logits = model.layers[-1].name == "logits"

    def fn(images):
        out = tf.cast(model(tf.cast(images, model.inputs[0].dtype), training=False), tf.float32)
        return tf.nn.softmax(out) if is_logits else out

    return fn


def _check_model(model, image_size):
    if not any(layer.name == "normalize" for layer in model.layers):
        raise ValueError("Export needs a model that takes uint8 RGB: build it with "
                         "build_resnet(..., include_preprocessing=True).")
    height, width = model.inputs[0].shape[1:3]
    if (height, width) not in ((None, None), (image_size, image_size)):
        raise ValueError(f"image_size={image_size} does not match the model input "
                         f"{height}x{width}; pass image_size={height} (--image_size={height}).")


def _has_end_marker(data):
    """False for a JPEG without an end-of-image marker or a PNG without its IEND chunk.

    Searches the whole string (not just its tail): valid files may carry trailing data (a motion
    photo's video, for one) after the marker.
    """
    def contains(marker):
        return lambda: tf.size(tf.strings.split(data, sep=marker)) > 1

    return tf.case([(preprocessing.has_format(data, kind), contains(marker))
                    for kind, marker in formats.END_MARKERS.items()],
                   default=lambda: tf.constant(True))


def _build_archive(model, image_size, class_ids, class_names, resize_size=0):
    image_spec = tf.TensorSpec([image_size, image_size, 3], tf.uint8)
    model = float32_model(model)  # the archive tracks the variables the signatures use
    probabilities = probabilities_fn(model)
    ids = tf.constant(class_ids)
    names = tf.constant(class_names)
    k = min(TOP_K, len(class_ids))

    def outputs(images):
        def predict():
            probs = probabilities(images)
            scores, classes = tf.math.top_k(probs, k=k)
            return {"probabilities": probs, "classes": tf.cast(classes, tf.int64),
                    "scores": scores, "labels": tf.gather(ids, classes),
                    "names": tf.gather(names, classes)}

        def empty():  # oneDNN's convolution rejects a batch of zero images
            return {"probabilities": tf.zeros([0, len(class_ids)]),
                    "classes": tf.zeros([0, k], tf.int64), "scores": tf.zeros([0, k]),
                    "labels": tf.zeros([0, k], tf.string), "names": tf.zeros([0, k], tf.string)}

        return tf.cond(tf.shape(images)[0] > 0, predict, empty)

    def preprocess_bytes(args):
        data, index = args
        # Clear InvalidArgumentErrors naming the bad element, instead of a decoder message that
        # does not say which image of the batch it came from.
        is_image = tf.reduce_any([preprocessing.has_format(data, k) for k in formats.SIGNATURES])
        check_format = tf.debugging.Assert(is_image, [tf.strings.format(
            "image_bytes[{}] is " + formats.NOT_AN_IMAGE, (index, tf.strings.length(data)))])
        check_end = tf.debugging.Assert(_has_end_marker(data), [tf.strings.format(
            "image_bytes[{}] is " + formats.TRUNCATED, (index, tf.strings.length(data)))])
        with tf.control_dependencies([check_format, check_end]):
            # Strict: a truncated JPEG that still holds an end marker (an embedded thumbnail's)
            # fails in the decoder instead of being scored with its missing rows grey.
            return preprocessing.preprocess_for_eval(tf.identity(data), image_size,
                                                     recover_truncated=False,
                                                     resize_size=resize_size)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    def serving_default(image_bytes):
        indices = tf.range(tf.shape(image_bytes, out_type=tf.int64)[0])
        images = tf.map_fn(preprocess_bytes, (image_bytes, indices),
                           fn_output_signature=image_spec)
        return outputs(images)

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")])
    def serve_images(images):
        images = tf.map_fn(lambda image: preprocessing.center_crop_for_eval(image, image_size,
                                                                            resize_size),
                           images,
                           fn_output_signature=image_spec)
        return outputs(images)

    archive = keras.export.ExportArchive()
    archive.track(model)
    for fn in (serving_default, serve_images):
        fn.get_concrete_function()  # add_endpoint takes a tf.function once it is traced
        archive.add_endpoint(fn.__name__, fn)
    archive.add_variable_collection("class_ids", [tf.Variable(class_ids, trainable=False)])
    archive.add_variable_collection("class_names", [tf.Variable(class_names, trainable=False)])
    archive.add_variable_collection("image_size", [tf.Variable(image_size, trainable=False)])
    archive.add_variable_collection("resize_size", [tf.Variable(
        resize_size or preprocessing.eval_resize_size(image_size), trainable=False)])
    return archive


def export_saved_model(model, export_dir, *, image_size, class_ids, class_names=None,
                       resize_size=0):
    """Writes `model` as SavedModel `<export_dir>/<max version + 1>/`; returns that path.

    Args:
      model: a Keras model built with `include_preprocessing=True` whose last layer is
        `probabilities` (softmax) or `logits`; its input may be fixed at image_size or dynamic.
      export_dir: base directory holding integer version directories (created if missing).
      image_size: the eval crop size in pixels (as in `preprocess_for_eval`).
      resize_size: the shorter side before the crop (0: image_size * 256/224; FixRes recipes
        train smaller and evaluate at e.g. resize 232, crop 224).
      class_ids: class i's wnid / folder name; class_names: human-readable names (or None).
    """
    class_ids, class_names = _check_classes(class_ids, class_names,
                                            num_classes=model.outputs[0].shape[-1])
    _check_model(model, image_size)
    os.makedirs(export_dir, exist_ok=True)
    files.remove_stale_temps(export_dir)

    tmp = files.temp_name(os.path.join(export_dir, "export"))  # write_out creates it
    try:
        _build_archive(model, image_size, class_ids, class_names,
                       resize_size).write_out(tmp, verbose=False)
        # The version is chosen when the export is complete, so versions keep completion order.
        # rename() fails on an existing non-empty directory: then another export took that
        # version in the meantime, and we take the next one.
        for _ in range(100):
            target = os.path.join(export_dir, str((list_versions(export_dir) or [0])[-1] + 1))
            if files.rename_dir_if_absent(tmp, target):
                return target
        raise RuntimeError(f"Could not claim a new version directory in {export_dir}; "
                           "is another process exporting there in a loop?")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --- loading what to export ---------------------------------------------------------------------

def find_checkpoint(model_dir):
    """`<model_dir>/best.keras`, else `<model_dir>/latest.keras`, else None."""
    for name in CHECKPOINT_NAMES:
        path = os.path.join(model_dir, name)
        if os.path.isfile(path):
            return path
    return None


def eval_sizes(model_path, model, image_size=None, resize_size=None):
    """(crop, resize) at which to evaluate `model`, loaded from `model_path` (a file or a run
    directory): the sizes given, else
    the model's fixed input size, else the training run's --eval_image_size / --eval_resize_size
    (config.json beside the model; a FixRes run trains at one size and evaluates at another).
    resize 0: crop x 256/224. crop None: a model of any input size with no run config beside it.
    """
    run_dir = (model_path if os.path.isdir(model_path)
               else os.path.dirname(os.path.abspath(model_path)))
    run = files.read_json(os.path.join(run_dir, "config.json")) or {}
    run_crop = run.get("eval_image_size") or run.get("image_size")
    crop = image_size or model.inputs[0].shape[1] or run_crop
    resize = resize_size or (run.get("eval_resize_size") if crop == run_crop else 0) or 0
    return crop, resize


def load_classes_for(model_path, num_classes, classes_path=None):
    """(class_ids, class_names): from `classes_path`, else classes.json beside the model file,
    else the class indices as strings. A list of another length than the model's `num_classes`
    outputs is refused (every format would carry names that do not match its outputs). A
    `classes_path` given but missing is refused too: falling back would label the export 0..C-1
    (or with the run's own classes) although the caller named another list."""
    if classes_path and not os.path.isfile(classes_path):
        raise ValueError(f"--classes={classes_path} not found; pass an existing JSON file "
                         '{"class_ids": [...], "class_names": [...]}, or leave --classes out to '
                         f"use the {CLASSES_JSON} beside the model.")
    classes_path = classes_path or os.path.join(os.path.dirname(model_path), CLASSES_JSON)
    if os.path.isfile(classes_path):
        return _check_classes(*read_classes_json(classes_path), num_classes=num_classes)
    print(f"warning: no {classes_path}; labelling classes 0..{num_classes - 1}.", file=sys.stderr)
    ids = [str(i) for i in range(num_classes)]
    return ids, ids
