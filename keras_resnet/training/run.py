"""`train_and_evaluate(config)`: strategy, data, model, `model.fit`, checkpoints, export, results."""

import contextlib
import glob
import json
import os
import signal
import sys
import time
import warnings

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from keras_resnet.files import atomic_path, read_json, write_json_atomic
from keras_resnet.model.resnet import build_resnet
from keras_resnet.training import checkpoint as ckpt_lib
from keras_resnet.training import distribute
from keras_resnet.training import recipe
from keras_resnet.training.optim import (SparseCrossentropy, WarmupSchedule, accuracy_metrics,
                                         apply_norm_weight_decay)

RESULTS_JSON = "results.json"
HISTORY_CSV = "history.csv"
CURVES_PNG = "curves.png"
SYNTHETIC_CLASSES = 1000
SYNTHETIC_EXAMPLES = 1281167  # ImageNet's training split, for a realistic epoch length


# Keras warns once per fit when it learns the length of the (finite) validation set by running
# out of it; training itself always runs on an exact number of steps.
warnings.filterwarnings("ignore", message="Your input ran out of data")


class UserError(Exception):
    """A problem the user can fix; train_main prints it as one line."""


class Interrupted(Exception):
    """Training stopped on a signal (or a peer worker's) after saving a checkpoint: the run is
    not finished. `exit_status` is the shell's 128 + signal number (SIGTERM: 143, SIGINT: 130),
    so schedulers that restart failed jobs restart it, and `train && export` stops."""

    def __init__(self, message, signal_name):
        super().__init__(message)
        number = getattr(signal.Signals, signal_name or "", signal.SIGTERM)
        self.exit_status = 128 + int(number)


def make_model(config, num_classes):
    """The network for `config`: uint8 RGB in, float32 probabilities out."""
    model = build_resnet(
        config.depth,
        num_classes=num_classes,
        input_shape=recipe.model_input_shape(config),
        dropout=config.dropout,
        l2=config.l2,
        l1=config.l1,
        zero_init_residual=config.zero_init_residual,
        variant=config.variant,
        conv_bias=config.conv_bias,
        include_preprocessing=True,
    )
    apply_norm_weight_decay(model, config.norm_weight_decay)
    return model


def summarize(config, num_classes=1000):
    """`--summary`: model.summary(), parameter counts, MACs and a memory estimate. Needs no data."""
    from keras_resnet.model import stats

    model = make_model(config, num_classes)
    lines = []
    model.summary(print_fn=lambda line, **kwargs: lines.append(line))
    lines.append(stats.format_summary(model, batch_size=config.batch_size,
                                      gpu_memory_gib=config.gpu_memory_gib))
    return "\n".join(lines)


def _schedule(config, steps_per_epoch):
    total = config.epochs * steps_per_epoch
    return WarmupSchedule(
        peak_lr=config.learning_rate,
        total_steps=total,
        warmup_steps=round(config.warmup_epochs_for_run() * steps_per_epoch),
        kind=config.lr_schedule,
        boundaries=[e * steps_per_epoch for e in config.step_decay_epochs],
    )


def _compile(model, config, num_classes, steps_per_epoch):
    optimizer = keras.optimizers.SGD(learning_rate=_schedule(config, steps_per_epoch),
                                     momentum=config.momentum, nesterov=config.nesterov)
    jit = distribute.choose_jit_compile(config.jit_compile, tf.distribute.get_strategy(),
                                       config.deterministic)
    model.compile(
        optimizer=optimizer,
        loss=SparseCrossentropy(num_classes, label_smoothing=config.label_smoothing),
        # Weighted: the weight-0 padding of multi-replica evaluation does not count (Keras
        # ignores sample weights in `metrics`). Training has no weights: plain accuracy.
        weighted_metrics=accuracy_metrics(recipe.uses_soft_labels(config)),
        jit_compile=jit,
    )
    return model.optimizer  # LossScaleOptimizer under mixed_float16


