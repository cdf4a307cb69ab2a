"""Top-1 / top-5 of a model on a validation split, under a chosen evaluation protocol.

Protocols (sizes in pixels; `resize` is the shorter side after resizing):
  center_crop   resize, then one center crop of `crop` (torchvision's Resize(256) +
                CenterCrop(224); FixRes: evaluate at a larger crop than the training size)
  ten_crop      resize, then the 4 corner and the center crops and their mirror images; the
                10 softmax outputs are averaged (the ResNet paper's 10-crop testing)
  full_image    the whole image, shorter side resized to `resize`, one image per step (the
                network pools globally, so any size works)
Models: any weights file that keras_resnet.model.weights reads (built with the architecture read
from the file) or a SavedModel export, which decodes and crops by itself (center_crop at its own
image size only).
"""

import contextlib
import dataclasses
import math
import os

import numpy as np
import tensorflow as tf

from pipelines import preprocessing

PROTOCOLS = ("center_crop", "ten_crop", "full_image")
TOP_K = (1, 5)


@dataclasses.dataclass(frozen=True)
class Protocol:
    """An evaluation protocol and its sizes (pixels)."""

    name: str = "center_crop"
    crop_size: int = 224
    resize_size: int = 256

    @classmethod
    def make(cls, name, image_size, *, crop_size=None, resize_size=None):
        """Defaults: crop = image_size; resize = crop * 256/224 (full_image: resize = crop)."""
        if name not in PROTOCOLS:
            raise ValueError(f"--protocol={name!r}; valid: {', '.join(PROTOCOLS)}.")
        crop = crop_size or image_size
        default_resize = crop if name == "full_image" else preprocessing.eval_resize_size(crop)
        resize = resize_size or default_resize
        if crop < 32 or resize < 32:
            raise ValueError(f"crop {crop} / resize {resize} px: use sizes >= 32.")
        if name != "full_image" and resize < crop:
            raise ValueError(f"--resize_size={resize} is smaller than the crop ({crop}); the "
                             "shorter side must be at least the crop size.")
        return cls(name, crop, resize)


# ----------------------------------------------------------------------------- preprocessing

