"""Training-step benchmark: images/s of `model.fit` on synthetic data, against keras.applications.

    python -m keras_resnet.benchmark --depth=50 --batch_size=32            # project default
    python -m keras_resnet.benchmark --depth=50 --precision=float32,mixed_bfloat16,onednn_bfloat16
    python -m keras_resnet.benchmark --depth=152 --batch_size=128 --jit_compile=false,true
    python -m keras_resnet.benchmark --depth=50 --threads=1,2 --repeats=3

The model, optimizer, loss, metrics, precision policy, strategy and XLA choice are exactly what
`train_main.py` uses (`train.make_model`, `train._compile`, `distribute.choose_precision`); the
input is one batch of uint8 images held in memory and repeated, so the input pipeline costs
nothing. Each setting (every combination of --precision, --jit_compile and --threads) and the
keras.applications float32 baseline run in a fresh process, because thread pools and graph
rewrite options are fixed when TensorFlow starts. The first `--warmup_steps` steps (tracing,
oneDNN kernel creation) are one `fit` call that is not timed; the next `--steps` steps are a
second `fit` call timed step by step, and images/s is the batch size over the median step time
(robust to other processes on a shared machine); the `cpu s` column, CPU seconds of the process
per step, moves even less with other load on a CPU. On GPUs the table adds the peak memory of
GPU:0 (next to the `--summary` estimate) and the model FLOPs utilisation for the cards in
`GPU_PEAK_TFLOPS` (these GPU paths are untested: no GPU was available when they were written).
The last line printed is `images/s: <number>` for the first setting.

`--precision=onednn_bfloat16` keeps the float32 Keras policy and lets TensorFlow's graph optimizer
rewrite the training graph to bfloat16 (grappler `auto_mixed_precision_onednn_bfloat16`, CPUs).
"""

import dataclasses
import itertools
import json
import os
import statistics
import subprocess
import sys
import time

from absl import app, flags

PRECISIONS = ("auto", "float32", "mixed_bfloat16", "mixed_float16", "onednn_bfloat16")
JIT = ("auto", "true", "false")
NUM_CLASSES = 1000
RESULT_PREFIX = "benchmark-result: "
BASELINE = "keras.applications"
# Training FLOPs per image = 3 x the forward FLOPs (the backward pass computes two products per
# forward one: input and weight gradients); one multiply-accumulate is two FLOPs.
TRAIN_FLOPS_PER_MAC = 3 * 2

# Dense (no sparsity) peak TFLOP/s from NVIDIA's data sheets: (16-bit tensor core, TF32, FP32).
# Matched on the device name, most specific first. Untested here (no GPU was available).
GPU_PEAK_TFLOPS = (
    ("H100 PCIe", (756.0, 378.0, 51.0)),
    ("H100", (989.0, 494.0, 67.0)),
    ("H200", (989.0, 494.0, 67.0)),
    ("A100", (312.0, 156.0, 19.5)),
    ("RTX A6000", (154.8, 77.4, 38.7)),
    ("L40S", (362.0, 183.0, 91.6)),
    ("A10", (125.0, 62.5, 31.2)),
    ("L4", (121.0, 60.0, 30.3)),
    ("V100", (125.0, 15.7, 15.7)),  # no bfloat16 or TF32: float16 only
    ("T4", (65.0, 8.1, 8.1)),
)

flags.DEFINE_integer("depth", 50, "ResNet depth: 18, 34, 50, 101 or 152.")
flags.DEFINE_integer("batch_size", 32, "Global batch size.")
flags.DEFINE_integer("image_size", 224, "Image height and width in pixels.")
flags.DEFINE_list("precision", ["auto"], f"Precision settings to compare: {', '.join(PRECISIONS)}.")
flags.DEFINE_list("jit_compile", ["auto"], "XLA settings to compare: auto, true, false.")
flags.DEFINE_list("threads", ["0"], "Intra-op thread counts to compare (0: TensorFlow's default).")
flags.DEFINE_integer("inter_op_threads", 0, "Inter-op threads (0: TensorFlow's default).")
flags.DEFINE_integer("warmup_steps", 2, "Untimed steps first (tracing, kernel creation).")
flags.DEFINE_integer("steps", 5, "Timed steps.")
flags.DEFINE_integer("repeats", 1, "Run every setting this many times, interleaved; keep the "
                     "fastest run of each.")
flags.DEFINE_bool("baseline", True, "Also time keras.applications ResNet in float32.")
flags.DEFINE_float("peak_tflops", 0.0, "Device peak TFLOP/s for the MFU column (0: GPUs in the "
                   "built-in table only).")
flags.DEFINE_bool("isolate", True, "Run each setting in a fresh process (needed to compare "
                  "--threads; --noisolate runs them in this one, for quick tests).")
