"""Readable logs for every command: TensorFlow's start-up noise off, our own lines short.

Call `setup()` first in a command, before TensorFlow is imported, then `import_tensorflow()`
where the command first needs TensorFlow.

- `TF_CPP_MIN_LOG_LEVEL` (TensorFlow's C++ log level: 0 all, 1 warnings and errors, 2 errors,
  3 none) is set to 1 unless the user set it (or passed `--tf_log_level`): C++ INFO lines off,
  every warning and error kept.
- TensorFlow 2.21 writes a few start-up lines through absl's C++ logging before it reads that
  variable (twice: two of its libraries each hold a copy of absl): absl's "All log messages before
  absl::InitializeLog()" notice, oneDNN's and the CUDA stub's INFO lines and, on a machine
  without an NVIDIA driver, the error-level "failed call to cuInit". `import_tensorflow` imports
  TensorFlow and finds the devices with file descriptor 2 read through a filter that applies the
  same level to those lines (and drops the cuInit failure only where no GPU can exist); every
  other line passes through at once.
- Our lines (absl / Python logging) read `HH:MM:SS message`, with the level named when it is not
  INFO; TensorFlow's and Keras's own Python INFO lines are dropped, their warnings kept.
"""

import contextlib
import glob
import logging
import os
import re
import sys
import threading
import time

LEVEL_ENV = "TF_CPP_MIN_LOG_LEVEL"
DEFAULT_TF_LOG_LEVEL = 1  # warnings and errors; TensorFlow's per-device INFO lines off
# absl's C++ prefix: severity letter, MMDD (0000 before absl is initialised), time, thread, file.
_PREFIX = re.compile(r"^([IWEF])\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ (\S+?):\d+\] (.*)")
_SEVERITY = {"I": 0, "W": 1, "E": 2, "F": 4}
_ABSL_NOTICE = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
# The continuation line of cpu_feature_guard's INFO message.
_CONTINUATION = "To enable the following instructions:"
_CUINIT = re.compile(r"failed call to cuInit")
_LIBRARIES = ("tensorflow", "keras")


def tf_log_level():
    """TensorFlow's C++ log level in effect (TF_CPP_MIN_LOG_LEVEL; 0 when unset or bad)."""
    try:
        return int(os.environ.get(LEVEL_ENV, "0"))
    except ValueError:
        return 0


def setup(tf_log_level=None, *, absl_app=False):
    """Sets TF_CPP_MIN_LOG_LEVEL (`tf_log_level`, else the user's, else 1) and formats our logs.

    absl_app: the caller runs under absl's `app.run`, which installs absl's log handler itself
    after parsing flags; otherwise the handler is installed here, at INFO.
    """
    if tf_log_level is not None:
        os.environ[LEVEL_ENV] = str(tf_log_level)
    else:
        os.environ.setdefault(LEVEL_ENV, str(DEFAULT_TF_LOG_LEVEL))
    from absl import flags
    from absl import logging as absl_logging

    handler = absl_logging.get_absl_handler()
    handler.setFormatter(Formatter())
    if not any(isinstance(f, QuietLibraries) for f in handler.filters):
        handler.addFilter(QuietLibraries())
    if not absl_app:
        # absl's handler writes "Logging before flag parsing goes to stderr" while absl's global
        # flags are unparsed; the commands parse their own FlagValues, never the global one.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        absl_logging.use_absl_handler()
        absl_logging.set_verbosity(absl_logging.INFO)


class Formatter(logging.Formatter):
    """`15:44:16 message`, or `15:44:16 WARNING: message` for any level but INFO."""

    def format(self, record):
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        level = "" if record.levelno == logging.INFO else f"{record.levelname}: "
        text = f"{stamp} {level}{record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class QuietLibraries(logging.Filter):
    """Drops TensorFlow's and Keras's own Python INFO lines (e.g. one per checkpoint shard),
    keeping ours and every warning."""

    def filter(self, record):
        library = any(f"{os.sep}{name}{os.sep}" in record.pathname for name in _LIBRARIES)
        return record.levelno >= logging.WARNING or not library


def no_gpu_possible():
    """True when this machine can have no usable NVIDIA GPU: no NVIDIA device file, or
    CUDA_VISIBLE_DEVICES hides them all. A failed cuInit is then no error of the user's."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return True
    return not glob.glob("/dev/nvidia[0-9]*")


def is_noise(line, level, no_gpu):
    """True for a start-up line that TF_CPP_MIN_LOG_LEVEL=`level` would hide, had TensorFlow
    applied it (see the module docstring)."""
    line = line.rstrip("\n")
    if level < 1:
        return False
    if line == _ABSL_NOTICE or line.startswith(_CONTINUATION):
        return True
    match = _PREFIX.match(line)
    if not match:
        return False
    severity, _, message = match.groups()
    if severity == "E" and no_gpu and _CUINIT.search(message):
        return True
    return _SEVERITY[severity] < level


def is_op_failure_echo(line):
    """True for TensorFlow's C++ echo of an op failure that Python receives as an exception
    anyway ("Local rendezvous is aborting with status: ..." and its "[[{{node ...}}]]" line):
    a command that reports the exception in one line drops these."""
    line = line.rstrip("\n")
    if line.lstrip().startswith("[[{{"):
        return True
    match = _PREFIX.match(line)
    return bool(match) and match.group(2) == "local_rendezvous.cc"


@contextlib.contextmanager
def filtered_stderr(drop):
    """Within the block, file descriptor 2 (C++ and Python writes alike) goes through a pipe;
    a thread passes each line on to the real stderr at once unless `drop(line)`."""
    sys.stderr.flush()
    saved = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def pump():
        with os.fdopen(read_end, "rb") as lines:
            for raw in lines:
                if not drop(raw.decode("utf-8", "replace")):
                    os.write(saved, raw)

    thread = threading.Thread(target=pump, name="stderr-filter", daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # closes the pipe's only write end: the thread reads to its end
        thread.join(timeout=10)
        os.close(saved)


def import_tensorflow():
    """Imports TensorFlow and initialises its devices, without the start-up noise; returns it."""
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    level, no_gpu = tf_log_level(), no_gpu_possible()
    with filtered_stderr(lambda line: is_noise(line, level, no_gpu)):
        import tensorflow as tf

        tf.config.list_physical_devices()  # loads the device platforms (where cuInit runs)
    return tf


def cpu_name():
    """`Intel(R) Xeon(R) Processor, 2 cores` from /proc/cpuinfo (the model name may be absent)."""
    name = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f
                         if line.startswith("model name")), name)
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores"
