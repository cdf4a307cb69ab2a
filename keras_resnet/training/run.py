"""A training run as four stages: `setup` (strategy, seeds, precision), `inputs.load_data`,
`build` (model, optimizer, restored position), `fit` (one or two `model.fit` calls) and `finish`
(best model, export, results). `train_and_evaluate(config)` chains them.

Each stage takes the config and the small typed results of the stages before it, so each can be
run (and tested) alone.
"""

import dataclasses
import json
import os
import signal
import warnings

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from keras_resnet import files
from keras_resnet.files import read_json, write_json_atomic
from keras_resnet.model import weights
from keras_resnet.model.resnet import build_resnet
from keras_resnet.training import callbacks as callbacks_lib
from keras_resnet.training import checkpoint as ckpt_lib
from keras_resnet.training import distribute, finetune, inputs, recipe, report
from keras_resnet.training.inputs import Data, UserError  # noqa: F401  (part of this API)
from keras_resnet.training.optim import (
    SparseCrossentropy,
    WarmupSchedule,
    accuracy_metrics,
    apply_norm_weight_decay,
)
from keras_resnet.training.sgd import SGD
from pipelines import dataset as ds_lib

CONFIG_JSON = "config.json"
TRAIN_DATA_KEY = "train_data"  # config.json: the training set's size and fingerprint
CLASSES_JSON = "classes.json"

# Keras warns once per fit when it learns the length of the (finite) validation set by running
# out of it; training itself always runs on an exact number of steps.
warnings.filterwarnings("ignore", message="Your input ran out of data")


class Interrupted(Exception):
    """Training stopped on a signal (or a peer worker's) after saving a checkpoint: the run is
    not finished. `exit_status` is the shell's 128 + signal number (SIGTERM: 143, SIGINT: 130),
    so schedulers that restart failed jobs restart it, and `train && export` stops."""

    def __init__(self, message, signal_name):
        super().__init__(message)
        number = getattr(signal.Signals, signal_name or "", signal.SIGTERM)
        self.exit_status = 128 + int(number)


@dataclasses.dataclass(frozen=True)
class Runtime:
    """Where the run happens: the strategy, and whether this task writes the run's files."""

    strategy: tf.distribute.Strategy
    writer: bool  # the chief: checkpoints, logs, results and the export
    model_dir: str


@dataclasses.dataclass
class Trainer:
    """The model being trained, its optimizer and checkpoint, and where training resumes."""

    model: keras.Model
    optimizer: keras.optimizers.Optimizer
    checkpoint: ckpt_lib.TrainingCheckpoint
    start_epoch: int  # 0-based epoch to continue
    start_step: int   # steps of that epoch already done
    ema: object = None  # ema.WeightEMA with --ema

    @property
    def global_step(self):
        return int(self.optimizer.iterations.numpy())


# ----- model and optimizer ----------------------------------------------------------------------

