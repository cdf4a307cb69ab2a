"""Top-1 / top-5 of weights on a validation split: any weights file, a run or a SavedModel.

    python -m keras_resnet.evaluate --weights=resnet50-11ad3fa6.pth --data_dir=data/imagenet \\
        --json=eval.json
    python -m keras_resnet.evaluate --weights=runs/resnet18_demo --dataset=demo --image_size=64
    python -m keras_resnet.evaluate --weights=r50.safetensors --protocol=ten_crop
    python -m keras_resnet.evaluate --weights=saved_models/resnet18_demo --dataset=demo
                                    # a SavedModel export (its newest version), at its own sizes

Weights: .pth/.pt (torch.save, read without running pickled code), .safetensors, .keras, a
training directory (its latest checkpoint) or a SavedModel export. The architecture (depth, conv
biases, classes) is read from the file; v1 and v1.5 cannot be told apart from shapes (--variant).
Protocols: center_crop (--resize_size, --crop_size; default crop = --image_size, resize =
crop * 256/224; given no size, a SavedModel is evaluated at the sizes it was exported with and a
run directory or its .keras file at the run's evaluation sizes), ten_crop, full_image. A model
that records its classes (a SavedModel, a run's classes.json) must have the dataset's; validation
files that do not decode are left out and counted. The library is `keras_resnet.serving.evaluate`.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

from absl import flags  # noqa: E402

from keras_resnet import cli  # noqa: E402

PROTOCOLS = ("center_crop", "ten_crop", "full_image")


def define_flags(values):
    flags.DEFINE_string("weights", None, "Weights file, training directory or SavedModel export.",
                        flag_values=values)
    flags.DEFINE_string("dataset", "imagenet", "imagenet (Kaggle or ImageFolder layout at "
                        "--data_dir), demo or tfds:NAME.", flag_values=values)
    flags.DEFINE_string("data_dir", "", "Where the dataset lies (default: data/imagenet, "
                        "data/demo).", flag_values=values)
    flags.DEFINE_integer("depth", None, "Expected depth (default: read from the file).",
                         flag_values=values)
    flags.DEFINE_enum("variant", None, ["v1", "v1.5"], "Bottleneck variant (default: v1.5, or "
                      "what our own file records).", flag_values=values)
    flags.DEFINE_integer("image_size", 224, "Evaluation crop size (not given: a SavedModel's or "
                         "a run's own, else 224).", flag_values=values)
    flags.DEFINE_enum("protocol", "center_crop", list(PROTOCOLS), "Evaluation protocol.",
                      flag_values=values)
    flags.DEFINE_integer("crop_size", None, "Crop size (default --image_size; FixRes: larger "
                         "than the training size).", flag_values=values)
    flags.DEFINE_integer("resize_size", None, "Shorter side before cropping (default crop * "
                         "256/224; full_image: the crop size).", flag_values=values)
    flags.DEFINE_integer("batch_size", 64, "Images per step.", flag_values=values)
    flags.DEFINE_enum("distribution", "auto", ["auto", "one_device", "mirrored"],
                      "auto: all local GPUs (mirrored), else one device.", flag_values=values)
    flags.DEFINE_string("json", None, "Write the result here as JSON (atomically).",
                        flag_values=values)


def main(flag_values, args):
    if not flag_values.weights:
        raise cli.UsageError("--weights is required, e.g. --weights=resnet50.pth.")
    if flag_values.batch_size < 1:
        raise cli.UsageError(f"--batch_size={flag_values.batch_size}; use a positive integer.")
    from keras_resnet import logs

    logs.import_tensorflow()  # before any TensorFlow import: without its start-up noise
    from keras_resnet.model.errors import WeightsError
    from keras_resnet.serving import evaluate
    from pipelines import sources

    try:
        protocol = evaluate.Protocol.make(flag_values.protocol, flag_values.image_size,
                                          crop_size=flag_values.crop_size,
                                          resize_size=flag_values.resize_size)
        data_dir = flag_values.data_dir or {"imagenet": "data/imagenet", "demo": "data/demo"}.get(
            flag_values.dataset, "")
        source = sources.load_source(flag_values.dataset, data_dir)
        if source.val is None or not source.val.num_examples:
            return cli.fail(f"no validation images for --dataset={flag_values.dataset} in {data_dir}.")
        strategy = _strategy(flag_values.distribution)
        if protocol.name == "full_image" and strategy.num_replicas_in_sync > 1:
            return cli.fail("--protocol=full_image runs one image at a time; use "
                         "--distribution=one_device.")
        result = evaluate.evaluate_path(
            flag_values.weights, source.val, protocol, batch_size=flag_values.batch_size,
            depth=flag_values.depth, variant=flag_values.variant,
            num_classes=source.num_classes, class_ids=source.class_ids, strategy=strategy,
            sizes_given=any(not flag_values[name].using_default_value
                            for name in ("image_size", "crop_size", "resize_size")))
    except (WeightsError, sources.DataError, ValueError, OSError) as e:
        return cli.fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    result["dataset"] = flag_values.dataset
    # Files the listing of the validation folder left out (no label, unreadable, ...): the
    # numbers above are over the others.
    left_out = source.skipped_in("val")
    result["left_out"] = len(left_out)
    print(evaluate.format_table([result]))
    if result["skipped"]:
        print(f"{result['skipped']} of {result['skipped'] + result['images']} validation "
              "images could not be decoded and were left out.", file=sys.stderr)
    if left_out:
        path, reason = left_out[0]
        entries = f"{len(left_out)} {'entry' if len(left_out) == 1 else 'entries'}"
        print(f"{entries} of the validation folder left out when it was listed (the first: "
              f"{path}: {reason}); the numbers are over the "
              f"{result['images']} images evaluated.", file=sys.stderr)
    if flag_values.json:
        from keras_resnet.files import write_json_atomic

        write_json_atomic(flag_values.json, result)
    return 0


def _strategy(distribution):
    import tensorflow as tf

    if distribution == "mirrored" or (distribution == "auto"
                                      and len(tf.config.list_physical_devices("GPU")) > 1):
        return tf.distribute.MirroredStrategy()
    gpus = tf.config.list_logical_devices("GPU")
    return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")


def run(argv=None):
    """The command with `argv` (without the program name; default: sys.argv); exit status."""
    return cli.run(define_flags, main, argv, prog="keras_resnet.evaluate", doc=__doc__)


if __name__ == "__main__":
    sys.exit(run())
