"""The data stage of a run: the dataset's `Source`, its classes and epoch length (`Data`), and the
distributed tf.data pipelines `fit` reads, with their `--cache` files."""

import contextlib
import dataclasses
import glob
import os

from absl import logging

from keras_resnet.training import recipe
from pipelines import dataset as ds_lib
from pipelines import preprocessing

SYNTHETIC_EXAMPLES = 1281167  # ImageNet's training split, for a realistic epoch length


class UserError(Exception):
    """A problem the user can fix; train_main prints it as one line."""


@dataclasses.dataclass(frozen=True)
class Data:
    """What the rest of a run needs to know about its dataset."""

    source: object  # pipelines.sources.Source (no splits for --dataset=synthetic)
    class_ids: list
    class_names: list
    steps_per_epoch: int  # training steps per epoch (capped by --steps_per_epoch)

    @property
    def num_classes(self):
        return len(self.class_ids)


def load_data(config, writer=True):
    """The `Data` of `config`: its source (indexed and screened), classes and epoch length.
    Only a `writer` (the chief) caches the file index it builds."""
    from pipelines import sources

    if config.dataset == "synthetic":  # classes only; the tensors come from synthetic_dataset
        source = sources.load_source("synthetic", "")
        return Data(source, source.class_ids, source.class_names,
                    _steps_per_epoch(config, SYNTHETIC_EXAMPLES))
    try:
        source = sources.load_source(config.dataset, config.resolved_data_dir,
                                     screen=config.check_images, write_index=writer)
    except sources.DataError as e:
        raise UserError(str(e)) from None
    if source.train is None or source.train.num_examples == 0:
        raise UserError(f"No training images found for --dataset={config.dataset} under "
                        f"{config.resolved_data_dir or 'the TFDS data dir'}.")
    if len(source.class_ids) < 2:
        # A softmax over one class is always 1: nothing to learn, every metric 100%.
        raise UserError(f"--dataset={config.dataset} under "
                        f"{config.resolved_data_dir or 'the TFDS data dir'} has "
                        f"{len(source.class_ids)} class ({', '.join(source.class_ids)}); a "
                        "classifier needs at least 2: "
                        + ("add a folder per class under train/." if config.resolved_data_dir
                           else "use a dataset with several classes."))
    if config.repeated_aug > 1 and not ds_lib.has_files(source.train):
        raise UserError(f"--repeated_aug={config.repeated_aug} needs a dataset of image files "
                        f"(its copies come from the file permutation); --dataset="
                        f"{config.dataset} is read as records: use --repeated_aug=1, or train "
                        "on the image folders (--dataset=imagenet).")
    logging.info("Dataset %s: %d classes, %d train, %d val images.", source.name,
                 len(source.class_ids), source.train.num_examples,
                 source.val.num_examples if source.val else 0)
    return Data(source, list(source.class_ids), list(source.class_names),
                _steps_per_epoch(config, source.train.num_examples))


def _steps_per_epoch(config, num_train):
    steps = ds_lib.steps_per_epoch(num_train, config.batch_size)
    if steps == 0:
        raise UserError(f"--batch_size={config.batch_size} is larger than the training split "
                        f"({num_train} images); use a smaller batch.")
    return min(steps, config.steps_per_epoch) if config.steps_per_epoch else steps


def write_skipped_report(data, model_dir):
    """skipped_files.tsv in model_dir, and a warning with the count of files left out."""
    from pipelines import sources

    report = sources.write_skipped_report(data.source, model_dir)
    if data.source.skipped:
        logging.warning("Left out %d files or folders (each with its reason in %s).",
                        len(data.source.skipped), report)


def train_dataset(config, data, strategy, start_epoch, num_epochs, skip_steps):
    """The distributed training dataset for epochs [start_epoch, start_epoch + num_epochs), the
    first of them without its first `skip_steps` batches (exact resume)."""
    if data.source.train is None:  # --dataset=synthetic
        def synthetic_fn(ctx):
            return ds_lib.synthetic_dataset(
                batch_size=ctx.get_per_replica_batch_size(config.batch_size),
                image_size=config.resolved_train_image_size, num_classes=data.num_classes,
                seed=config.seed)
        return strategy.distribute_datasets_from_function(synthetic_fn)

    split = data.source.train
    cache = train_cache(config, data.source)

    def train_fn(ctx):
        return ds_lib.build_train_dataset(
            split, global_batch_size=config.batch_size,
            **recipe.train_dataset_options(config, data.num_classes),
            seed=config.seed, start_epoch=start_epoch, num_epochs=num_epochs,
            skip_steps=skip_steps, input_context=ctx, deterministic=config.deterministic,
            cache=cache_path(cache, ctx, split, "train"),
            data_service=config.tf_data_service or None,
            max_steps_per_epoch=data.steps_per_epoch)

    return strategy.distribute_datasets_from_function(train_fn)