def resize_shorter(image, size):
    """uint8 [H, W, 3] with the shorter side `size` (torchvision Resize(int): long side
    truncated), antialiased bilinear as the eval pipeline (pipelines.preprocessing)."""
    shape = tf.shape(image)
    h, w = shape[0], shape[1]
    new_h = tf.where(h <= w, size, size * h // w)
    new_w = tf.where(h <= w, size * w // h, size)
    image = tf.image.resize(image, tf.stack([new_h, new_w]), method=preprocessing.RESIZE_METHOD,
                            antialias=preprocessing.EVAL_ANTIALIAS)
    return tf.cast(image + 0.5, tf.uint8)  # convex weights: rounds, stays in [0, 255]


def _crop(image, top, left, size):
    return image[top:top + size, left:left + size]


def _center(image, size):
    shape = tf.shape(image)
    top = tf.cast(tf.round((shape[0] - size) / 2), tf.int32)
    left = tf.cast(tf.round((shape[1] - size) / 2), tf.int32)
    return _crop(image, top, left, size)


def preprocess(image, protocol):
    """Decoded uint8 [H, W, 3] -> uint8 [S, S, 3] (center_crop), [10, S, S, 3] (ten_crop) or
    [h, w, 3] (full_image)."""
    image = resize_shorter(image, protocol.resize_size)
    size = protocol.crop_size
    if protocol.name == "full_image":
        return image
    if protocol.name == "center_crop":
        out = _center(image, size)
        out.set_shape([size, size, 3])
        return out
    shape = tf.shape(image)
    bottom, right = shape[0] - size, shape[1] - size
    crops = [_crop(image, 0, 0, size), _crop(image, 0, right, size),
             _crop(image, bottom, 0, size), _crop(image, bottom, right, size),
             _center(image, size)]
    crops = tf.stack(crops)
    out = tf.concat([crops, tf.reverse(crops, axis=[2])], axis=0)  # + horizontal flips
    out.set_shape([10, size, size, 3])
    return out


def _raw_dataset(split):
    """(encoded bytes, label) in split order."""
    if split.files is not None:
        ds = tf.data.Dataset.from_tensor_slices(
            (np.asarray(split.files, dtype=str), np.asarray(split.labels, dtype=np.int64)))
        return ds.map(lambda f, y: (tf.io.read_file(f), y))
    return split.records()


def image_dataset(split, protocol, batch_size):
    """Batches of (uint8 images as `preprocess` makes them, labels); undecodable files are
    logged and left out (the result's `images` counts what was evaluated)."""
    ds = _raw_dataset(split).map(
        lambda raw, y: (preprocess(preprocessing.decode_image(raw), protocol), y),
        num_parallel_calls=tf.data.AUTOTUNE).ignore_errors(log_warning=True)
    return ds.batch(1 if protocol.name == "full_image" else batch_size).prefetch(tf.data.AUTOTUNE)


def bytes_dataset(split, batch_size):
    """Batches of (encoded bytes, labels), for a SavedModel's serving_default; files that cannot
    be read are logged and left out (counted as skipped)."""
    return (_raw_dataset(split).ignore_errors(log_warning=True).batch(batch_size)
            .prefetch(tf.data.AUTOTUNE))


# --------------------------------------------------------------------------------- predicting

def keras_predictor(model, strategy=None):
    """images uint8 [N, ...] -> probabilities [N, C] (NumPy) of a Keras model with softmax
    output, on one device or split over the replicas of `strategy` (batches padded to a
    multiple of the replica count, so no replica gets an empty batch)."""
    @tf.function(reduce_retracing=True)
    def step(images):
        return tf.cast(model(images, training=False), tf.float32)

    replicas = strategy.num_replicas_in_sync if strategy is not None else 1
    if replicas == 1:
        return lambda images: step(images).numpy()

    def predict(images):
        images = np.asarray(images)
        n = len(images)
        pad = -n % replicas
        padded = np.concatenate([images, np.repeat(images[-1:], pad, axis=0)]) if pad else images
        dist = strategy.experimental_distribute_values_from_function(
            lambda ctx: np.array_split(padded, replicas)[ctx.replica_id_in_sync_group])
        out = strategy.gather(strategy.run(step, args=(dist,)), axis=0)
        return out.numpy()[:n]

    return predict


def saved_model_predictor(path):
    """(encoded bytes [N] -> probabilities [N, C], crop size, resize size, class ids) of a
    SavedModel export; a size or the ids are None when the export does not record them."""
    loaded = tf.saved_model.load(path)
    fn = loaded.signatures["serving_default"]
    image_size, resize_size = (int(getattr(loaded, name)[0].numpy()) if hasattr(loaded, name)
                               else None for name in ("image_size", "resize_size"))
    class_ids = ([c.decode("utf-8") for c in loaded.class_ids[0].numpy()]
                 if hasattr(loaded, "class_ids") else None)
    return ((lambda data: fn(image_bytes=tf.constant(data))["probabilities"].numpy()), image_size,
            resize_size, class_ids)


def _predict_each(predict, inputs, labels, failures):
    """(probabilities, labels) of the inputs that `predict` takes one at a time, for a batch it
    refused (a SavedModel refuses a whole batch for one file that does not decode). `failures`
    counts those it refuses and keeps the first one's message (not the exception, whose
    traceback would keep its batch in memory)."""
    rows, kept = [], []
    for i in range(len(inputs)):
        try:
            rows.append(predict(inputs[i:i + 1])[0])
            kept.append(i)
        except tf.errors.OpError as e:
            failures["count"] += 1
            if failures["first"] is None:
                failures["first"] = (e.message.strip().splitlines() or [type(e).__name__])[0]
    return (np.stack(rows) if rows else None), labels[kept]


# --------------------------------------------------------------------------------- evaluating

def evaluate(predict, batches, *, num_batches=None, crops_per_image=1, progress=True):
    """{"top1", "top5", "images"} of `predict` over `batches` of (inputs, labels).

    `crops_per_image` > 1: inputs are [N, crops, ...], flattened for `predict` and the crops'
    probabilities averaged.
    """
    from tqdm import tqdm

    correct = dict.fromkeys(TOP_K, 0)
    images, failures = 0, {"count": 0, "first": None}
    for inputs, labels in tqdm(batches, total=num_batches, disable=not progress, unit="batch",
                               desc="evaluating", mininterval=1.0):
        inputs, labels = inputs.numpy(), labels.numpy()
        if crops_per_image > 1:
            flat = inputs.reshape((-1,) + inputs.shape[2:])
            probs = predict(flat).reshape(len(labels), crops_per_image, -1).mean(axis=1)
        else:
            try:
                probs = predict(inputs)
            except tf.errors.OpError:  # e.g. a SavedModel refusing a batch with a bad file
                probs, labels = _predict_each(predict, inputs, labels, failures)
                if probs is None:
                    continue
        # Rank of the true class: how many classes score strictly higher (ties favour it, as
        # Keras's in_top_k does).
        true = probs[np.arange(len(labels)), labels]
        rank = (probs > true[:, None]).sum(axis=1)
        for k in TOP_K:
            correct[k] += int((rank < k).sum())
        images += len(labels)
    if not images and failures["count"]:
        raise ValueError(f"the model failed on every image it was given ({failures['count']:,}; "
                         f"the first error: {failures['first']}): check that the model takes "
                         "this dataset's images.")
    if not images:
        raise ValueError("no image could be evaluated (empty or unreadable validation split).")
    return {"top1": correct[1] / images, "top5": correct[5] / images, "images": images}


def evaluate_path(path, split, protocol, *, batch_size=64, depth=None, variant=None,
                  num_classes=None, class_ids=None, strategy=None, progress=True,
                  sizes_given=True):
    """Evaluates the weights or SavedModel at `path` on `split`; returns the result dict, whose
    `skipped` counts the validation files that could not be decoded (left out).

    A SavedModel crops by itself, at the sizes it records: `protocol` must be that center crop,
    unless `sizes_given` is False (the user named no size) and `protocol` is a center crop, which
    then takes the SavedModel's sizes (a FixRes export: e.g. 224 of 232, not 224 of 256). A
    training run's model given no size is evaluated at the run's evaluation sizes (config.json).
    num_classes, class_ids: the dataset's; a model that records other classes is refused."""
    from keras_resnet.serving.export import latest_version_dir

    saved_model = latest_version_dir(path) if os.path.isdir(path) else None
    if saved_model:
        predict, image_size, resize_size, model_ids = saved_model_predictor(saved_model)
        _check_classes(path, model_ids, num_classes, class_ids)
        own = Protocol.make("center_crop", image_size or protocol.crop_size,
                            resize_size=resize_size)
        if protocol != own and not sizes_given and protocol.name == "center_crop":
            protocol = own
        if protocol != own:
            raise ValueError(f"{path} is a SavedModel, which crops by itself (center crop "
                             f"{own.crop_size} of a {own.resize_size} shorter side): evaluate it "
                             f"with --protocol=center_crop --image_size={own.crop_size} "
                             f"--resize_size={own.resize_size}, or other protocols and sizes "
                             "from the weights (a .keras file or run dir).")
        result = evaluate(predict, bytes_dataset(split, batch_size),
                          num_batches=math.ceil(split.num_examples / batch_size),
                          progress=progress)
        return _record(result, saved_model, protocol, split)
    from keras_resnet.model import weights

    scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
    with scope:
        model = weights.build_from_weights(path, depth=depth, variant=variant,
                                           classifier_activation="softmax")
    if not sizes_given:
        protocol = _run_protocol(path, protocol, model)
    _check_classes(path, _run_class_ids(path), num_classes, class_ids,
                   model_classes=model.outputs[0].shape[-1])
    crops = 10 if protocol.name == "ten_crop" else 1
    steps = math.ceil(split.num_examples / (1 if protocol.name == "full_image" else batch_size))
    result = evaluate(keras_predictor(model, strategy), image_dataset(split, protocol, batch_size),
                      num_batches=steps, crops_per_image=crops, progress=progress)
    return _record(result, path, protocol, split)


def _run_dir(path):
    """The training directory holding `path` (a run directory or a .keras file in one)."""
    return path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))