class ThroughputLogger(keras.callbacks.Callback):
    """Adds `images_per_sec` (training steps only, not validation) and `learning_rate` to logs."""

    def __init__(self, global_batch_size):
        super().__init__()
        self.global_batch_size = global_batch_size
        self.train_images_per_sec = []

    def on_epoch_begin(self, epoch, logs=None):
        self._steps, self._start, self._elapsed = 0, time.perf_counter(), 0.0

    def on_train_batch_begin(self, batch, logs=None):
        if self._steps == 1:  # the first step of a fit call includes tracing: leave it out
            self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self._steps += 1
        if self._steps > 1:
            self._elapsed = time.perf_counter() - self._start

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        timed = self._steps - 1
        rate = timed * self.global_batch_size / self._elapsed if timed > 0 and self._elapsed else 0.0
        self.train_images_per_sec.append(rate)
        logs["images_per_sec"] = rate
        # With a schedule, `optimizer.learning_rate` is the rate at the current step.
        logs["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        logging.info("Epoch %d: %.1f images/s, learning rate %.5f", epoch + 1, rate,
                     logs["learning_rate"])


class ProgressLog(keras.callbacks.Callback):
    """Progress for output that is not a terminal (a log file, a batch job), where Keras's bar
    would print a line per step: a line every `every_secs` seconds and one per epoch."""

    def __init__(self, steps_per_epoch, epochs, global_batch_size, every_secs):
        super().__init__()
        self.steps_per_epoch, self.epochs = steps_per_epoch, epochs
        self.global_batch_size, self.every_secs = global_batch_size, every_secs
        self.step_offset = 0  # steps of the epoch done before this fit call (a resumed epoch)

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch, self._done = epoch, 0
        self._start = self._last = time.monotonic()

    def on_train_batch_end(self, batch, logs=None):
        self._done = batch + 1
        now = time.monotonic()
        if not self.every_secs or now - self._last < self.every_secs:
            return
        self._last = now
        step, elapsed = self.step_offset + self._done, now - self._start
        eta = (self.steps_per_epoch - step) * elapsed / self._done
        print(f"epoch {self._epoch + 1}/{self.epochs} step {step}/{self.steps_per_epoch} "
              f"{_metrics(logs)}, {self._done * self.global_batch_size / elapsed:.1f} images/s, "
              f"epoch ends in {_duration(eta)}", flush=True)

    def on_epoch_end(self, epoch, logs=None):
        print(f"epoch {epoch + 1}/{self.epochs} done in "
              f"{_duration(time.monotonic() - self._start)}: {_metrics(logs)}", flush=True)


def _metrics(logs):
    return " ".join(f"{k} {float(v):.4g}" for k, v in (logs or {}).items() if np.size(v) == 1)


def _duration(seconds):
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}"


def _load_data(config):
    """The Source (None for synthetic) and the number of classes; DataError -> UserError."""
    if config.dataset == "synthetic":
        return None, SYNTHETIC_CLASSES
    from pipelines import sources

    try:
        source = sources.load_source(config.dataset, config.resolved_data_dir,
                                     screen=config.check_images)
    except sources.DataError as e:
        raise UserError(str(e)) from None
    if source.train is None or source.train.num_examples == 0:
        raise UserError(f"No training images found for --dataset={config.dataset} under "
                        f"{config.resolved_data_dir or 'the TFDS data dir'}.")
    logging.info("Dataset %s: %d classes, %d train, %d val images.", source.name,
                 len(source.class_ids), source.train.num_examples,
                 source.val.num_examples if source.val else 0)
    return source, len(source.class_ids)


def _cache_for(cache, ctx, split, name, *extra):
    """--cache for one input pipeline: None, "memory", or a file path of its own per split, file
    list (+ `extra`, such as the image size of cached pixels) and pipeline: workers sharing a file
    system must not write one cache file, and a cache of other files must never be read back."""
    from pipelines import dataset as ds_lib

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
    belongs to one input pipeline of one run (see `_cache_for`), so a lock found before the run
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