def make_model(config, num_classes, input_shape=None):
    """The network for `config`: uint8 RGB in, float32 probabilities out. `input_shape`: default
    `recipe.model_input_shape(config)`."""
    model = build_resnet(
        config.depth,
        num_classes=num_classes,
        input_shape=input_shape or recipe.model_input_shape(config),
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

    # At the training size: the memory estimate is for training, and a FixRes model (trained and
    # evaluated at different sizes) takes any size, so it has no size of its own to count at.
    train, evaluate = config.resolved_train_image_size, config.resolved_eval_image_size
    model = make_model(config, num_classes, input_shape=(train, train, 3))
    lines = []
    model.summary(print_fn=lambda line, **kwargs: lines.append(line))
    lines.append(stats.format_summary(model, batch_size=config.batch_size,
                                      gpu_memory_gib=config.gpu_memory_gib))
    if train != evaluate:
        lines.append(f"FixRes: trained at {train}x{train} (the figures above), evaluated and "
                     f"exported at {evaluate}x{evaluate}; the network takes either size.")
    return "\n".join(lines)


def learning_rate_schedule(config, steps_per_epoch):
    """Warm-up then cosine or step decay, as a function of the optimizer's step."""
    return WarmupSchedule(
        peak_lr=config.learning_rate,
        total_steps=config.epochs * steps_per_epoch,
        warmup_steps=round(config.warmup_epochs_for_run() * steps_per_epoch),
        kind=config.lr_schedule,
        boundaries=[e * steps_per_epoch for e in config.step_decay_epochs],
    )


def compile_model(model, config, num_classes, steps_per_epoch):
    """Compiles `model` for training with `config`'s optimizer, loss and metrics (in the current
    strategy scope); returns its optimizer (a LossScaleOptimizer under mixed_float16)."""
    sgd = dict(learning_rate=learning_rate_schedule(config, steps_per_epoch),
               momentum=config.momentum, nesterov=config.nesterov)
    optimizer = (finetune.HeadScaledSGD(head_lr_multiplier=config.head_lr_multiplier, **sgd)
                 if config.head_lr_multiplier != 1.0 else SGD(**sgd))
    jit = distribute.choose_jit_compile(config.jit_compile, tf.distribute.get_strategy(),
                                       config.deterministic)
    model.compile(
        optimizer=optimizer,
        loss=SparseCrossentropy(num_classes, label_smoothing=config.label_smoothing),
        # Weighted: the weight-0 padding of multi-replica evaluation does not count (Keras
        # ignores sample weights in `metrics`). Training has no weights: plain accuracy.
        # With mixup / cutmix, training labels are soft: accuracy against the dominant class.
        weighted_metrics=accuracy_metrics(recipe.uses_soft_labels(config)),
        jit_compile=jit,
    )
    return model.optimizer


# ----- stages -----------------------------------------------------------------------------------

def setup(config):
    """Strategy, seeds, determinism and precision policy (before any model is built)."""
    try:
        strategy = distribute.make_strategy(config.distribution, config.tpu)
    except (distribute.ClusterError, distribute.UnsupportedKeras) as e:
        raise UserError(str(e)) from None
    if config.batch_size % strategy.num_replicas_in_sync:
        raise UserError(f"--batch_size={config.batch_size} does not divide evenly over "
                        f"{strategy.num_replicas_in_sync} replicas; use a multiple of it.")
    keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.mixed_precision.set_global_policy(
        distribute.choose_precision(config.mixed_precision, strategy))
    recipe.log_recipe(config)
    return Runtime(strategy, distribute.is_chief(), config.resolved_model_dir)


def build(config, runtime, data):
    """The compiled model in the strategy's scope, restored from the run's latest checkpoint when
    there is one (a run of another network or batch size is refused)."""
    identity = {"depth": config.depth, "variant": config.variant, "conv_bias": config.conv_bias,
                "num_classes": data.num_classes, "class_ids": list(data.class_ids),
                "batch_size": config.batch_size, "frozen": list(config.frozen_groups)}
    with runtime.strategy.scope():
        model = make_model(config, data.num_classes)
        finetune.freeze(model, config.frozen_groups)  # before compile, which collects trainables
        checkpoint_dir = os.path.join(runtime.model_dir, ckpt_lib.CHECKPOINT_SUBDIR)
        if config.init_from:  # before the EMA copies the weights; a resumed run restores all
            _init_from(config, model, data,
                       resuming=tf.train.latest_checkpoint(checkpoint_dir) is not None)
        optimizer = compile_model(model, config, data.num_classes, data.steps_per_epoch)
        ema = recipe.make_ema(config, model)
        ckpt = ckpt_lib.TrainingCheckpoint(
            model, optimizer, checkpoint_dir,
            keep=config.keep_checkpoints, write=runtime.writer,
            extra=ema.trackables() if ema else None)
        try:
            if runtime.writer:
                ckpt_lib.check_run_identity(runtime.model_dir, identity)
                _write_classes(runtime.model_dir, data)
            _check_ema_as_started(config, runtime.model_dir, checkpoint_dir)
            start_epoch, start_step = ckpt.restore()
        except ckpt_lib.CheckpointMismatchError as e:
            raise UserError(str(e)) from None
    if start_step >= data.steps_per_epoch:  # a checkpoint of a longer epoch; start the next one
        start_epoch, start_step = start_epoch + 1, 0
    trainer = Trainer(model, optimizer, ckpt, start_epoch, start_step, ema)
    if start_epoch or start_step:
        logging.info("Resumed from %s (global step %d).",
                     tf.train.latest_checkpoint(ckpt.restore_directory), trainer.global_step)
    return trainer


def _write_classes(model_dir, data):
    """classes.json beside the checkpoints from the start, so predict and export can name the
    classes of a run that is still training or was killed."""
    from keras_resnet.serving import export

    export.write_classes_json(os.path.join(model_dir, CLASSES_JSON), data.class_ids,
                              data.class_names)


def _init_from(config, model, data, resuming):
    """--init_from on a new run; a resumed run continues from its checkpoint instead."""
    if resuming:
        message = (f"Resuming from the checkpoint in {config.resolved_model_dir}: --init_from="
                   f"{config.init_from} is ignored (it only starts a new run).")
    else:
        try:
            message = finetune.init_from(model, config.init_from, num_classes=data.num_classes,
                                         variant=config.variant)
        except ValueError as e:
            raise UserError(f"--init_from: {e}") from None
    if logging.level_info():
        logging.info(message)
    else:  # absl's INFO lines off (called as a library): the line still shows, once
        print(message, flush=True)


def segments(start_epoch, start_step, epochs):
    """The `fit` calls that finish a run: [(first epoch, number of epochs, steps to skip)]. The
    rest of an interrupted epoch is a call of its own (its dataset skips the steps done)."""
    calls = []
    if start_step and start_epoch < epochs:
        calls.append((start_epoch, 1, start_step))
        start_epoch += 1
    if start_epoch < epochs:
        calls.append((start_epoch, epochs - start_epoch, 0))
    return calls


def fit(config, runtime, data, trainer):
    """Trains from the trainer's position to the end of `config.epochs`, checkpointing as it
    goes; returns the ThroughputLogger (images/s per epoch)."""
    throughput = callbacks_lib.ThroughputLogger(config.batch_size)
    val_ds, val_steps = inputs.validation_dataset(config, data, runtime.strategy)
    with ckpt_lib.StopRequest() as stop:
        try:
            for first_epoch, num_epochs, skip in segments(trainer.start_epoch, trainer.start_step,
                                                          config.epochs):
                train_ds = inputs.train_dataset(config, data, runtime.strategy, first_epoch,
                                                num_epochs, skip)
                verbose, callbacks = _segment_callbacks(config, runtime, data, trainer, stop,
                                                        throughput, first_epoch, skip)
                callbacks = recipe.with_ema_callback(callbacks, trainer.ema, val_ds, val_steps)
                trainer.model.fit(
                    train_ds,
                    epochs=config.epochs,  # the log says "Epoch 2/90" in both calls
                    initial_epoch=first_epoch,
                    steps_per_epoch=data.steps_per_epoch - skip,
                    validation_data=val_ds,
                    validation_steps=val_steps,
                    callbacks=callbacks,
                    verbose=verbose,
                    shuffle=False,  # the pipeline shuffles, per epoch and resumably
                )
        except ckpt_lib.TrainingInterrupted as e:
            raise _interruption_error(e, trainer, stop) from None
        except tf.errors.UnavailableError as e:  # multi-worker: a peer died or was preempted
            raise UserError(
                f"a peer worker stopped or became unreachable ({str(e).splitlines()[0][:200]}); "
                f"run the same command on every worker to resume from the last checkpoint in "
                f"{trainer.checkpoint.restore_directory}.") from None
    if trainer.ema:  # the final model, its export and results are the EMA's
        trainer.ema.copy_to_model()
    return throughput


def _segment_callbacks(config, runtime, data, trainer, stop, throughput, first_epoch, skip):
    """(verbosity, callbacks) of one `fit` call starting `skip` steps into `first_epoch`."""
    from keras_resnet.training import replicas

    strategy = runtime.strategy
    multi = isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
    checkpoint = ckpt_lib.CheckpointCallback(
        trainer.checkpoint, data.steps_per_epoch, config.checkpoint_every_steps,
        config.checkpoint_every_secs, runtime.model_dir, stop, write=runtime.writer,
        agree=replicas.any_worker(strategy) if multi else None, step_offset=skip,
        **recipe.best_model_options(trainer.ema))
    callbacks = [throughput, checkpoint]
    if strategy.num_replicas_in_sync > 1:  # first: later callbacks see averaged BN statistics
        callbacks.insert(0, replicas.SyncWorkers())
    if runtime.writer:
        callbacks += [
            keras.callbacks.CSVLogger(os.path.join(runtime.model_dir, report.HISTORY_CSV),
                                      append=True),
            keras.callbacks.TensorBoard(os.path.join(runtime.model_dir, "logs"),
                                        update_freq="epoch"),
        ]
    verbose, progress = callbacks_lib.progress(config.verbose, config.progress_every_secs,
                                               data.steps_per_epoch, config.epochs,
                                               config.batch_size, skip)
    if skip:
        progress.append(callbacks_lib.StopAfterEpoch(first_epoch))
    return verbose, callbacks + progress


def _interruption_error(e, trainer, stop):
    if e.reason == "non-finite loss":
        return UserError(
            f"Training stopped: the loss became NaN/inf at epoch {e.epoch + 1}, step {e.step}. "
            f"The last good checkpoint is kept in {trainer.checkpoint.directory}; lower "
            f"--base_learning_rate or use --mixed_precision=float32 and run again.")
    message = (f"Stopped by {e.reason} at epoch {e.epoch + 1}, step {e.step}; checkpoint saved. "
               "Run the same command again to resume.")
    logging.warning(message)
    return Interrupted(message, stop.signal_name)


def finish(config, runtime, data, trainer, throughput):
    """The chief writes latest.keras, the SavedModel export (of the best model),
    results.json and curves.png; returns the results (None on other workers)."""
    if not runtime.writer:
        return None
    from keras_resnet.serving import export

    model_dir = runtime.model_dir
    metrics, best_path = _best_metrics(model_dir)
    ckpt_lib.save_keras_atomic(trainer.model, os.path.join(model_dir, ckpt_lib.FINAL_MODEL))
    export_path = None
    if config.export:
        serving_model = (weights.load_keras(best_path) if best_path
                         else trainer.model)
        logging.info("Exporting the %s model as a SavedModel under %s ...",
                     "best" if best_path else "final", config.resolved_export_dir)
        export_path = export.export_saved_model(
            serving_model, config.resolved_export_dir,
            image_size=config.resolved_eval_image_size,
            resize_size=config.resolved_eval_resize_size,
            class_ids=data.class_ids, class_names=data.class_names)
    history = report.read_history(os.path.join(model_dir, report.HISTORY_CSV))
    rates = ([r for r in history.get("images_per_sec", []) if r > 0]
             or throughput.train_images_per_sec)
    results = {
        "val_top1": metrics.get("top1"),
        "val_top5": metrics.get("top5"),
        "val_loss": metrics.get("loss"),
        # With --ema, best.keras and the export hold the EMA weights; val_top1 is the raw
        # weights' accuracy at the same epoch.
        "val_top1_ema": metrics.get("top1_ema"),
        "val_top5_ema": metrics.get("top5_ema"),
        "ema": config.ema,
        "best_checkpoint": best_path,
        "epochs": config.epochs,
        "steps_per_epoch": data.steps_per_epoch,
        "global_step": trainer.global_step,
        "train_images_per_sec": float(np.median(rates)) if len(rates) else None,
        "export_dir": export_path,
        "dataset": config.dataset,
        "depth": config.depth,
        "batch_size": config.batch_size,
        "precision_policy": keras.mixed_precision.global_policy().name,
        "replicas": runtime.strategy.num_replicas_in_sync,
    }
    write_json_atomic(os.path.join(model_dir, report.RESULTS_JSON), results)
    report.plot_curves(history, os.path.join(model_dir, report.CURVES_PNG))
    logging.info("Results: %s", json.dumps(results))
    print(json.dumps(results, indent=2), flush=True)
    return results


def _best_metrics(model_dir):
    """Validation metrics and path of the best model; ({}, None) when nothing was validated."""
    best_path = os.path.join(model_dir, ckpt_lib.BEST_MODEL)
    best = read_json(os.path.join(model_dir, ckpt_lib.BEST_JSON))
    if best and os.path.exists(best_path):
        keys = ("top1", "top5", "loss", "top1_ema", "top5_ema", "loss_ema")
        return {k: best.get(f"val_{k}") for k in keys}, best_path
    return {}, None


# ----- the whole run ----------------------------------------------------------------------------

def _check_ema_as_started(config, model_dir, checkpoint_dir):
    """A run resumes with --ema as it started: its checkpoints hold the average or not. (Turning
    it off restored without complaint, leaving best.keras with EMA weights and results.json
    saying ema false; turning it on failed in the restore with a message about 'ema/...'.)"""
    started = read_json(os.path.join(model_dir, CONFIG_JSON)) or {}
    if ("ema" in started and started["ema"] != config.ema
            and tf.train.latest_checkpoint(checkpoint_dir)):
        ema = str(started["ema"]).lower()
        raise UserError(f"{model_dir} was started with --ema={ema}: resume with --ema={ema}, or "
                        "use another --model_dir.")


# Flags that change where files go, what is shown or how fast it runs, not what is trained
# (`--epochs`: raising it is how a finished run trains further; `--init_from` is ignored once a run
# has a checkpoint, and `--zero_init_residual` only sets the initial weights).
_RUN_ONLY_FLAGS = frozenset({
    "data_dir", "cache", "check_images", "tf_data_service", "epochs", "validation_steps",
    "model_dir", "export_dir", "export", "distribution", "tpu", "jit_compile", "deterministic",
    "checkpoint_every_steps", "checkpoint_every_secs", "keep_checkpoints", "verbose",
    "progress_every_secs", "init_from", "zero_init_residual", "summary", "gpu_memory_gib"})
FLAG_CHANGES_JSON = "flag_changes.json"


def _train_data(data):
    """What config.json records of the training set: its size and a hash of its files (by folder
    and name, so a moved --data_dir is the same set) and labels."""
    split = getattr(data.source, "train", None)
    if split is None:
        return None
    return {"examples": int(split.num_examples),
            "fingerprint": ds_lib.split_fingerprint(split, where=False)}


def _note_changed_flags(config, model_dir, trainer, train_data=None):
    """A run resumed with other training flags (mixup, smoothing, sizes, ...) or another training
    set (files added or removed) goes on, but no longer as if never stopped: say so, and keep
    each change with its step in flag_changes.json (config.json holds the flags now in force)."""
    started = read_json(os.path.join(model_dir, CONFIG_JSON))
    if not started or not (trainer.start_epoch or trainer.start_step):
        return
    now = config.to_dict()
    changed = {name: [started[name], value] for name, value in now.items()
               if name in started and name not in _RUN_ONLY_FLAGS and started[name] != value}
    flags = ", ".join(f"--{k} {old!r} -> {new!r}" for k, (old, new) in changed.items())
    parts = [f"flags ({flags})"] if changed else []
    before = started.get(TRAIN_DATA_KEY)
    if before and train_data and before != train_data:
        changed[TRAIN_DATA_KEY] = [before, train_data]
        parts.append(f"training set ({before['examples']:,} -> {train_data['examples']:,} "
                     "images, or other files or labels; epochs follow the new set's order"
                     + (", so this one sees some images twice and some not at all)"
                        if trainer.start_step else ")"))
    if not changed:
        return
    logging.warning("Resuming with changed %s: from global step %d the run differs from "
                    "one never stopped; recorded in %s.", " and ".join(parts),
                    trainer.global_step, FLAG_CHANGES_JSON)
    path = os.path.join(model_dir, FLAG_CHANGES_JSON)
    history = read_json(path) or []
    history.append({"global_step": trainer.global_step, "changed": changed})
    write_json_atomic(path, history)


def train_and_evaluate(config):
    """Trains `config`, resuming from `model_dir` when it holds a checkpoint; returns results."""
    config.validate()
    runtime = setup(config)
    if not runtime.writer:
        return _train(config, runtime)
    try:  # one writer per run folder for the whole run, refused before the data is even read
        with files.exclusive(runtime.model_dir):
            return _train(config, runtime)
    except files.Busy as e:
        raise UserError(f"{e}: wait for that run to end, or pass another --model_dir.") from None


def _train(config, runtime):
    data = inputs.load_data(config, runtime.writer)
    total_steps = config.epochs * data.steps_per_epoch
    if config.ema and total_steps < config.ema_every_steps:
        # The average would never be updated: best.keras and the export would be the initial
        # (or pretrained, with a random head) weights.
        raise UserError(f"--ema updates the average every {config.ema_every_steps} steps "
                        f"(--ema_every_steps) but this run has {total_steps} steps in all; use "
                        f"--ema_every_steps={max(1, total_steps // 4)} or train longer.")
    if runtime.writer:
        inputs.write_skipped_report(data, runtime.model_dir)
    trainer = build(config, runtime, data)
    previous = read_json(os.path.join(runtime.model_dir, report.RESULTS_JSON))
    # Finished only when results.json describes this very checkpoint: after `--epochs` was raised,
    # a final save or export that failed (a full disk, say) leaves the shorter run's results.json
    # beside a longer run's checkpoint, and finish() must run again.
    finished = (trainer.start_epoch >= config.epochs and previous is not None
                and previous.get("global_step") == trainer.global_step)
    if runtime.writer and not finished:  # a finished run keeps the flags it ran with
        train_data = _train_data(data)
        _note_changed_flags(config, runtime.model_dir, trainer, train_data)
        write_json_atomic(os.path.join(runtime.model_dir, CONFIG_JSON),
                          {**config.to_dict(), **({TRAIN_DATA_KEY: train_data} if train_data
                                                  else {})})
    if finished:
        print(f"{runtime.model_dir} already holds a finished run of {config.epochs} epochs: "
              f"{json.dumps(previous)}\nRaise --epochs to train further.", flush=True)
        return previous
    if trainer.start_epoch >= config.epochs:
        # Stopped after its last checkpoint, in the final save or export ("epoch 2/1" is none).
        print(f"All {config.epochs} epochs are trained (global step {trainer.global_step}): "
              "writing the final model, export and results that the last run did not finish.",
              flush=True)
    elif trainer.start_epoch or trainer.start_step:
        print(f"Resuming at epoch {trainer.start_epoch + 1}/{config.epochs}, step "
              f"{trainer.start_step}/{data.steps_per_epoch}.", flush=True)
    throughput = fit(config, runtime, data, trainer)
    return finish(config, runtime, data, trainer, throughput)
