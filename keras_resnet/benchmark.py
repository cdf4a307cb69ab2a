"""Training-step benchmark: images/s of `model.fit` on synthetic data, against keras.applications.

    python -m keras_resnet.benchmark --depth=50 --batch_size=32            # project default
    python -m keras_resnet.benchmark --depth=50 --precision=float32,mixed_bfloat16,onednn_bfloat16
    python -m keras_resnet.benchmark --depth=152 --batch_size=128 --jit_compile=false,true
    python -m keras_resnet.benchmark --depth=50 --threads=1,2 --repeats=3

The model, optimizer, loss, metrics, precision policy, strategy and XLA choice are exactly what
`train_main.py` uses (`run.make_model`, `run.compile_model`, `inputs.train_dataset`,
`distribute.choose_precision`); the
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

`--torch` adds rows for the same network in plain PyTorch (torchvision's architecture, SGD with
momentum and the same weight decay, cross-entropy) at the same batch, size and thread count, timed the same way, each in
its own process: `bf16_channels_last` is bfloat16 autocast with channels-last tensors, PyTorch's
fastest CPU setting. The device line names the CPU model and its bfloat16-relevant flags.

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

from absl import flags

from keras_resnet import cli, logs

PRECISIONS = ("auto", "float32", "mixed_bfloat16", "mixed_float16", "onednn_bfloat16")
JIT = ("auto", "true", "false")
NUM_CLASSES = 1000
RESULT_PREFIX = "benchmark-result: "
BASELINE = "keras.applications"
TORCH = "torch"
# PyTorch rows: (autocast to bfloat16, channels-last memory format).
TORCH_SETTINGS = {"float32": (False, False), "float32_channels_last": (False, True),
                  "bf16": (True, False), "bf16_channels_last": (True, True)}
TORCH_AUTO = "bf16_channels_last"
# /proc/cpuinfo flags that decide bfloat16 and matmul speed, shown with the CPU model.
CPU_FLAGS_SHOWN = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16")
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

def define_flags(values):
    flags.DEFINE_integer("depth", 50, "ResNet depth: 18, 34, 50, 101 or 152.", flag_values=values)
    flags.DEFINE_integer("batch_size", 32, "Global batch size.", flag_values=values)
    flags.DEFINE_integer("image_size", 224, "Image height and width in pixels.", flag_values=values)
    flags.DEFINE_list("precision", ["auto"], "Precision settings to compare: "
                      f"{', '.join(PRECISIONS)}.", flag_values=values)
    flags.DEFINE_list("jit_compile", ["auto"], "XLA settings to compare: auto, true, false.", flag_values=values)
    flags.DEFINE_list("threads", ["0"], "Intra-op thread counts to compare (0: TensorFlow's "
                      "default).", flag_values=values)
    flags.DEFINE_integer("inter_op_threads", 0, "Inter-op threads (0: TensorFlow's default).", flag_values=values)
    flags.DEFINE_integer("warmup_steps", 2, "Untimed steps first (tracing, kernel creation).", flag_values=values)
    flags.DEFINE_integer("steps", 5, "Timed steps.", flag_values=values)
    flags.DEFINE_integer("repeats", 1, "Run every setting this many times, interleaved; keep the "
                         "fastest run of each.", flag_values=values)
    flags.DEFINE_bool("baseline", True, "Also time keras.applications ResNet in float32.", flag_values=values)
    flags.DEFINE_float("peak_tflops", 0.0, "Device peak TFLOP/s for the MFU column (0: GPUs in the "
                       "built-in table only).", flag_values=values)
    flags.DEFINE_bool("isolate", True, "Run each setting in a fresh process (needed to compare "
                      "--threads; --noisolate runs them in this one, for quick tests).", flag_values=values)
    flags.DEFINE_string("model", "project", "Internal: project, keras.applications or torch (one "
                        "setting).", flag_values=values)
    flags.DEFINE_bool("child", False, "Internal: run one setting and print its result as JSON.", flag_values=values)
    flags.DEFINE_list("torch", ["auto"], "PyTorch settings to add as rows (same network, batch, "
                      "size and cores; plain torch, no torchvision needed): "
                      f"{', '.join(TORCH_SETTINGS)}; auto: {TORCH_AUTO} when torch is installed; "
                      "none: no row.", flag_values=values)


@dataclasses.dataclass(frozen=True)
class Setting:
    model: str  # "project", BASELINE or TORCH
    precision: str  # for TORCH: a key of TORCH_SETTINGS
    jit_compile: str
    threads: int
    depth: int

    @property
    def label(self):
        if self.model == TORCH:
            return f"torch resnet{self.depth}"
        return f"resnet{self.depth}" if self.model == "project" else _baseline_name(self.depth)


def _baseline_name(depth):
    """keras.applications has ResNet50/101/152; shallower depths compare against ResNet50."""
    return f"{BASELINE}.ResNet{depth if depth in (50, 101, 152) else 50}"


def settings_from_flags(opts):
    """The grid of settings (project model), then the baseline; validated against the choices."""
    from keras_resnet.constants import DEPTHS

    if opts.depth not in DEPTHS:
        raise cli.UsageError(f"--depth={opts.depth}; valid: {', '.join(map(str, DEPTHS))}.")
    for value in opts.precision:
        if value not in PRECISIONS:
            raise cli.UsageError(f"--precision={value!r}; valid: {', '.join(PRECISIONS)}.")
    for value in opts.jit_compile:
        if value not in JIT:
            raise cli.UsageError(f"--jit_compile={value!r}; valid: {', '.join(JIT)}.")
    try:
        threads = [int(t) for t in opts.threads]
    except ValueError:
        raise cli.UsageError(f"--threads={','.join(opts.threads)}; use integers >= 0.") from None
    if any(t < 0 for t in threads):
        raise cli.UsageError(f"--threads={','.join(opts.threads)}; use integers >= 0.")
    if not opts.isolate and len(set(threads)) > 1:
        raise cli.UsageError("Comparing --threads needs --isolate (threads are fixed at start-up).")
    if opts.steps < 1 or opts.warmup_steps < 1 or opts.batch_size < 1 or opts.repeats < 1:
        raise cli.UsageError("--steps, --warmup_steps, --batch_size and --repeats must be >= 1.")
    grid = [Setting("project", p, j, t, opts.depth)
            for p, j, t in itertools.product(opts.precision, opts.jit_compile, threads)]
    if opts.baseline:
        grid.append(Setting(BASELINE, "float32", opts.jit_compile[0], threads[0], opts.depth))
    grid += [Setting(TORCH, p, "false", threads[0], opts.depth) for p in torch_settings(opts)]
    return grid


def torch_settings(opts):
    """The --torch rows to run; a usage error for an unknown one or for torch not installed."""
    import importlib.util

    wanted = [w for w in opts.torch if w != "none"]
    if wanted == ["auto"]:
        return [TORCH_AUTO] if importlib.util.find_spec("torch") else []
    for value in wanted:
        if value not in TORCH_SETTINGS:
            raise cli.UsageError(f"--torch={value!r}; valid: {', '.join(TORCH_SETTINGS)}, auto, "
                                 "none.")
    if wanted and not importlib.util.find_spec("torch"):
        raise cli.UsageError("--torch needs PyTorch: pip install torch (CPU wheels: "
                             "--index-url https://download.pytorch.org/whl/cpu), or --torch=none.")
    return wanted


# ----------------------------------------------------------------------------- one setting


def _configure_runtime(setting, opts):
    """Thread pools and graph options; must run before TensorFlow executes anything."""
    tf = logs.import_tensorflow()

    if setting.threads:
        tf.config.threading.set_intra_op_parallelism_threads(setting.threads)
    if opts.inter_op_threads:
        tf.config.threading.set_inter_op_parallelism_threads(opts.inter_op_threads)
    tf.config.optimizer.set_experimental_options(
        {"auto_mixed_precision_onednn_bfloat16": setting.precision == "onednn_bfloat16"})


def _gpu_name():
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return None
    return tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU")


def peak_tflops(policy, gpu_name, requested=0.0):
    """The device's dense peak TFLOP/s for `policy`, or None when unknown (CPUs, unlisted GPUs)."""
    if requested:
        return requested
    if not gpu_name:
        return None
    import tensorflow as tf

    for key, (half, tf32, fp32) in GPU_PEAK_TFLOPS:
        if key.lower() in gpu_name.lower():
            if policy.startswith("mixed"):
                return half
            return tf32 if tf.config.experimental.is_tensor_float_32_execution_enabled() else fp32
    return None


