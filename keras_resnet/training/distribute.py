"""Choice of tf.distribute strategy and mixed-precision policy for the devices at hand."""

import json
import os

import tensorflow as tf
from absl import logging

from keras_resnet.training import multi_worker
from keras_resnet.training.multi_worker import (  # noqa: F401  (raised by make_strategy)
    ClusterError,
    UnsupportedKeras,
)

# GPUs with tensor cores (compute capability >= 7.0) gain from float16 math.
MIN_FP16_CAPABILITY = (7, 0)
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def tf_config_workers():
    """Number of tasks (chief + workers) named by TF_CONFIG; 0 when unset."""
    cluster = json.loads(os.environ.get("TF_CONFIG") or "{}").get("cluster", {})
    return len(cluster.get("chief", [])) + len(cluster.get("worker", []))


def resolve_distribution(distribution):
    """'auto' -> multi_worker (TF_CONFIG with several tasks), mirrored (>1 GPU) or one_device."""
    if distribution != "auto":
        return distribution
    if tf_config_workers() > 1:
        return "multi_worker"
    if len(tf.config.list_physical_devices("GPU")) > 1:
        return "mirrored"
    return "one_device"


def make_strategy(distribution, tpu=""):
    """Builds the strategy. Must run before any op is placed (multi-worker needs a fresh runtime)."""
    kind = resolve_distribution(distribution)
    if kind == "multi_worker":
        strategy = multi_worker.make_strategy()
    elif kind == "tpu":
        # Untested here (no TPU): the standard TPU initialisation sequence.
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        strategy = tf.distribute.TPUStrategy(resolver)
    elif kind == "mirrored":
        strategy = tf.distribute.MirroredStrategy()
    else:
        gpus = tf.config.list_logical_devices("GPU")
        strategy = tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
    logging.info("Distribution: %s with %d replica(s) in sync.", kind, strategy.num_replicas_in_sync)
    return strategy


def is_chief():
    """True for the task that writes checkpoints, logs, results and exports."""
    config = json.loads(os.environ.get("TF_CONFIG") or "{}")
    task = config.get("task", {})
    cluster = config.get("cluster", {})
    if not task:
        return True
    if task.get("type") == "chief":
        return True
    # Without an explicit chief, worker 0 is the chief (MultiWorkerMirroredStrategy's convention).
    return "chief" not in cluster and task.get("type") == "worker" and task.get("index", 0) == 0


def _cpu_has_bf16():
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return any(flag in flags for flag in CPU_BF16_FLAGS)


def choose_precision(requested, strategy):
    """Resolves --mixed_precision=auto for the devices of `strategy` and logs why."""
    if requested != "auto":
        policy, why = requested, "requested"
    elif isinstance(strategy, tf.distribute.TPUStrategy):
        policy, why = "mixed_bfloat16", "TPU"
    elif tf.config.list_physical_devices("GPU"):
        gpus = tf.config.list_physical_devices("GPU")
        capability = tf.config.experimental.get_device_details(gpus[0]).get("compute_capability")
        if capability and tuple(capability) >= MIN_FP16_CAPABILITY:
            policy, why = "mixed_float16", f"GPU compute capability {capability} has tensor cores"
        else:
            policy, why = "float32", f"GPU compute capability {capability} lacks tensor cores"
    elif _cpu_has_bf16():
        policy, why = "mixed_bfloat16", "CPU has native bfloat16 (AMX / AVX512-BF16)"
    else:
        policy, why = "float32", "no accelerator with fast 16-bit math"
    logging.info("Precision policy: %s (%s).", policy, why)
    return policy


def choose_jit_compile(requested, strategy, deterministic=False):
    """Resolves --jit_compile=auto for `strategy` (XLA on one GPU only) and logs why.

    Keras's own "auto" turns XLA off under any tf.distribute strategy, including the
    OneDeviceStrategy every run here uses, so a single GPU would lose XLA's fusion of the
    elementwise ops (BatchNorm, ReLU, casts, the residual add) around each convolution.
    """
    if requested != "auto":
        jit, why = requested == "true", "requested"
    elif deterministic:
        jit, why = False, "--deterministic (XLA kernels are not all deterministic)"
    elif isinstance(strategy, tf.distribute.TPUStrategy):
        jit, why = False, "TPUStrategy compiles the whole step with XLA itself"
    elif not tf.config.list_logical_devices("GPU"):
        jit, why = False, "CPU (TensorFlow's oneDNN kernels ran faster than XLA's)"
    elif strategy.num_replicas_in_sync > 1:
        jit, why = False, ("several replicas (Keras's XLA train step with loss scaling has "
                           "crashed under MirroredStrategy: keras-team/keras#21366)")
    else:
        jit, why = True, "one GPU"
    logging.info("XLA (jit_compile): %s (%s).", "on" if jit else "off", why)
    return jit
