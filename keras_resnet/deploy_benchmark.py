"""Deployment benchmark: every export format side by side, each in its own runtime, in one run.

    python -m keras_resnet.deploy_benchmark --model_dir=runs/demo --dataset=demo --data_dir=data/demo

Exports the model to each of --formats (into --work_dir, default a temporary directory), loads each
file in its own runtime and measures, on the validation split of --dataset:
  - single-image latency, p50 and p99 in ms, over --latency_runs calls (after 5 untimed calls);
  - batch-of---batch_size throughput in images/s, over --throughput_batches calls (after one);
  - top-1 accuracy on the whole validation split.
Inputs are preprocessed once by the evaluation pipeline (decode, resize, center crop) and are not
timed, except for `saved_model`, which takes JPEG bytes and decodes and crops inside: its times
include that. `keras` is the Keras model called through a tf.function in TensorFlow: the anchor of
the `speed-up` column (its p50 latency over the format's). Runtimes use their default thread count
(one per core) unless --threads is given.
"""

import os
import platform
import statistics
import sys
import tempfile
import time

from absl import flags

from keras_resnet import cli
from keras_resnet.serving import formats

ANCHOR = "keras"
WARMUP_CALLS = 5


def define_flags(values):
    flags.DEFINE_string("model_dir", None, "Training directory (best.keras, else latest.keras).",
                        flag_values=values)
    flags.DEFINE_string("model", None, "A .keras file (instead of --model_dir).", flag_values=values)
    flags.DEFINE_list("formats", [ANCHOR, *formats.RUNNABLE], "What to compare: keras (the anchor) "
                      f"and any of {', '.join(formats.RUNNABLE)}.", flag_values=values)
    flags.DEFINE_string("dataset", "demo", "Dataset whose validation split is measured and whose "
                        "training split calibrates the int8 formats.", flag_values=values)
    flags.DEFINE_string("data_dir", None, "Its directory (default: data/imagenet, data/demo).",
                        flag_values=values)
    flags.DEFINE_integer("latency_runs", 100, "Timed single-image calls per format.",
                         flag_values=values)
    flags.DEFINE_integer("throughput_batches", 10, "Timed batches per format.", flag_values=values)
    flags.DEFINE_integer("batch_size", 32, "Images per batch for throughput and accuracy.",
                         flag_values=values)
    flags.DEFINE_integer("calibration_images", 200, "Training images for int8 calibration.",
                         flag_values=values)
    flags.DEFINE_integer("image_size", None, "Crop size (default: the model's input size, else its "
                         "run's --eval_image_size).", flag_values=values)
    flags.DEFINE_integer("resize_size", None, "Shorter side before the crop (default: the run's "
                         "--eval_resize_size, else image_size x 256/224).", flag_values=values)
    flags.DEFINE_integer("threads", 0, "Threads per runtime (0: its default).", flag_values=values)
    flags.DEFINE_string("work_dir", None, "Where the exports are written (default: a temporary "
                        "directory, removed at the end).", flag_values=values)


def latency_ms(run, images, runs):
    """(p50, p99) in ms of `run(images[i:i+1])` over `runs` calls, cycling through the images."""
    for i in range(WARMUP_CALLS):
        run(images[i % len(images):][:1])
    times = []
    for i in range(runs):
        one = images[i % len(images):][:1]
        start = time.perf_counter()
        run(one)
        times.append(1000 * (time.perf_counter() - start))
    cuts = statistics.quantiles(times, n=100, method="inclusive")
    return cuts[49], cuts[98]


def throughput(run, images, batch_size, batches):
    """Images/s of `run` on batches of `batch_size` (one untimed batch first)."""
    batch = images[:batch_size]
    run(batch)
    start = time.perf_counter()
    for _ in range(batches):
        run(batch)
    return batch_size * batches / (time.perf_counter() - start)


def top1(run, images, labels, batch_size):
    import numpy as np

    probs = np.concatenate([np.asarray(run(images[i:i + batch_size]))
                            for i in range(0, len(images), batch_size)])
    return float((probs.argmax(axis=1) == labels).mean())


def _validation(dataset, data_dir, image_size, resize_size=0):
    """(JPEG bytes, float32 pixels [N, S, S, 3], int labels) of the validation split, resized
    (shorter side to `resize_size`, 0: the 256/224 rule) and cropped as the exports expect."""
    import numpy as np

    from pipelines.preprocessing import preprocess_for_eval
    from pipelines.sources import load_source

    split = load_source(dataset, data_dir).val
    if split is None or split.files is None:
        raise ValueError(f"--dataset={dataset} has no validation files to measure on.")
    data = [open(path, "rb").read() for path in split.files]
    pixels = np.stack([preprocess_for_eval(d, image_size, resize_size=resize_size).numpy()
                       for d in data])
    return np.array(data, dtype=object), pixels.astype(np.float32), np.asarray(split.labels)


def _keras_runner(model):
    import tensorflow as tf

    from keras_resnet.serving.export import probabilities_fn

    fn = tf.function(probabilities_fn(model))
    return lambda images: fn(tf.constant(images)).numpy()


def _saved_model_runner(path):
    import tensorflow as tf

    serve = tf.saved_model.load(path).signatures["serving_default"]
    return lambda data: serve(image_bytes=tf.constant(list(data)))["probabilities"].numpy()


