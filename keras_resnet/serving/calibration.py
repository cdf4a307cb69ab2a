"""Calibration images for post-training int8 quantization: a fixed random sample of the training
split, preprocessed exactly as a deployed model's input (evaluation resize and center crop).

The validation split is never used: it measures the quantized model's accuracy.
"""

from __future__ import annotations

import sys

import numpy as np


def default_data_dir(dataset, data_dir=None):
    """`data_dir`, else the dataset's default as training uses it (data/imagenet, data/demo)."""
    return data_dir or {"imagenet": "data/imagenet", "demo": "data/demo"}.get(dataset, "")


def sample_files(files, count, seed=0):
    """`count` paths drawn from `files` without replacement, the same for the same seed."""
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(files), size=min(count, len(files)), replace=False)
    return [files[i] for i in np.sort(picks)]


def calibration_images(dataset, data_dir, *, image_size, count, seed=0, resize_size=0):
    """A zero-argument callable yielding `count` float32 [1, S, S, 3] images (RGB 0..255) of the
    training split of `dataset` (as `pipelines.sources.load_source` names it), resized and cropped
    as the served model's input: shorter side to `resize_size` (0: the 256/224 rule), then S."""
    import tensorflow as tf

    from pipelines.preprocessing import preprocess_for_eval
    from pipelines.sources import load_source

    if count < 1:
        raise ValueError(f"--calibration_images must be >= 1. Received: {count}.")
    split = load_source(dataset, data_dir).train
    if split is None or not split.num_examples:
        raise ValueError(f"--dataset={dataset} has no training split to calibrate on; pass a "
                         "dataset with training images (e.g. --dataset=imagenet --data_dir=...).")
    if split.files is not None:
        chosen = sample_files(split.files, count, seed)
        records = tf.data.Dataset.from_tensor_slices(chosen).map(tf.io.read_file)
    else:  # TFDS: its training split is shuffled when written; take a shuffled window of it
        records = split.records().map(lambda image, label: image).shuffle(
            4 * count, seed=seed).take(count)

    def images():
        done = failed = 0
        for image_bytes in records:
            try:
                pixels = preprocess_for_eval(image_bytes, image_size, resize_size=resize_size)
            except tf.errors.InvalidArgumentError:  # passed the start-up check, does not decode
                failed += 1
                continue
            yield tf.cast(pixels, tf.float32)[None].numpy()
            done += 1
            if done % 50 == 0:
                print(f"calibration: {done} images", file=sys.stderr, flush=True)
        left_out = f" ({failed} that did not decode left out)" if failed else ""
        print(f"calibration: {done} training images{left_out}", file=sys.stderr, flush=True)
        if not done:
            raise ValueError("no calibration image could be decoded; check the training images "
                             "(--check_images=decode lists the broken ones).")

    return images