def validation_dataset(config, data, strategy):
    """(distributed validation dataset, validation steps for `fit`); (None, None) without a
    validation split. Steps are None (a pass to the end of the data) on one replica."""
    source = data.source
    if source.val is None or not source.val.num_examples:
        return None, None
    several = strategy.num_replicas_in_sync > 1
    val_steps = None
    if several:
        # build_eval_dataset pads a pass to whole global steps. Keras is told their number and
        # reads the pass repeated, one pass per epoch: its own end-of-data handling of a
        # distributed dataset under MirroredStrategy miscounts the last step.
        val_steps = config.validation_steps or ds_lib.eval_steps(source.val.num_examples,
                                                                 config.batch_size)

    def val_fn(ctx):
        val = ds_lib.build_eval_dataset(
            source.val, global_batch_size=config.batch_size, **recipe.eval_dataset_options(config),
            input_context=ctx,
            # The cached pixels depend on the crop (and a non-default resize) size, on the JPEG
            # decoder and on the cut of very long images: a cache written with another IDCT or
            # bound must not be read back.
            cache=cache_path(config.cache, ctx, source.val, "val", config.resolved_eval_image_size,
                             *([config.eval_resize_size] if config.eval_resize_size else []),
                             preprocessing.JPEG_DCT, preprocessing.EVAL_MAX_ASPECT))
        if several:  # elements are per-replica batches; a step takes one per local replica
            local = ctx.num_replicas_in_sync // ctx.num_input_pipelines
            return val.take(val_steps * local).repeat()
        return val.take(config.validation_steps) if config.validation_steps else val

    return strategy.distribute_datasets_from_function(val_fn), val_steps


def train_cache(config, source):
    """--cache for the training files, or None when their encoded bytes would not fit (then only
    the validation images are cached)."""
    if not config.cache:
        return None
    size = ds_lib.encoded_bytes_estimate(source.train)
    if size > ds_lib.CACHE_MAX_BYTES:
        logging.warning("--cache: the training files hold about %.1f GiB (over the %.0f GiB "
                        "limit for encoded images in memory); caching the validation images "
                        "only.", size / 2**30, ds_lib.CACHE_MAX_BYTES / 2**30)
        return None
    return config.cache


def cache_path(cache, ctx, split, name, *extra):
    """--cache for one input pipeline: None, "memory", or a file path of its own per split, file
    list (+ `extra`, such as the image size of cached pixels) and pipeline: workers sharing a file
    system must not write one cache file, and a cache of other files must never be read back."""
    if not cache or cache == "memory":
        return cache or None
    os.makedirs(os.path.dirname(os.path.abspath(cache)), exist_ok=True)
    path = (f"{cache}.{name}-{ds_lib.split_fingerprint(split, *extra)}."
            f"pipeline{ctx.input_pipeline_id}-of-{ctx.num_input_pipelines}")
    _remove_unfinished_cache(path)
    return path


def _remove_unfinished_cache(path):
    """Deletes what a killed run left of a tf.data cache file that it had not finished writing.

    tf.data writes `<path>_<n>.lockfile` and temporary shards, and `<path>.index` last; its lock
    file would otherwise stop every later run ("a concurrent caching iterator"). Each cache path
    belongs to one input pipeline of one run (see `cache_path`), so a lock found before the run
    starts is stale.
    """
    if os.path.exists(path + ".index"):
        return
    leftovers = glob.glob(glob.escape(path) + "_*.lockfile") + glob.glob(
        glob.escape(path) + "_*.data-*")
    if leftovers:
        logging.warning("--cache: removing the unfinished cache %s_* of an interrupted run.", path)
    for leftover in leftovers:
        with contextlib.suppress(FileNotFoundError):
            os.remove(leftover)
