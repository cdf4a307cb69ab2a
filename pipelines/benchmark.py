"""Input-pipeline benchmark: images/s of the training pipeline over an ImageFolder of JPEGs.

    python -m pipelines.benchmark --data_dir=DIR [--batch_size=128] [--image_size=224]

Prints the JPEG decode alone (the ceiling on this machine), Keras's `image_dataset_from_directory`
path with comparable augmentation, and our training pipeline, each read through one iterator (as
training reads it) for a warm-up pass and `--passes` timed passes; the last line is
`images/s: <number>`. `--fake_images=N` first fills an empty DIR with N
ImageNet-sized JPEGs (about 500x375, 70-110 KiB).
"""

import dataclasses
import os
import statistics
import sys
import time

import numpy as np
from absl import flags

from keras_resnet import cli, logs

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")
FAKE_SIZE = (500, 375)  # (width, height) of a typical ImageNet photo
FAKE_QUALITY = 90
FAKE_CLASSES = 4


@dataclasses.dataclass(frozen=True)
class FolderSplit:
    """The fields of pipelines.sources.Split that pipelines.dataset reads."""

    files: np.ndarray
    labels: np.ndarray
    records: object = None
    num_examples: int = 0


def image_folder(data_dir: str) -> FolderSplit:
    """Class folders of images under data_dir, sorted: class i is the i-th folder name."""
    classes = sorted(d for d in os.listdir(data_dir) if os.path.isdir(os.path.join(data_dir, d)))
    files, labels = [], []
    for label, name in enumerate(classes):
        for f in sorted(os.listdir(os.path.join(data_dir, name))):
            if f.lower().endswith(IMAGE_EXTENSIONS):
                files.append(os.path.join(data_dir, name, f))
                labels.append(label)
    if not files:
        raise ValueError(f"no class folders of images under --data_dir={data_dir!r}; "
                         f"pass --fake_images=500 to generate some")
    return FolderSplit(np.array(files), np.array(labels, np.int64), None, len(files))