flags.DEFINE_string("model", "project", "Internal: project or keras.applications (one setting).")
flags.DEFINE_bool("child", False, "Internal: run one setting and print its result as JSON.")
FLAGS = flags.FLAGS


@dataclasses.dataclass(frozen=True)
class Setting:
    model: str  # "project" or BASELINE
    precision: str
    jit_compile: str
    threads: int

    @property
    def label(self):
        return f"resnet{FLAGS.depth}" if self.model == "project" else _baseline_name(FLAGS.depth)


def _baseline_name(depth):
    """keras.applications has ResNet50/101/152; shallower depths compare against ResNet50."""
    return f"{BASELINE}.ResNet{depth if depth in (50, 101, 152) else 50}"


def settings_from_flags():
    """The grid of settings (project model), then the baseline; validated against the choices."""
    from keras_resnet.model.resnet import DEPTHS

    if FLAGS.depth not in DEPTHS:
        raise app.UsageError(f"--depth={FLAGS.depth}; valid: {', '.join(map(str, DEPTHS))}.")
    for value in FLAGS.precision:
        if value not in PRECISIONS:
            raise app.UsageError(f"--precision={value!r}; valid: {', '.join(PRECISIONS)}.")
    for value in FLAGS.jit_compile:
        if value not in JIT:
            raise app.UsageError(f"--jit_compile={value!r}; valid: {', '.join(JIT)}.")
    try:
        threads = [int(t) for t in FLAGS.threads]
    except ValueError:
        raise app.UsageError(f"--threads={','.join(FLAGS.threads)}; use integers >= 0.") from None
    if any(t < 0 for t in threads):
        raise app.UsageError(f"--threads={','.join(FLAGS.threads)}; use integers >= 0.")
    if not FLAGS.isolate and len(set(threads)) > 1:
        raise app.UsageError("Comparing --threads needs --isolate (threads are fixed at start-up).")
    if FLAGS.steps < 1 or FLAGS.warmup_steps < 1 or FLAGS.batch_size < 1 or FLAGS.repeats < 1:
        raise app.UsageError("--steps, --warmup_steps, --batch_size and --repeats must be >= 1.")
    grid = [Setting("project", p, j, t)
            for p, j, t in itertools.product(FLAGS.precision, FLAGS.jit_compile, threads)]
    if FLAGS.baseline:
        grid.append(Setting(BASELINE, "float32", FLAGS.jit_compile[0], threads[0]))
    return grid


# ----------------------------------------------------------------------------- one setting


def _configure_runtime(setting):
    """Thread pools and graph options; must run before TensorFlow executes anything."""
    import tensorflow as tf

    if setting.threads:
        tf.config.threading.set_intra_op_parallelism_threads(setting.threads)
    if FLAGS.inter_op_threads:
        tf.config.threading.set_inter_op_parallelism_threads(FLAGS.inter_op_threads)
    tf.config.optimizer.set_experimental_options(
        {"auto_mixed_precision_onednn_bfloat16": setting.precision == "onednn_bfloat16"})


def _gpu_name():
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return None
    return tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU")


def peak_tflops(policy, gpu_name):
    """The device's dense peak TFLOP/s for `policy`, or None when unknown (CPUs, unlisted GPUs)."""
    if FLAGS.peak_tflops:
        return FLAGS.peak_tflops
    if not gpu_name:
        return None
    import tensorflow as tf

    for key, (half, tf32, fp32) in GPU_PEAK_TFLOPS:
        if key.lower() in gpu_name.lower():
            if policy.startswith("mixed"):
                return half
            return tf32 if tf.config.experimental.is_tensor_float_32_execution_enabled() else fp32
    return None


def _build_project(setting, strategy):
    """The model, compiled, and its dataset, exactly as `train.train_and_evaluate` makes them."""
    from keras_resnet.training import inputs
    from keras_resnet.training import run as train
    from keras_resnet.training.config import Config

    config = Config(depth=FLAGS.depth, image_size=FLAGS.image_size, batch_size=FLAGS.batch_size,
                    dataset="synthetic", epochs=1,
                    steps_per_epoch=FLAGS.warmup_steps + FLAGS.steps,
                    mixed_precision="float32" if setting.precision == "onednn_bfloat16"
                    else setting.precision,
                    jit_compile=setting.jit_compile).validate()
    data = inputs.load_data(config)  # synthetic: no files
    with strategy.scope():
        model = train.make_model(config, data.num_classes)
        train.compile_model(model, config, data.num_classes, data.steps_per_epoch)
    dataset = inputs.train_dataset(config, data, strategy, start_epoch=0, num_epochs=1,
                                   skip_steps=0)
    return model, dataset


