"""Crash-safe, resumable checkpoints: weights, optimizer slots, schedule and data position.

Keras's own `BackupAndRestore` reruns the interrupted epoch from its first step and can lose its
epoch counter, and its weight files are written in place (see shared PITFALLS). Here:

- `tf.train.CheckpointManager` writes each checkpoint under a new prefix and only then updates
  its index, so a kill during a save leaves the previous checkpoint usable; it keeps the last
  `keep` checkpoints.
- The checkpoint holds the model (weights and BatchNorm statistics), the optimizer (slots and
  step counter, hence the learning-rate schedule position) and `epoch` / `step_in_epoch`, so the
  input pipeline restarts at the next unseen batch of the interrupted epoch.
- The best model by validation top-1 is a `.keras` file written to a temporary name and renamed,
  and its score lives in `best.json` (also written atomically), so it survives restarts.
"""

import atexit
import contextlib
import math
import os
import re
import shutil
import signal
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from keras_resnet.files import atomic_path, read_json, remove_path, write_json_atomic
from keras_resnet.model import layers as model_layers

CHECKPOINT_SUBDIR = "checkpoints"
BEST_MODEL = "best.keras"
FINAL_MODEL = "latest.keras"  # the weights at the end of training
BEST_JSON = "best.json"
RUN_JSON = "run.json"
# Fields of run.json that must match for a checkpoint to be restorable into the new model
# ("frozen": the optimizer's slots follow the trainable variables, so freezing changes them).
# "class_ids": another dataset with as many classes would otherwise resume (or be reported as
# finished) and export the old model under the new dataset's class names.
IDENTITY_FIELDS = ("depth", "variant", "conv_bias", "num_classes", "class_ids", "frozen")
# Fields that must match for the run to continue where it stopped: the learning-rate schedule
# counts optimizer steps, and the saved data position counts batches, of this global batch size.
RUN_FIELDS = ("batch_size",)


def save_keras_atomic(model, path):
    """`model.save(path)` (a .keras file) via a temporary name in the same directory + rename:
    Keras writes the target in place, so a kill mid-save would leave a truncated file. The file
    holds Keras's own layers (`layers.portable`): plain `keras.saving.load_model` reads it."""
    with atomic_path(path) as tmp:
        model_layers.portable(model).save(tmp)
    return path


class CheckpointMismatchError(ValueError):
    """The model directory holds a checkpoint of a different network."""


def holds_training(model_dir):
    """Whether `model_dir` holds anything trained: a checkpoint, best.keras or latest.keras."""
    checkpoints = os.path.join(model_dir, CHECKPOINT_SUBDIR)
    return (os.path.isdir(checkpoints) and bool(os.listdir(checkpoints))
            or any(os.path.exists(os.path.join(model_dir, name))
                   for name in (BEST_MODEL, FINAL_MODEL)))


def check_run_identity(model_dir, identity):
    """Records the run's identity in run.json, or refuses a directory holding another network or
    a run with another global batch size (`identity` has IDENTITY_FIELDS and RUN_FIELDS).

    A run.json with nothing trained beside it (a run stopped before its first checkpoint, say
    one started on the wrong --data_dir) is replaced: there is nothing to protect."""
    path = os.path.join(model_dir, RUN_JSON)
    previous = read_json(path) if holds_training(model_dir) else None
    if previous is not None:
        def differ(fields):  # a field missing from an older run.json is not compared
            return ", ".join(_difference(k, previous[k], identity[k])
                             for k in fields if k in previous and previous[k] != identity[k])

        if differ(IDENTITY_FIELDS):
            raise CheckpointMismatchError(
                f"{model_dir} holds checkpoints of a different model ({differ(IDENTITY_FIELDS)}); "
                f"use another --model_dir or the original settings.")
        if differ(RUN_FIELDS):
            raise CheckpointMismatchError(
                f"{model_dir} holds a run with another global batch size ({differ(RUN_FIELDS)}): "
                "its learning-rate schedule and data position count steps of that size; resume "
                "with the original --batch_size or use another --model_dir.")
    write_json_atomic(path, identity)