def _train_cache(config, source):
    """--cache for the training files, or None when their encoded bytes would not fit (then only
    the validation images are cached)."""
    from pipelines import dataset as ds_lib

    if not config.cache:
        return None
    size = ds_lib.encoded_bytes_estimate(source.train)
    if size > ds_lib.CACHE_MAX_BYTES:
        logging.warning("--cache: the training files hold about %.1f GiB (over the %.0f GiB "
                        "limit for encoded images in memory); caching the validation images "
                        "only.", size / 2**30, ds_lib.CACHE_MAX_BYTES / 2**30)
        return None
    return config.cache


def _datasets(config, source, num_classes, strategy, steps_per_epoch, start_epoch, skip_steps,
              num_epochs):
    """Distributed train dataset for epochs [start_epoch, start_epoch + num_epochs), val, and the
    validation steps to pass to `fit` (None: a pass until the end of val)."""
    from pipelines import dataset as ds_lib

    if source is None:
        def train_fn(ctx):
            return ds_lib.synthetic_dataset(
                batch_size=ctx.get_per_replica_batch_size(config.batch_size),
                image_size=config.resolved_train_image_size, num_classes=num_classes,
                seed=config.seed)
        return strategy.distribute_datasets_from_function(train_fn), None, None

    train_cache = _train_cache(config, source)

    def train_fn(ctx):
        return ds_lib.build_train_dataset(
            source.train, global_batch_size=config.batch_size,
            **recipe.train_dataset_options(config, num_classes), seed=config.seed, start_epoch=start_epoch, num_epochs=num_epochs,
            skip_steps=skip_steps, input_context=ctx, deterministic=config.deterministic,
            cache=_cache_for(train_cache, ctx, source.train, "train"), data_service=config.tf_data_service or None,
            max_steps_per_epoch=steps_per_epoch)

    train = strategy.distribute_datasets_from_function(train_fn)
    val = val_steps = None
    if source.val is not None and source.val.num_examples:
        several = strategy.num_replicas_in_sync > 1
        if several:
            # build_eval_dataset pads a pass to whole global steps. Keras is told their number
            # and reads the pass repeated, one pass per epoch: its own end-of-data handling of a
            # distributed dataset under MirroredStrategy miscounts the last step.
            val_steps = config.validation_steps or ds_lib.eval_steps(source.val.num_examples,
                                                                     config.batch_size)

        def val_fn(ctx):
            val = ds_lib.build_eval_dataset(
                source.val, global_batch_size=config.batch_size,
                **recipe.eval_dataset_options(config), input_context=ctx,
                cache=_cache_for(config.cache, ctx, source.val, "val",
                                 config.resolved_eval_image_size,
                                 config.resolved_eval_resize_size))
            if several:  # elements are per-replica batches; a step takes one per local replica
                local = ctx.num_replicas_in_sync // ctx.num_input_pipelines
                return val.take(val_steps * local).repeat()
            return val.take(config.validation_steps) if config.validation_steps else val
        val = strategy.distribute_datasets_from_function(val_fn)
    return train, val, val_steps


def _steps_per_epoch(config, source):
    from pipelines import dataset as ds_lib

    num_train = source.train.num_examples if source else SYNTHETIC_EXAMPLES
    steps = ds_lib.steps_per_epoch(num_train, config.batch_size)
    if steps == 0:
        raise UserError(f"--batch_size={config.batch_size} is larger than the training split "
                        f"({num_train} images); use a smaller batch.")
    return min(steps, config.steps_per_epoch) if config.steps_per_epoch else steps


