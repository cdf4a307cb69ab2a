"""Keras callbacks of a training run: throughput and learning rate in the logs, progress lines
for output that is not a terminal, and a stop after the first epoch of a resumed segment."""

import sys
import time

import keras
import numpy as np
from absl import logging


class ThroughputLogger(keras.callbacks.Callback):
    """Adds `images_per_sec` (training steps only, not validation) and `learning_rate` to logs.
    The rate leaves out an epoch's first step (tracing), unless that was its only step."""

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
        self._elapsed = time.perf_counter() - self._start

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        # One step: its own time (tracing included) is all there is; it had reported 0 images/s.
        timed = self._steps - 1 if self._steps > 1 else self._steps
        rate = timed * self.global_batch_size / self._elapsed if timed and self._elapsed else 0.0
        self.train_images_per_sec.append(rate)
        logs["images_per_sec"] = rate
        # With a schedule, `optimizer.learning_rate` is the rate at the current step.
        logs["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        logging.info("Epoch %d: %.1f images/s, learning rate %.5f", epoch + 1, rate,
                     logs["learning_rate"])


class ProgressLog(keras.callbacks.Callback):
    """Progress for output that is not a terminal (a log file, a batch job), where Keras's bar
    would print a line per step: a line every `every_secs` seconds and one per epoch."""

    def __init__(self, steps_per_epoch, epochs, global_batch_size, every_secs, step_offset=0):
        """`step_offset`: steps of the first epoch done before this fit call (a resumed epoch)."""
        super().__init__()
        self.steps_per_epoch, self.epochs = steps_per_epoch, epochs
        self.global_batch_size, self.every_secs = global_batch_size, every_secs
        self.step_offset = step_offset
        self._val_secs = 0.0  # the last validation's duration (0 until one has run)

    def on_test_begin(self, logs=None):
        self._val_start = time.monotonic()

    def on_test_end(self, logs=None):
        self._val_secs = time.monotonic() - self._val_start

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch, self._done = epoch, 0
        self._start = self._last = time.monotonic()
        self._first_end = None

    def on_train_batch_end(self, batch, logs=None):
        self._done = batch + 1
        now = time.monotonic()
        if self._done == 1:
            self._first_end = now
        if not self.every_secs or now - self._last < self.every_secs:
            return
        self._last = now
        step, elapsed = self.step_offset + self._done, now - self._start
        # The pace without the first step, which includes tracing (and XLA compiling) the step.
        per_step = ((now - self._first_end) / (self._done - 1) if self._done > 1
                    else elapsed)
        eta = (self.steps_per_epoch - step) * per_step
        # The later epochs at this epoch's pace, and every validation still to run at the last
        # one's (none counted before the first has run).
        later = ((self.epochs - self._epoch - 1) * self.steps_per_epoch * per_step
                 + (self.epochs - self._epoch) * self._val_secs)
        print(f"epoch {self._epoch + 1}/{self.epochs} step {step}/{self.steps_per_epoch} "
              f"{_metrics(logs)}, {self._done * self.global_batch_size / elapsed:.1f} images/s, "
              f"epoch ends in {_duration(eta)}"
              + (f", training in {_duration(eta + later)}" if later else ""), flush=True)

    def on_epoch_end(self, epoch, logs=None):
        self.step_offset = 0  # later epochs of the same fit call start at step 0
        print(f"epoch {epoch + 1}/{self.epochs} done in "
              f"{_duration(time.monotonic() - self._start)}: {_metrics(logs)}", flush=True)


def _metrics(logs):
    return " ".join(f"{k} {float(v):.4g}" for k, v in (logs or {}).items() if np.size(v) == 1)


def _duration(seconds):
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}"


class StopAfterEpoch(keras.callbacks.Callback):
    """Ends `fit` after epoch `epoch` (0-based): the rest of an interrupted epoch is its own fit
    call, with `epochs=config.epochs` so the log says \"Epoch 2/90\", not \"1/1\"."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch >= self.epoch:
            self.model.stop_training = True




def progress(verbose, progress_every_secs, steps_per_epoch, epochs, global_batch_size,
             step_offset=0):
    """(Keras fit verbosity, extra callbacks): with --verbose=auto, Keras's bar on a terminal,
    else ProgressLog's lines (Keras would print a bar line per step into a file)."""
    if verbose != "auto":
        return int(verbose), []
    if sys.stdout.isatty():
        return 1, []
    return 0, [ProgressLog(steps_per_epoch, epochs, global_batch_size, progress_every_secs,
                           step_offset)]