def _build_project(setting, strategy, opts):
    """The model, compiled, and its dataset, exactly as `train.train_and_evaluate` makes them."""
    from keras_resnet.training import inputs
    from keras_resnet.training import run as train
    from keras_resnet.training.config import Config

    config = Config(depth=opts.depth, image_size=opts.image_size, batch_size=opts.batch_size,
                    dataset="synthetic", epochs=1,
                    steps_per_epoch=opts.warmup_steps + opts.steps,
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


def _build_baseline(setting, strategy, opts):
    """keras.applications ResNet, float32, with float32 [0, 255] images (its usual input)."""
    import keras
    import tensorflow as tf

    from pipelines.dataset import synthetic_dataset

    depth = opts.depth if opts.depth in (50, 101, 152) else 50
    jit = {"auto": "auto", "true": True, "false": False}[setting.jit_compile]
    with strategy.scope():
        model = getattr(keras.applications, f"ResNet{depth}")(
            weights=None, input_shape=(opts.image_size, opts.image_size, 3),
            classes=NUM_CLASSES)
        model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                      loss=keras.losses.SparseCategoricalCrossentropy(),
                      metrics=[keras.metrics.SparseCategoricalAccuracy(name="top1"),
                               keras.metrics.SparseTopKCategoricalAccuracy(k=5, name="top5")],
                      jit_compile=jit)

    def dataset_fn(ctx):
        ds = synthetic_dataset(batch_size=ctx.get_per_replica_batch_size(opts.batch_size),
                               image_size=opts.image_size, num_classes=NUM_CLASSES)
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