def _difference(key, before, now):
    """'key: checkpoint X vs now Y'; for the class ids, the first position where they differ."""
    if key == "class_ids" and isinstance(before, list):
        at = next((i for i, (a, b) in enumerate(zip(before, now, strict=False)) if a != b),
                  min(len(before), len(now)))

        def first(ids):
            return repr(ids[at]) if at < len(ids) else "none"

        return (f"class ids: {len(before)} in the checkpoint vs {len(now)} now, the first that "
                f"differs is #{at}: checkpoint {first(before)} vs now {first(now)}")
    return f"{key}: checkpoint {before!r} vs now {now!r}"


class TrainingCheckpoint:
    """Model + optimizer + data position, saved with `tf.train.CheckpointManager`."""

    def __init__(self, model, optimizer, directory, keep=3, write=True, extra=None):
        """extra: more trackables saved with the model (e.g. the EMA's averages)."""
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        self.step_in_epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="step_in_epoch")
        self.optimizer = optimizer
        self.checkpoint = tf.train.Checkpoint(
            model=model, optimizer=optimizer, epoch=self.epoch, step_in_epoch=self.step_in_epoch,
            **(extra or {}))
        # Non-chief workers of a multi-worker run must still take part in the save (its ops may
        # be collective) but write to a private temporary directory, removed at exit (one
        # checkpoint kept). They restore from the chief's directory, so every worker resumes
        # from the same state and makes the same collective calls.
        self.restore_directory = directory
        if write:
            self.directory = directory
            _remove_failed_saves(directory)
        else:
            self.directory = tempfile.mkdtemp(prefix="ckpt-worker-")
            atexit.register(shutil.rmtree, self.directory, ignore_errors=True)
            keep = 1
        self.manager = tf.train.CheckpointManager(self.checkpoint, self.directory, max_to_keep=keep)

    def restore(self):
        """Restores the latest checkpoint. Returns (epoch, step_in_epoch); (0, 0) for a new run."""
        path = tf.train.latest_checkpoint(self.restore_directory)
        if not path:
            return 0, 0
        # Slots are created lazily; build them so they are restored now, not deferred.
        self.optimizer.build(self.checkpoint.model.trainable_variables)
        status = self.checkpoint.restore(path)
        try:
            status.assert_existing_objects_matched()
        except AssertionError as e:
            raise CheckpointMismatchError(
                f"{path} does not match this model ({str(e).splitlines()[0][:200]}); "
                f"use another --model_dir.") from None
        return int(self.epoch.numpy()), int(self.step_in_epoch.numpy())

    def save(self, epoch, step_in_epoch):
        self.epoch.assign(epoch)
        self.step_in_epoch.assign(step_in_epoch)
        return self.manager.save(checkpoint_number=int(self.optimizer.iterations.numpy()))


def _remove_failed_saves(directory):
    """Deletes what saves that failed (a full disk, a kill) left: TensorFlow writes a checkpoint
    into `<prefix>_temp/` and renames its files when done, and a failed save leaves the folder,
    up to a whole checkpoint's size, forever. No reader looks there (the index names the
    checkpoints). Only the run's one writer calls this: it holds the run folder's lock."""
    try:
        entries = os.listdir(directory)
    except FileNotFoundError:
        return
    for entry in entries:
        if _FAILED_SAVE.fullmatch(entry):
            path = os.path.join(directory, entry)
            logging.info("Removing %s, left by a checkpoint save that did not finish.", path)
            remove_path(path)


_FAILED_SAVE = re.compile(r"ckpt-\d+_temp")


class StopRequest:
    """Turns SIGTERM / SIGINT into a flag, so the current step ends, a checkpoint is saved and
    training stops cleanly (preemption notices send SIGTERM)."""

    def __init__(self):
        self.signal_name = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C aborts at once
        self.signal_name = signal.Signals(signum).name
        logging.warning("%s received: saving a checkpoint after this step, then stopping.",
                        self.signal_name)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False

    @property
    def requested(self):
        return self.signal_name is not None