def _build_baseline(setting, strategy):
    """keras.applications ResNet, float32, with float32 [0, 255] images (its usual input)."""
    import keras
    import tensorflow as tf

    from pipelines.dataset import synthetic_dataset

    depth = FLAGS.depth if FLAGS.depth in (50, 101, 152) else 50
    jit = {"auto": "auto", "true": True, "false": False}[setting.jit_compile]
    with strategy.scope():
        model = getattr(keras.applications, f"ResNet{depth}")(
            weights=None, input_shape=(FLAGS.image_size, FLAGS.image_size, 3),
            classes=NUM_CLASSES)
        model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                      loss=keras.losses.SparseCategoricalCrossentropy(),
                      metrics=[keras.metrics.SparseCategoricalAccuracy(name="top1"),
                               keras.metrics.SparseTopKCategoricalAccuracy(k=5, name="top5")],
                      jit_compile=jit)

    def dataset_fn(ctx):
        ds = synthetic_dataset(batch_size=ctx.get_per_replica_batch_size(FLAGS.batch_size),
                               image_size=FLAGS.image_size, num_classes=NUM_CLASSES)
        return ds.map(lambda x, y: (tf.cast(x, tf.float32), y)).prefetch(1)

    return model, strategy.distribute_datasets_from_function(dataset_fn)


def _step_timer():
    """A Keras callback that records the wall time of each training step."""
    import keras

    class StepTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.times, self.cpu_times = [], []

        def on_train_batch_begin(self, batch, logs=None):
            self._start, self._cpu_start = time.perf_counter(), time.process_time()

        def on_train_batch_end(self, batch, logs=None):
            float((logs or {}).get("loss", 0.0))  # reading the loss waits for the step to finish
            self.times.append(time.perf_counter() - self._start)
            self.cpu_times.append(time.process_time() - self._cpu_start)

    return StepTimer()


def run_setting(setting):
    """Builds and times one setting in this process; returns a JSON-able dict."""
    import keras
    import tensorflow as tf

    from keras_resnet.model import stats
    from keras_resnet.training import distribute

    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    strategy = distribute.make_strategy("auto")
    requested = "float32" if setting.precision == "onednn_bfloat16" else setting.precision
    policy = distribute.choose_precision(requested, strategy)
    keras.mixed_precision.set_global_policy(policy)
    try:
        build = _build_project if setting.model == "project" else _build_baseline
        model, dataset = build(setting, strategy)
        gpu = _gpu_name()
        model.fit(dataset, epochs=1, steps_per_epoch=FLAGS.warmup_steps, verbose=0, shuffle=False)
        if gpu:
            tf.config.experimental.reset_memory_stats("GPU:0")
        timer = _step_timer()
        load_before = os.getloadavg()[0]
        model.fit(dataset, epochs=1, steps_per_epoch=FLAGS.steps, verbose=0, shuffle=False,
                  callbacks=[timer])
        load_after = os.getloadavg()[0]
        peak_memory = tf.config.experimental.get_memory_info("GPU:0")["peak"] if gpu else None
        step = statistics.median(timer.times)
        images_per_sec = FLAGS.batch_size / step
        train_flops = TRAIN_FLOPS_PER_MAC * stats.count_macs(model)
        peak = peak_tflops(policy if setting.precision != "onednn_bfloat16" else "mixed", gpu)
        mfu = images_per_sec * train_flops / (peak * 1e12) if peak else None
        # What `train_main.py --summary` predicts, to set against the measured peak on GPUs.
        estimate = stats.estimate_memory(model, FLAGS.batch_size,
                                         mixed_precision=policy.startswith("mixed"))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    return {
        "model": setting.model,
        "label": setting.label,
        "precision": setting.precision,
        "policy": policy if setting.precision != "onednn_bfloat16" else "float32+graph bf16",
        "jit_compile": setting.jit_compile,
        "xla": bool(model.jit_compile),
        "threads": setting.threads or "default",
        "images_per_sec": images_per_sec,
        "step_seconds": timer.times,
        # CPU seconds of this process per step: on a busy shared machine this moves less with
        # the other processes' load than wall time does (CPU only; on GPUs it is host time).
        "step_cpu_seconds": timer.cpu_times,
        "train_gflops_per_image": train_flops / 1e9,
        "mfu": mfu,
        "peak_memory_bytes": peak_memory,
        "estimated_memory_bytes": estimate.total_bytes,
        "device": gpu or _cpu_name(),
        "load": max(load_before, load_after),
    }


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f
                         if line.startswith("model name")), "CPU")
    except OSError:
        name = "CPU"
    return f"{name} ({os.cpu_count()} logical CPUs)"


# ----------------------------------------------------------------------------- the comparison