def run_setting(setting, opts):
    """Builds and times one setting in this process; returns a JSON-able dict."""
    if setting.model == TORCH:
        return run_torch_setting(setting, opts)
    logs.import_tensorflow()
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
        model, dataset = build(setting, strategy, opts)
        gpu = _gpu_name()
        model.fit(dataset, epochs=1, steps_per_epoch=opts.warmup_steps, verbose=0, shuffle=False)
        if gpu:
            tf.config.experimental.reset_memory_stats("GPU:0")
        timer = _step_timer()
        load_before = os.getloadavg()[0]
        model.fit(dataset, epochs=1, steps_per_epoch=opts.steps, verbose=0, shuffle=False,
                  callbacks=[timer])
        load_after = os.getloadavg()[0]
        peak_memory = tf.config.experimental.get_memory_info("GPU:0")["peak"] if gpu else None
        step = statistics.median(timer.times)
        images_per_sec = opts.batch_size / step
        train_flops = TRAIN_FLOPS_PER_MAC * stats.count_macs(model)
        peak = peak_tflops(policy if setting.precision != "onednn_bfloat16" else "mixed", gpu,
                           opts.peak_tflops)
        mfu = images_per_sec * train_flops / (peak * 1e12) if peak else None
        # What `train_main.py --summary` predicts, to set against the measured peak on GPUs.
        estimate = stats.estimate_memory(model, opts.batch_size,
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
    """`<model name> (N logical CPUs; flags: ...)`: what decides CPU speed and bfloat16."""
    from keras_resnet.training import distribute

    cpu = distribute.read_cpuinfo()
    shown = [f for f in CPU_FLAGS_SHOWN if f in cpu.get("flags", ())]
    return (f"{cpu.get('model') or 'CPU'} ({os.cpu_count()} logical CPUs; flags: "
            f"{' '.join(shown) or 'none of ' + ' '.join(CPU_FLAGS_SHOWN)})")


def run_torch_setting(setting, opts):
    """The same network in PyTorch, trained on one random batch, timed as `run_setting`."""
    logs.import_tensorflow()  # the stage table's module imports Keras: without start-up noise
    import torch

    from keras_resnet.model.torch_resnet import build_torch_resnet

    if setting.threads:
        torch.set_num_threads(setting.threads)
    autocast, channels_last = TORCH_SETTINGS[setting.precision]
    torch.manual_seed(0)
    model = build_torch_resnet(opts.depth, NUM_CLASSES)
    images = torch.rand(opts.batch_size, 3, opts.image_size, opts.image_size) * 255
    labels = torch.randint(0, NUM_CLASSES, (opts.batch_size,))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    # The project's training: SGD with momentum and weight decay (Config's default; an L2 term
    # on the kernels there, added to every parameter's gradient here: about the same work).
    from keras_resnet.training.config import Config

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9,
                                weight_decay=Config().weight_decay)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = loss_fn(model(images), labels)
        loss.backward()
        optimizer.step()
        return float(loss.detach())  # waits for the step

    for _ in range(opts.warmup_steps):
        step()
    times, cpu_times = [], []
    load_before = os.getloadavg()[0]
    for _ in range(opts.steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    images_per_sec = opts.batch_size / statistics.median(times)
    return {"model": TORCH, "label": setting.label, "precision": setting.precision,
            "policy": f"torch {setting.precision}", "jit_compile": "false", "xla": False,
            "threads": setting.threads or torch.get_num_threads(),
            "images_per_sec": images_per_sec, "step_seconds": times, "step_cpu_seconds": cpu_times,
            "train_gflops_per_image": None, "mfu": None, "peak_memory_bytes": None,
            "estimated_memory_bytes": None, "device": _cpu_name(),
            "load": max(load_before, os.getloadavg()[0])}


# ----------------------------------------------------------------------------- the comparison


def _child_argv(setting, opts):
    return [sys.executable, "-m", "keras_resnet.benchmark", "--child", f"--model={setting.model}",
            f"--depth={opts.depth}", f"--batch_size={opts.batch_size}",
            f"--image_size={opts.image_size}", f"--precision={setting.precision}",
            f"--jit_compile={setting.jit_compile}", f"--threads={setting.threads}",
            f"--inter_op_threads={opts.inter_op_threads}",
            f"--warmup_steps={opts.warmup_steps}", f"--steps={opts.steps}",
            f"--peak_tflops={opts.peak_tflops}", "--torch=none"]


def _run_isolated(setting, opts):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, env.get("PYTHONPATH")) if p)
    done = subprocess.run(_child_argv(setting, opts), stdout=subprocess.PIPE, text=True, env=env)
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
    estimate = (f"{r['estimated_memory_bytes'] / 2**30:.2f}"
                if r.get("estimated_memory_bytes") is not None else "-")
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