def _callbacks(model_dir, writer, checkpoint_cb, throughput):
    callbacks = [keras.callbacks.TerminateOnNaN(), throughput, checkpoint_cb]
    if writer:
        callbacks += [
            keras.callbacks.CSVLogger(os.path.join(model_dir, HISTORY_CSV), append=True),
            keras.callbacks.TensorBoard(os.path.join(model_dir, "logs"), update_freq="epoch"),
        ]
    return callbacks


class _StopAfterEpoch(keras.callbacks.Callback):
    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch >= self.epoch:
            self.model.stop_training = True


def _progress(config, steps_per_epoch):
    """(Keras fit verbosity, extra callbacks): with --verbose=auto, Keras's bar on a terminal,
    else ProgressLog's lines (Keras would print a bar line per step into a file)."""
    if config.verbose != "auto":
        return int(config.verbose), []
    if sys.stdout.isatty():
        return 1, []
    return 0, [ProgressLog(steps_per_epoch, config.epochs, config.batch_size,
                           config.progress_every_secs)]


def train_and_evaluate(config):
    """Trains `config`, resuming from `model_dir` when it holds a checkpoint; returns results."""
    config.validate()
    try:
        strategy = distribute.make_strategy(config.distribution, config.tpu)
    except distribute.ClusterError as e:
        raise UserError(str(e)) from None
    if config.batch_size % strategy.num_replicas_in_sync:
        raise UserError(f"--batch_size={config.batch_size} does not divide evenly over "
                        f"{strategy.num_replicas_in_sync} replicas; use a multiple of it.")
    if config.deterministic:
        keras.utils.set_random_seed(config.seed)
        tf.config.experimental.enable_op_determinism()
    else:
        keras.utils.set_random_seed(config.seed)
    recipe.log_recipe(config)
    policy = distribute.choose_precision(config.mixed_precision, strategy)
    keras.mixed_precision.set_global_policy(policy)

    writer = distribute.is_chief()
    model_dir = config.resolved_model_dir
    source, num_classes = _load_data(config)
    steps_per_epoch = _steps_per_epoch(config, source)
    if writer:
        os.makedirs(model_dir, exist_ok=True)
    if writer and source is not None:
        from pipelines import sources

        report = sources.write_skipped_report(source, model_dir)
        if source.skipped:
            logging.warning("Left out %d files or folders (each with its reason in %s).",
                            len(source.skipped), report)

    identity = {"depth": config.depth, "variant": config.variant, "conv_bias": config.conv_bias,
                "num_classes": num_classes, "batch_size": config.batch_size}
    with strategy.scope():
        model = make_model(config, num_classes)
        optimizer = _compile(model, config, num_classes, steps_per_epoch)
        ema = recipe.make_ema(config, model)
        ckpt = ckpt_lib.TrainingCheckpoint(model, optimizer,
                                           os.path.join(model_dir, ckpt_lib.CHECKPOINT_SUBDIR),
                                           keep=config.keep_checkpoints, write=writer,
                                           extra=ema.trackables() if ema else None)
        try:
            if writer:
                ckpt_lib.check_run_identity(model_dir, identity)
            start_epoch, start_step = ckpt.restore()
        except ckpt_lib.CheckpointMismatchError as e:
            raise UserError(str(e)) from None
    if writer:
        write_json_atomic(os.path.join(model_dir, "config.json"), config.to_dict())
    if start_step >= steps_per_epoch:  # a checkpoint of a longer epoch setting; start next epoch
        start_epoch, start_step = start_epoch + 1, 0
    previous = read_json(os.path.join(model_dir, RESULTS_JSON))
    if start_epoch >= config.epochs and previous is not None:
        print(f"{model_dir} already holds a finished run of {config.epochs} epochs: "
              f"{json.dumps(previous)}\nRaise --epochs to train further.", flush=True)
        return previous
    if start_epoch or start_step:
        logging.info("Resumed from %s (global step %d).",
                     tf.train.latest_checkpoint(ckpt.restore_directory),
                     int(optimizer.iterations.numpy()))
        print(f"Resuming at epoch {start_epoch + 1}/{config.epochs}, step "
              f"{start_step}/{steps_per_epoch}.", flush=True)

    throughput = ThroughputLogger(config.batch_size)
    from keras_resnet.training import replicas

    multi = isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
    with ckpt_lib.StopRequest() as stop:
        checkpoint_cb = ckpt_lib.CheckpointCallback(
            ckpt, steps_per_epoch, config.checkpoint_every_steps, config.checkpoint_every_secs,
            model_dir, stop, write=writer,
            agree=replicas.any_worker(strategy) if multi else None,
            monitor="val_top1_ema" if ema else "val_top1",
            best_weights=ema.swapped if ema else None)
        callbacks = _callbacks(model_dir, writer, checkpoint_cb, throughput)
        ema_cb = recipe.ema_lib.EMACallback(ema) if ema else None
        if ema_cb:  # before the checkpoint callback: it picks the best model on the EMA's logs
            callbacks.insert(callbacks.index(checkpoint_cb), ema_cb)
        verbose, progress = _progress(config, steps_per_epoch)
        if strategy.num_replicas_in_sync > 1:  # first: later callbacks see averaged BN stats
            callbacks.insert(0, replicas.SyncWorkers())
        # Two fit calls at most: the rest of an interrupted epoch, then the remaining epochs.
        segments = []
        if start_step and start_epoch < config.epochs:
            segments.append((start_epoch, 1, start_step))
            start_epoch += 1
        if start_epoch < config.epochs:
            segments.append((start_epoch, config.epochs - start_epoch, 0))
        try:
            for first_epoch, num_epochs, skip in segments:
                train_ds, val_ds, val_steps = _datasets(
                    config, source, num_classes, strategy, steps_per_epoch, first_epoch, skip,
                    num_epochs)
                checkpoint_cb.step_offset = skip
                if ema_cb:
                    ema_cb.validation_data, ema_cb.validation_steps = val_ds, val_steps
                # epochs=config.epochs in both calls, so the log says "Epoch 2/90", not "2/2";
                # the call for the rest of an epoch stops after it.
                stop_after = [_StopAfterEpoch(first_epoch)] if skip else []
                for callback in progress:
                    callback.step_offset = skip
                model.fit(
                    train_ds,
                    epochs=config.epochs,
                    initial_epoch=first_epoch,
                    steps_per_epoch=steps_per_epoch - skip if skip else steps_per_epoch,
                    # No validation_steps: Keras then makes a fresh pass over the (finite)
                    # validation set each epoch instead of continuing one exhausted iterator.
                    validation_data=val_ds,
                    validation_steps=val_steps,
                    callbacks=callbacks + progress + stop_after,
                    verbose=verbose,
                    shuffle=False,  # the pipeline shuffles, per epoch and resumably
                )
        except ckpt_lib.TrainingInterrupted as e:
            if e.reason == "non-finite loss":
                raise UserError(
                    f"Training stopped: the loss became NaN/inf at epoch {e.epoch + 1}, step "
                    f"{e.step}. The last good checkpoint is kept in {ckpt.directory}; lower "
                    f"--base_learning_rate or use --mixed_precision=float32 and run again."
                ) from None
            message = (f"Stopped by {e.reason} at epoch {e.epoch + 1}, step {e.step}; checkpoint "
                       "saved. Run the same command again to resume.")
            logging.warning(message)
            raise Interrupted(message, stop.signal_name) from None
        except tf.errors.UnavailableError as e:  # multi-worker: a peer died or was preempted
            raise UserError(
                f"a peer worker stopped or became unreachable ({str(e).splitlines()[0][:200]}); "
                f"run the same command on every worker to resume from the last checkpoint in "
                f"{ckpt.restore_directory}.") from None

    if ema:  # the final model, export and results are the EMA's
        ema.copy_to_model()
    return _finish(config, model, source, strategy, writer, model_dir, steps_per_epoch, optimizer,
                   throughput)