def _run_protocol(path, protocol, model):
    """`protocol` at the evaluation sizes of the training run `path` comes from, if any."""
    from keras_resnet.serving.export import eval_sizes

    crop, resize = eval_sizes(path, model)
    if not isinstance(crop, int) or crop < 32:
        return protocol
    return Protocol.make(protocol.name, crop, resize_size=resize or None)


def _run_class_ids(path):
    """The class ids recorded beside our own model files (classes.json), else None."""
    from keras_resnet.serving import export

    classes = os.path.join(_run_dir(path), export.CLASSES_JSON)
    return export.read_classes_json(classes)[0] if os.path.isfile(classes) else None


def _check_classes(path, model_ids, num_classes, class_ids, model_classes=None):
    """Refuses a model of other classes than the dataset's (ids when both sides have them), and
    a classes.json beside the model that lists another number of classes than its output."""
    if model_ids is not None and model_classes is not None and len(model_ids) != model_classes:
        raise ValueError(f"the classes.json beside {path} lists {len(model_ids)} classes but the "
                         f"model predicts {model_classes}: it belongs to another model; move it "
                         "away or put the model's own classes.json there.")
    model_classes = model_classes if model_classes is not None else (
        len(model_ids) if model_ids is not None else None)
    if num_classes is not None and model_classes is not None and model_classes != num_classes:
        raise ValueError(f"{path} predicts {model_classes} classes but the dataset has "
                         f"{num_classes}; evaluate it on the dataset it was trained for.")
    if model_ids is not None and class_ids is not None and list(model_ids) != list(class_ids):
        at = next(i for i, (a, b) in enumerate(zip(model_ids, class_ids, strict=True)) if a != b)
        raise ValueError(f"{path} was trained on other classes than the dataset's (class #{at} "
                         f"is {model_ids[at]!r} there, {class_ids[at]!r} here); evaluate it on "
                         "the dataset it was trained for.")


def _record(result, model, protocol, split):
    return {**result, "skipped": split.num_examples - result["images"], "model": model,
            "protocol": protocol.name, "crop_size": protocol.crop_size,
            "resize_size": protocol.resize_size}


def format_table(rows):
    """A plain-text table of result dicts."""
    header = ("model", "protocol", "crop", "resize", "images", "top-1", "top-5")
    lines = [(r["model"], r["protocol"], str(r["crop_size"]), str(r["resize_size"]),
              str(r["images"]), f"{100 * r['top1']:.2f}%", f"{100 * r['top5']:.2f}%")
             for r in rows]
    widths = [max(len(x) for x in column) for column in zip(header, *lines, strict=True)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True))
                     for line in [header, *lines])
