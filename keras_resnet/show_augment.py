"""Write a PNG grid of augmented training images, with their (mixed) labels, for a recipe.

    python -m keras_resnet.show_augment --flagfile=configs/resnet_v2.flags --dataset=demo \
        --data_dir=data/demo --out=aug.png

Takes every training flag (so a preset's flag file works as it is) plus --out, --num_images and
--epoch. The images are the first global batch of that epoch, exactly as training sees them
(crop, flip, auto-augment, erasing, repeated augmentation, mixup / cutmix); each tile's title
names the classes with a weight of at least 1% in its label.
"""

import dataclasses
import os

from absl import flags

from keras_resnet import cli
from keras_resnet.training.config import Config

PROG = "keras_resnet.show_augment"
MIN_WEIGHT = 0.01  # label weights below this are left out of a tile's title


def define_flags(values):
    for field in dataclasses.fields(Config):
        default, name = field.default, field.name
        text = f"Training flag (see train_main.py --help); default {default!r}."
        if isinstance(default, bool):
            flags.DEFINE_bool(name, default, text, flag_values=values)
        elif isinstance(default, int):
            flags.DEFINE_integer(name, default, text, flag_values=values)
        elif isinstance(default, float):
            flags.DEFINE_float(name, default, text, flag_values=values)
        elif isinstance(default, tuple):
            flags.DEFINE_list(name, [str(v) for v in default], text, flag_values=values)
        else:
            flags.DEFINE_string(name, default, text, flag_values=values)
    flags.DEFINE_string("out", "augment.png", "The PNG to write (atomically).", flag_values=values)
    flags.DEFINE_integer("num_images", 16, "Images in the grid (one global batch).",
                         flag_values=values)
    flags.DEFINE_integer("epoch", 0, "Which epoch's first batch to show (0-based).",
                         flag_values=values)


def label_text(weights, class_names):
    """'name 0.62 + other 0.38' for a soft label (or 'name' for a one-hot one)."""
    import numpy as np

    order = [int(i) for i in np.argsort(-weights) if weights[i] >= MIN_WEIGHT]
    if len(order) == 1:
        return class_names[order[0]]
    return " + ".join(f"{class_names[i]} {weights[i]:.2f}" for i in order)


def augmented_batch(config, num_images, epoch):
    """(uint8 images [N, S, S, 3], float soft labels [N, C], class names) of training."""
    import numpy as np
    import tensorflow as tf

    from keras_resnet.training import recipe
    from pipelines import dataset as ds_lib
    from pipelines import sources

    source = sources.load_source(config.dataset, config.resolved_data_dir,
                                 screen=config.check_images, write_index=False)
    num_classes = len(source.class_ids)
    ds = ds_lib.build_train_dataset(
        source.train, global_batch_size=num_images, seed=config.seed, start_epoch=epoch,
        deterministic=True, **recipe.train_dataset_options(config, num_classes))
    images, labels = next(iter(ds))
    labels = labels.numpy()
    if labels.ndim == 1:
        labels = tf.one_hot(labels, num_classes).numpy()
    names = [n.split(",")[0] for n in source.class_names]
    return np.asarray(images), labels, names


def write_grid(images, labels, class_names, path, title=""):
    """A grid of the images titled with their labels, as a PNG written atomically."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from keras_resnet.files import atomic_path

    columns = min(len(images), 4)
    rows = math.ceil(len(images) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, label in zip(axes.flat, images, labels, strict=False):
        ax.imshow(image)
        ax.set_title(label_text(label, class_names), fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path


def main(flag_values, args):
    names = {f.name for f in dataclasses.fields(Config)}
    try:
        config = Config(**{n: flag_values[n].value for n in names}).validate()
    except ValueError as e:
        raise cli.UsageError(str(e)) from None
    if flag_values.num_images < 1:
        raise cli.UsageError(f"--num_images={flag_values.num_images}; use >= 1.")
    if config.dataset == "synthetic":
        raise cli.UsageError("--dataset=synthetic has no images to show; use demo or imagenet.")
    from pipelines.layout import DataError

    try:
        images, labels, class_names = augmented_batch(config, flag_values.num_images,
                                                      flag_values.epoch)
    except DataError as e:
        print(f"error: {e}")
        return 1
    # The augmentation part of the recipe block (train crop onwards), the parts that are on.
    title = "; ".join(" ".join(line.split()) for line in config.recipe_lines()[7:]
                      if not line.endswith("off"))
    os.makedirs(os.path.dirname(os.path.abspath(flag_values.out)), exist_ok=True)
    print(write_grid(images, labels, class_names, flag_values.out, title=title[:200]))
    return 0


def run(argv=None):
    return cli.run(define_flags, main, argv, prog=PROG, doc=__doc__)


if __name__ == "__main__":
    raise SystemExit(run())