class TrainingInterrupted(Exception):
    """Raised from inside `fit` to stop at once (no validation pass) after a signal or a NaN."""

    def __init__(self, reason, epoch, step):
        super().__init__(f"{reason} at epoch {epoch + 1}, step {step}")
        self.reason, self.epoch, self.step = reason, epoch, step


class CheckpointCallback(keras.callbacks.Callback):
    """Saves resumable checkpoints every N steps / T seconds and at epoch ends, and the best model.

    Never saves weights after a non-finite loss, so the last checkpoint is the last good one.
    """

    def __init__(self, ckpt, steps_per_epoch, every_steps, every_secs, model_dir, stop,
                 write=True, monitor="val_top1", agree=None, step_offset=0,
                 best_weights=None):
        """`agree(flag) -> bool`: True if any worker's flag is set (a collective; multi-worker
        runs pass one so that all workers stop, and save, at the same step). `step_offset`:
        steps of the first epoch done before this `fit` call (the rest of a resumed epoch).
        `best_weights()`: a context manager under which the model holds the weights to save as
        the best model (the EMA's); None: the model's own."""
        self.best_weights = best_weights
        super().__init__()
        self.agree = agree
        self.ckpt = ckpt
        self.steps_per_epoch = steps_per_epoch
        self.every_steps = every_steps
        self.every_secs = every_secs
        self.model_dir = model_dir
        self.stop = stop
        self.write = write
        self.monitor = monitor
        self.step_offset = step_offset
        self.epoch = 0
        self._last_save_time = time.monotonic()
        self._saved_at = None  # (epoch, step) of the last save
        best = read_json(os.path.join(model_dir, BEST_JSON), {}) if write else {}
        self.best = best.get(monitor, -math.inf)

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        step = self.step_offset + batch + 1
        loss = (logs or {}).get("loss")
        if loss is not None and not np.isfinite(loss):
            raise TrainingInterrupted("non-finite loss", self.epoch, step)
        if step >= self.steps_per_epoch:
            # The epoch end (validation, best model, save) covers the last step, unless a stop
            # is pending: then save now, as validation may outlast a preemption notice.
            if self._stop_requested():
                self._save(self.epoch + 1, 0)
            return
        if self._stop_requested():
            self._save(self.epoch, step)
            raise TrainingInterrupted(self.stop.signal_name or "a peer's stop", self.epoch, step)
        if (self.every_steps and step % self.every_steps == 0) or (
                self.every_secs and time.monotonic() - self._last_save_time >= self.every_secs):
            self._save(self.epoch, step)

    def on_epoch_end(self, epoch, logs=None):
        self.step_offset = 0
        logs = logs or {}
        score = logs.get(self.monitor)
        if score is not None and score > self.best:
            self.best = float(score)
            self._save_best(epoch, logs)
        if self._saved_at != (epoch + 1, 0):  # not already saved after the last step
            self._save(epoch + 1, 0)
        if self._stop_requested():  # a signal during the last step or the validation pass
            raise TrainingInterrupted(self.stop.signal_name or "a peer's stop", epoch + 1, 0)

    def _stop_requested(self):
        return self.agree(self.stop.requested) if self.agree else self.stop.requested

    def _save(self, epoch, step):
        """Saves the position `step` steps into epoch `epoch` (0-based; step 0 = not started)."""
        path = self.ckpt.save(epoch, step)
        self._saved_at = (epoch, step)
        self._last_save_time = time.monotonic()
        logging.info("Saved checkpoint %s (epoch %d, step %d done).", path, epoch + 1, step)

    def _save_best(self, epoch, logs):
        if not self.write:
            return
        with (self.best_weights() if self.best_weights else contextlib.nullcontext()):
            target = save_keras_atomic(self.model, os.path.join(self.model_dir, BEST_MODEL))
        record = {k: float(v) for k, v in logs.items() if np.isscalar(v)}
        record.update(epoch=epoch + 1, path=target)
        write_json_atomic(os.path.join(self.model_dir, BEST_JSON), record)
        logging.info("New best %s=%.4f at epoch %d: %s", self.monitor, self.best, epoch + 1, target)
