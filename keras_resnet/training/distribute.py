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
# AMD's first cores with AVX512-BF16 are Zen 4 (family 0x19, as Zen 3, which lacks the flag).
AMD_ZEN4_FAMILY = 0x19


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
    """Builds the strategy. Must run before any op is placed (multi-worker needs a fresh runtime).

    One device without a GPU is TensorFlow's default strategy, not a OneDeviceStrategy: the
    latter reads every dataset through a MultiDeviceIterator (a GeneratorDataset that tf.data
    cannot optimise, cancelled with a warning whenever Keras drops an iterator) and cost about
    15% of a ResNet-18 step at 64 px on a CPU, for no gain on the device where the data already is.
    """
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
        if not gpus:
            from keras_resnet import logs

            logging.info("No GPU found: training on the CPU (%s).", logs.cpu_name())
            return tf.distribute.get_strategy()
        strategy = tf.distribute.OneDeviceStrategy(gpus[0].name)
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


def read_cpuinfo(path="/proc/cpuinfo"):
    """{"vendor", "family", "model", "flags"} of the first CPU listed; {} when unreadable."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return {}
    fields = {}
    for line in text.split("\n\n")[0].splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    try:
        family = int(fields.get("cpu family", ""))
    except ValueError:
        family = None
    return {"vendor": fields.get("vendor_id", ""), "family": family,
            "model": fields.get("model name", ""),
            # "flags" on x86, "Features" on ARM
            "flags": set((fields.get("flags") or fields.get("Features") or "").split())}


def cpu_bfloat16(cpu):
    """(fast, why): whether bfloat16 matmuls and convolutions beat float32 on `cpu` (as read by
    `read_cpuinfo`). Fast where the CPU has bfloat16 matrix units or dot products oneDNN uses:
    AMX on Intel (AVX512-BF16 alone measured 30% slower than float32 for ResNet-50 on a Xeon
    without AMX), AVX512-BF16 on AMD (Zen 4 and later, measured faster on an EPYC)."""
    flags = cpu.get("flags", set())
    vendor = cpu.get("vendor", "")
    if vendor == "GenuineIntel":
        if "amx_bf16" in flags:
            return True, "Intel CPU with AMX bfloat16 matrix units"
        if "avx512_bf16" in flags:
            return False, ("Intel CPU with AVX512-BF16 but no AMX: bfloat16 measured slower "
                           "than float32 there")
        return False, "Intel CPU without bfloat16 instructions"
    if vendor == "AuthenticAMD":
        if "avx512_bf16" in flags and (cpu.get("family") or 0) >= AMD_ZEN4_FAMILY:
            return True, "AMD CPU with AVX512-BF16 (Zen 4 or later)"
        return False, "AMD CPU without AVX512-BF16"
    if not cpu:
        return False, "CPU model unknown (no /proc/cpuinfo)"
    return False, (f"bfloat16 speed unknown on this CPU ({vendor or 'vendor unknown'}); "
                   "--mixed_precision=mixed_bfloat16 tries it")


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
    else:
        fast, why = cpu_bfloat16(read_cpuinfo())
        policy = "mixed_bfloat16" if fast else "float32"
    logging.info("Precision policy: %s (%s).", policy, why)
    return policy


def choose_jit_compile(requested, strategy, deterministic=False):
    """Resolves --jit_compile=auto for `strategy` (XLA on one GPU only) and logs why.

    Keras's own "auto" turns XLA off under any tf.distribute strategy, including the
    OneDeviceStrategy a one-GPU run uses, so a single GPU would lose XLA's fusion of the
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