def _runner(name, model, work_dir, flag_values, image_size, classes, resize_size=0):
    """(runner, size in MB of what a client loads) for format `name`."""
    if name == ANCHOR:
        return _keras_runner(model), None
    fmt = formats.get_format(name)
    calibration = None
    if fmt.calibrated:
        from keras_resnet.serving import calibration as calibration_lib

        calibration = calibration_lib.calibration_images(
            flag_values.dataset, _data_dir(flag_values), image_size=image_size,
            count=flag_values.calibration_images, resize_size=resize_size)
    path = fmt.writer(model, os.path.join(work_dir, name + fmt.suffix), image_size=image_size,
                      class_ids=classes[0], class_names=classes[1], calibration=calibration,
                      resize_size=resize_size)
    if name == "saved_model":
        return _saved_model_runner(path), _size_mb(path)
    size = _size_mb(path)
    if name == "openvino":
        from keras_resnet.serving.openvino import weights_path
        size += _size_mb(weights_path(path))
    return formats.load_runner(path, flag_values.threads), size


def _data_dir(flag_values):
    from keras_resnet.serving.calibration import default_data_dir

    return default_data_dir(flag_values.dataset, flag_values.data_dir)


def _size_mb(path):
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path)
                   for f in fs) / 1e6
    return os.path.getsize(path) / 1e6


def machine():
    """One line naming the CPU, its core count and the library versions."""
    import importlib.metadata

    cpu = platform.processor() or "CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = []
    for package in ("tensorflow", "keras", "onnxruntime", "ai-edge-litert", "openvino"):
        try:
            versions.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return f"{cpu}, {os.cpu_count()} vCPUs; {', '.join(versions)}"


def main(flag_values, args):
    if bool(flag_values.model) == bool(flag_values.model_dir):
        raise cli.UsageError("pass exactly one of --model=FILE.keras or --model_dir=DIR.")
    for name in flag_values.formats:
        if name != ANCHOR and name not in formats.RUNNABLE:
            kind = "a weights-only file no runtime serves" if name in formats.FORMATS else "unknown"
            raise cli.UsageError(f"--formats: {name!r} is {kind}; valid: {ANCHOR}, "
                                 f"{', '.join(formats.RUNNABLE)}.")
    from keras_resnet.model import weights
    from keras_resnet.serving import export
    from pipelines import preprocessing

    path = flag_values.model or export.find_checkpoint(flag_values.model_dir)
    if not path or not os.path.isfile(path):
        print(f"error: no model at {flag_values.model or flag_values.model_dir}; train first or "
              "pass --model=FILE.keras.", file=sys.stderr)
        return 1
    try:
        model = weights.load_keras(path)
    except ValueError as e:
        return cli.fail(str(e))
    # A FixRes run evaluates (and exports) at its own --eval_resize_size / --eval_image_size.
    image_size, resize_size = export.eval_sizes(path, model, flag_values.image_size,
                                                flag_values.resize_size)
    if image_size is None:
        return cli.fail(f"{path} takes images of any size; pass --image_size.")
    fixed = model.inputs[0].shape[1]
    if fixed not in (None, image_size):
        return cli.fail(f"{path} takes {fixed} px images; --image_size={image_size} does not fit.")
    try:
        classes = export.load_classes_for(path, model.outputs[0].shape[-1])
    except ValueError as e:
        return cli.fail(str(e))
    data, pixels, labels = _validation(flag_values.dataset, _data_dir(flag_values), image_size,
                                       resize_size)
    print(f"# {machine()}")
    shorter = resize_size or preprocessing.eval_resize_size(image_size)
    print(f"# {path}: {len(labels)} validation images of {flag_values.dataset}, shorter side "
          f"{shorter}, center crop {image_size} px")
    with tempfile.TemporaryDirectory() as tmp:
        work_dir = flag_values.work_dir or tmp
        os.makedirs(work_dir, exist_ok=True)
        rows = []
        for name in flag_values.formats:
            print(f"{name}: exporting and measuring ...", file=sys.stderr, flush=True)
            try:
                run, size = _runner(name, model, work_dir, flag_values, image_size, classes,
                                    resize_size)
            except ImportError as e:  # a runtime extra that is not installed: say so, go on
                print(f"{name}: skipped: {e}", file=sys.stderr)
                continue
            inputs = data if name == "saved_model" else pixels
            p50, p99 = latency_ms(run, inputs, flag_values.latency_runs)
            rows.append((name, size, p50, p99,
                         throughput(run, inputs, flag_values.batch_size,
                                    flag_values.throughput_batches),
                         top1(run, inputs, labels, flag_values.batch_size)))
    print(table(rows, flag_values.batch_size))
    return 0


def table(rows, batch_size):
    """A Markdown table; the speed-up column is the anchor's p50 over each format's."""
    anchor = next((row[2] for row in rows if row[0] == ANCHOR), None)
    lines = [f"| format | MB | latency p50 ms | p99 ms | speed-up (p50) | batch-{batch_size} "
             "images/s | top-1 |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, size, p50, p99, per_second, accuracy in rows:
        size = "" if size is None else f"{size:.1f}"
        speed = f"{anchor / p50:.2f}x" if anchor else ""
        lines.append(f"| {name} | {size} | {p50:.2f} | {p99:.2f} | {speed} | {per_second:.0f} | "
                     f"{100 * accuracy:.1f}% |")
    return "\n".join(lines)


def run(argv=None):
    """The command with `argv` (without the program name; default: sys.argv); exit status."""
    return cli.run(define_flags, main, argv, prog="keras_resnet.deploy_benchmark", doc=__doc__)


if __name__ == "__main__":
    sys.exit(run())