def _child_argv(setting):
    return [sys.executable, "-m", "keras_resnet.benchmark", "--child", f"--model={setting.model}",
            f"--depth={FLAGS.depth}", f"--batch_size={FLAGS.batch_size}",
            f"--image_size={FLAGS.image_size}", f"--precision={setting.precision}",
            f"--jit_compile={setting.jit_compile}", f"--threads={setting.threads}",
            f"--inter_op_threads={FLAGS.inter_op_threads}",
            f"--warmup_steps={FLAGS.warmup_steps}", f"--steps={FLAGS.steps}",
            f"--peak_tflops={FLAGS.peak_tflops}"]


def _run_isolated(setting):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, env.get("PYTHONPATH")) if p)
    done = subprocess.run(_child_argv(setting), stdout=subprocess.PIPE, text=True, env=env)
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    raise RuntimeError(f"The benchmark of {setting} failed (exit status {done.returncode}); "
                       "its error is printed above.")


def _fmt_row(r, baseline_rate):
    times = r["step_seconds"]
    ratio = f"{r['images_per_sec'] / baseline_rate:.2f}x" if baseline_rate else "-"
    mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
    memory = (f"{r['peak_memory_bytes'] / 2**30:.2f}" if r.get("peak_memory_bytes") is not None
              else "-")
    estimate = f"{r['estimated_memory_bytes'] / 2**30:.2f}"
    policy = r["policy"] if r["precision"] != "auto" else f"auto={r['policy']}"
    xla = f"{r['jit_compile']}={'on' if r['xla'] else 'off'}"
    cpu = statistics.median(r["step_cpu_seconds"])
    return (f"{r['label']:<30} {policy:<24} {xla:<10} {r['threads']:>7} "
            f"{r['images_per_sec']:>9.2f} {statistics.median(times):>7.3f} "
            f"{min(times):>6.3f}-{max(times):<6.3f} {cpu:>6.2f} {ratio:>8} {mfu:>6} {memory:>8} "
            f"{estimate:>8} {r['load']:>5.2f}")


HEADER = (f"{'model':<30} {'precision':<24} {'xla':<10} {'threads':>7} {'images/s':>9} "
          f"{'step s':>7} {'min-max s':<13} {'cpu s':>6} {'vs base':>8} {'MFU':>6} "
          f"{'peak GiB':>8} {'est GiB':>8} {'load':>5}")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}.")
    if FLAGS.child:
        setting = Setting(FLAGS.model, FLAGS.precision[0], FLAGS.jit_compile[0],
                          int(FLAGS.threads[0]))
        _configure_runtime(setting)
        print(RESULT_PREFIX + json.dumps(run_setting(setting)), flush=True)
        return 0

    grid = settings_from_flags()
    if not FLAGS.isolate:
        _configure_runtime(grid[0])
    print(f"Training step: ResNet-{FLAGS.depth}, batch {FLAGS.batch_size}, "
          f"{FLAGS.image_size}x{FLAGS.image_size}, channels-last, {FLAGS.warmup_steps} warm-up + "
          f"{FLAGS.steps} timed steps, best of {FLAGS.repeats}, inter-op threads "
          f"{FLAGS.inter_op_threads or 'default'}; images/s = batch / median step.",
          flush=True)
    best = {}
    for _ in range(FLAGS.repeats):
        for setting in grid:
            if FLAGS.isolate:
                result = _run_isolated(setting)
            else:
                import tensorflow as tf

                graph_bf16 = setting.precision == "onednn_bfloat16"
                tf.config.optimizer.set_experimental_options(
                    {"auto_mixed_precision_onednn_bfloat16": graph_bf16})
                result = run_setting(setting)
            print(f"  {result['label']} {result['policy']} xla={result['xla']} "
                  f"threads={result['threads']}: {result['images_per_sec']:.2f} images/s "
                  f"(load {result['load']:.2f})", flush=True)
            if setting not in best or result["images_per_sec"] > best[setting]["images_per_sec"]:
                best[setting] = result

    results = [best[s] for s in grid]
    baseline = next((r for r in results if r["model"] == BASELINE), None)
    baseline_rate = baseline["images_per_sec"] if baseline else None
    print(f"\nDevice: {results[0]['device']}. Training GFLOPs per image: "
          f"{results[0]['train_gflops_per_image']:.1f} (3 x 2 x forward MACs). 'vs base': images/s "
          f"over {baseline['label'] + ' float32' if baseline else 'no baseline'}; 'load': 1-min "
          "load average during the timed steps; 'cpu s': CPU seconds of the process per step (less "
          "sensitive to other processes than wall time); 'peak GiB': measured on GPU:0; 'est GiB': "
          "the --summary estimate.")
    print(HEADER)
    for r in results:
        print(_fmt_row(r, baseline_rate))
    if baseline_rate:
        print(f"ratio: {results[0]['images_per_sec'] / baseline_rate:.2f}")
    print(f"images/s: {results[0]['images_per_sec']:.2f}")
    return 0


if __name__ == "__main__":
    app.run(main)