def write_fake_images(data_dir: str, num_images: int, seed: int = 0) -> None:
    """Smooth colour waves plus noise: compresses like photos (70-110 KiB at quality 90)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(num_images):
        folder = os.path.join(data_dir, f"class_{i % FAKE_CLASSES}")
        os.makedirs(folder, exist_ok=True)
        w, h = FAKE_SIZE if i % 3 else FAKE_SIZE[::-1]  # a third portrait, as in ImageNet
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        base, freq = rng.uniform(0, 255, 3), rng.uniform(0.005, 0.03, 3)
        rgb = np.stack([base[c] + 80 * np.sin(x * freq[c] + y * freq[(c + 1) % 3])
                        for c in range(3)], -1)
        rgb += rng.normal(0, 22, rgb.shape)
        Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(
            os.path.join(folder, f"fake_{i:06d}.JPEG"), quality=FAKE_QUALITY)


def images_per_second(ds, batches_per_pass: int, passes: int) -> float:
    """Median images/s over `passes` windows of `batches_per_pass` batches, read from one
    iterator after a warm-up window, as training reads its input.

    A fresh iterator per pass restarts tf.data's autotuner, which takes a second or two to raise
    the parallelism of the decode map: on 2 cores, passes of a couple of thousand images then
    land at either ~0.6x or 1x of the steady rate, depending on when it settles.
    """
    iterator = iter(ds)

    def window():
        start, n = time.perf_counter(), 0
        for _ in range(batches_per_pass):
            images, _ = next(iterator)
            n += int(images.shape[0])
        return n / (time.perf_counter() - start)

    window()
    return statistics.median(window() for _ in range(passes))


def decode_only(split: FolderSplit, batch_size: int):
    """Read + full JPEG decode, nothing else (the output is trimmed so batching costs nothing)."""
    import tensorflow as tf

    from pipelines import preprocessing

    ds = tf.data.Dataset.from_tensor_slices((split.files, split.labels)).repeat()
    ds = ds.map(lambda f, y: (preprocessing.decode_image(tf.io.read_file(f))[:1, :1], y),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def keras_pipeline(data_dir: str, batch_size: int, image_size: int):
    """Keras's own path: decode + resize every image, then random crop and flip per batch."""
    import keras
    import tensorflow as tf

    from pipelines import preprocessing

    resize = preprocessing.eval_resize_size(image_size)
    ds = keras.utils.image_dataset_from_directory(
        data_dir, image_size=(resize, resize), batch_size=batch_size, shuffle=True, seed=0,
        verbose=False)
    augment = keras.Sequential([keras.layers.RandomCrop(image_size, image_size),
                                keras.layers.RandomFlip("horizontal")])
    ds = ds.map(lambda x, y: (augment(x, training=True), y), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.repeat().prefetch(tf.data.AUTOTUNE)


def define_flags(values):
    flags.DEFINE_string("data_dir", None, "ImageFolder: class folders of JPEGs (required).",
                        flag_values=values)
    flags.DEFINE_integer("batch_size", 128, "Batch size.", flag_values=values)
    flags.DEFINE_integer("image_size", 224, "Training crop size in pixels.", flag_values=values)
    flags.DEFINE_integer("passes", 3, "Timed passes over the images, one iterator (median "
                         "reported).", flag_values=values)
    flags.DEFINE_integer("fake_images", 0, "First write this many fake JPEGs if data_dir has no "
                         "images.", flag_values=values)
    flags.DEFINE_bool("skip_keras", False, "Skip the Keras comparison.", flag_values=values)


def main(opts, args) -> int:
    if not opts.data_dir:
        raise cli.UsageError("--data_dir is required: a folder of class folders of images "
                             "(--fake_images=2000 fills an empty one)")
    data_dir = opts.data_dir
    if opts.fake_images and not (os.path.isdir(data_dir) and os.listdir(data_dir)):
        write_fake_images(data_dir, opts.fake_images)
    if not os.path.isdir(data_dir):
        raise cli.UsageError(f"--data_dir={data_dir!r} is not a directory; pass "
                             "--fake_images=2000 to generate ImageNet-sized JPEGs there")
    if os.path.isdir(os.path.join(data_dir, "train")):  # an ImageFolder root: use train/
        data_dir = os.path.join(data_dir, "train")
    try:
        split = image_folder(data_dir)
    except ValueError as e:
        raise cli.UsageError(str(e)) from None
    if split.num_examples < opts.batch_size:
        raise cli.UsageError(f"{split.num_examples} images do not fill one batch of "
                             f"--batch_size={opts.batch_size}; use more images or a smaller batch")
    logs.import_tensorflow()
    from pipelines import dataset

    print(f"{split.num_examples} images, batch {opts.batch_size}, size {opts.image_size}, "
          f"{os.cpu_count()} CPUs", flush=True)

    batches = split.num_examples // opts.batch_size
    rate = images_per_second(decode_only(split, opts.batch_size), batches, opts.passes)
    print(f"JPEG decode only (ceiling): {rate:.0f} images/s", flush=True)
    if not opts.skip_keras:
        keras_rate = images_per_second(
            keras_pipeline(data_dir, opts.batch_size, opts.image_size), batches, opts.passes)
        print(f"keras image_dataset_from_directory + RandomCrop/RandomFlip: "
              f"{keras_rate:.0f} images/s", flush=True)
    train = dataset.build_train_dataset(
        split, global_batch_size=opts.batch_size, image_size=opts.image_size, seed=0,
        num_epochs=opts.passes + 1)
    train_rate = images_per_second(train, batches, opts.passes)
    print(f"train pipeline: {train_rate / rate:.2f}x decode only"
          + ("" if opts.skip_keras else f", {train_rate / keras_rate:.2f}x keras"), flush=True)
    print(f"images/s: {train_rate:.0f}")
    return 0


def run(argv=None):
    """The command with `argv` (without the program name; default: sys.argv); exit status."""
    return cli.run(define_flags, main, argv, prog="pipelines.benchmark", doc=__doc__)


if __name__ == "__main__":
    sys.exit(run())