def main(opts, args):
    if opts.child:
        setting = Setting(opts.model, opts.precision[0], opts.jit_compile[0],
                          int(opts.threads[0]), opts.depth)
        if setting.model != TORCH:
            _configure_runtime(setting, opts)
        print(RESULT_PREFIX + json.dumps(run_setting(setting, opts)), flush=True)
        return 0

    grid = settings_from_flags(opts)
    if not opts.isolate:
        _configure_runtime(grid[0], opts)
    print(f"Training step: ResNet-{opts.depth}, batch {opts.batch_size}, "
          f"{opts.image_size}x{opts.image_size}, channels-last, {opts.warmup_steps} warm-up + "
          f"{opts.steps} timed steps, best of {opts.repeats}, inter-op threads "
          f"{opts.inter_op_threads or 'default'}; images/s = batch / median step.",
          flush=True)
    best = {}
    for _ in range(opts.repeats):
        for setting in grid:
            if opts.isolate:
                result = _run_isolated(setting, opts)
            else:
                import tensorflow as tf

                graph_bf16 = setting.precision == "onednn_bfloat16"
                tf.config.optimizer.set_experimental_options(
                    {"auto_mixed_precision_onednn_bfloat16": graph_bf16})
                result = run_setting(setting, opts)
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
    for r in results:
        if r["model"] == TORCH:
            print(f"{results[0]['label']} {results[0]['policy']} vs {r['label']} "
                  f"{r['precision']}: {results[0]['images_per_sec'] / r['images_per_sec']:.2f}x")
    if baseline_rate:
        print(f"ratio: {results[0]['images_per_sec'] / baseline_rate:.2f}")
    print(f"images/s: {results[0]['images_per_sec']:.2f}")
    return 0


def run(argv=None):
    """The command with `argv` (without the program name; default: sys.argv); exit status."""
    return cli.run(define_flags, main, argv, prog="keras_resnet.benchmark", doc=__doc__)


if __name__ == "__main__":
    sys.exit(run())