def _best_metrics(model_dir):
    """Validation metrics and path of the best model; ({}, None) when nothing was validated."""
    best_path = os.path.join(model_dir, ckpt_lib.BEST_MODEL)
    best = read_json(os.path.join(model_dir, ckpt_lib.BEST_JSON))
    if best and os.path.exists(best_path):
        keys = ("top1", "top5", "loss", "top1_ema", "top5_ema", "loss_ema")
        return {k: best.get(f"val_{k}") for k in keys}, best_path
    return {}, None


def _finish(config, model, source, strategy, writer, model_dir, steps_per_epoch, optimizer,
            throughput):
    metrics, best_path = _best_metrics(model_dir)
    if not writer:
        return None
    from keras_resnet.serving import export

    class_ids = source.class_ids if source else [str(i) for i in range(SYNTHETIC_CLASSES)]
    class_names = source.class_names if source else class_ids
    # Beside best.keras / latest.keras, so predict and export can use them later.
    export.write_classes_json(os.path.join(model_dir, "classes.json"), class_ids, class_names)
    ckpt_lib.save_keras_atomic(model, os.path.join(model_dir, ckpt_lib.FINAL_MODEL))
    export_path = None
    if config.export:
        serving_model = keras.saving.load_model(best_path, compile=False) if best_path else model
        logging.info("Exporting the %s model as a SavedModel under %s ...",
                     "best" if best_path else "final", config.resolved_export_dir)
        export_path = export.export_saved_model(
            serving_model, config.resolved_export_dir,
            image_size=config.resolved_eval_image_size,
            resize_size=config.resolved_eval_resize_size,
            class_ids=class_ids, class_names=class_names)
    history = _read_history(os.path.join(model_dir, HISTORY_CSV))
    rates = [r for r in history.get("images_per_sec", []) if r > 0] or throughput.train_images_per_sec
    results = {
        "val_top1": metrics.get("top1"),
        "val_top5": metrics.get("top5"),
        "val_loss": metrics.get("loss"),
        "val_top1_ema": metrics.get("top1_ema"),
        "val_top5_ema": metrics.get("top5_ema"),
        "ema": config.ema,
        "best_checkpoint": best_path,
        "epochs": config.epochs,
        "steps_per_epoch": steps_per_epoch,
        "global_step": int(optimizer.iterations.numpy()),
        "train_images_per_sec": float(np.median(rates)) if len(rates) else None,
        "export_dir": export_path,
        "dataset": config.dataset,
        "depth": config.depth,
        "batch_size": config.batch_size,
        "precision_policy": keras.mixed_precision.global_policy().name,
        "replicas": strategy.num_replicas_in_sync,
    }
    write_json_atomic(os.path.join(model_dir, RESULTS_JSON), results)
    _plot_curves(history, os.path.join(model_dir, CURVES_PNG))
    logging.info("Results: %s", json.dumps(results))
    print(json.dumps(results, indent=2), flush=True)
    return results


def _read_history(path):
    """history.csv (appended across restarts) -> {column: [values]}, last row per epoch wins."""
    import csv

    if not os.path.exists(path):
        return {}
    rows = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            if row.get("epoch", "").strip().isdigit():
                rows[int(row["epoch"])] = row
    columns = {}
    for epoch in sorted(rows):
        for key, value in rows[epoch].items():
            try:
                columns.setdefault(key, []).append(float(value))
            except (TypeError, ValueError):
                pass
    return columns


def _plot_curves(history, path):
    """Loss and top-1 per epoch, train and validation, as a PNG."""
    if not history.get("epoch"):
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [e + 1 for e in history["epoch"]]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric, title in ((axes[0], "loss", "loss"), (axes[1], "top1", "top-1 accuracy")):
        for prefix, label in (("", "train"), ("val_", "validation")):
            values = history.get(prefix + metric)
            if values:
                ax.plot(epochs[:len(values)], values, marker="o", label=label)
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
