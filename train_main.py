"""Train a ResNet on ImageNet (or the demo / a TFDS dataset) with Keras `model.fit`.

    python train_main.py --depth=152 --batch_size=128
    python train_main.py --dataset=demo --depth=18 --epochs=10
    python train_main.py --depth=152 --summary          # architecture, MACs, memory; no data

Run the same command again after a crash or a kill: training resumes where it stopped.
Flags can also come from a file: --flagfile=my_run.flags. Every flag is a `Config` field.
"""

import dataclasses
import sys

from absl import app, flags

from keras_resnet import files, logs  # no TensorFlow import
from keras_resnet.training.config import Config  # no TensorFlow import

HELP = {
    "depth": "ResNet depth: 18, 34, 50, 101 or 152.",
    "variant": "v1.5 (stride on the 3x3 conv, torchvision) or v1 (stride on the first 1x1, paper).",
    "conv_bias": "Give every convolution a bias (PyTorch's nn.Conv2d default, as in the PyTorch ResNet-152 tutorial).",
    "dropout": "Dropout rate before the classifier (0 disables it).",
    "zero_init_residual": "Start the last BatchNorm gamma of each residual block at zero.",
    "dataset": "imagenet (Kaggle or ImageFolder layout at --data_dir), demo, shards (the --out of "
               "python -m pipelines.prepare), synthetic, tfds:NAME.",
    "data_dir": "Where the dataset lies (for demo: where it is generated on first use). Default: "
                "data/imagenet, data/demo, or TFDS's data dir for tfds:NAME.",
    "check_images": "Per-file check when the file index is built: header (empty, truncated and "
                    "non-image files), decode (also decodes every image once: finds corrupt "
                    "files by name; slow) or none.",
    "image_size": "Training crop / evaluation size in pixels.",
    "cache": "'' (off), 'memory' or a file path prefix: caches the preprocessed validation "
             "images and holds the encoded training files in memory (up to 1 GiB: small datasets).",
    "tf_data_service": "grpc://HOST:PORT of a tf.data service dispatcher to run the input pipeline.",
    "batch_size": "Global batch size, split evenly across replicas.",
    "epochs": "Number of epochs.",
    "base_learning_rate": "Learning rate per 256 images; the peak rate is this x batch_size/256.",
    "lr_schedule": "cosine or step (x0.1 at --step_decay_epochs), after linear warm-up.",
    "warmup_epochs": "Linear warm-up epochs (capped at epochs/6 for short runs).",
    "step_decay_epochs": "Epochs at which the step schedule multiplies the rate by 0.1.",
    "momentum": "SGD momentum.",
    "nesterov": "Use Nesterov momentum.",
    "label_smoothing": "Label smoothing of the cross-entropy loss.",
    "weight_decay": "Weight decay on conv and Dense kernels (as an L2 regularizer of half this).",
    "l1": "L1 regularizer strength on conv and Dense kernels.",
    "steps_per_epoch": "Training steps per epoch (0: the whole training split).",
    "validation_steps": "Validation steps per epoch (0: the whole validation split).",
    "model_dir": "Checkpoints, logs, results.json (default runs/resnet{depth}_{dataset}).",
    "export_dir": "SavedModel export base (default saved_models/resnet{depth}_{dataset}).",
    "export": "Export a SavedModel when training ends.",
    "mixed_precision": "auto, float32, mixed_float16 or mixed_bfloat16.",
    "distribution": "auto, one_device, mirrored, multi_worker (TF_CONFIG) or tpu.",
    "tpu": "TPU name or grpc:// address for --distribution=tpu.",
    "jit_compile": "XLA compilation of the train step: auto, true or false.",
    "seed": "Random seed (data order, augmentation, initialisation).",
    "deterministic": "Reproducible run: deterministic ops and input order (slower).",
    "checkpoint_every_steps": "Save a resumable checkpoint every N steps (0: only per epoch).",
    "checkpoint_every_secs": "Also save when this many seconds passed since the last save (0: off).",
    "keep_checkpoints": "How many recent checkpoints to keep.",
    "verbose": "Progress output: auto (Keras's bar on a terminal; in a log file a line every "
               "--progress_every_secs and one per epoch), 0, 1 (Keras's bar) or 2 (a line per "
               "epoch).",
    "progress_every_secs": "With --verbose=auto and no terminal: seconds between progress lines "
                           "(0: one line per epoch only).",
    # Fine-tuning.
    "init_from": "Start from these weights: a torchvision/timm .pth/.pt or .safetensors file, a "
                 ".keras file or a run directory. A classifier of another class count is newly "
                 "initialised. Ignored (with a message) when the run resumes from a checkpoint.",
    "freeze": "Parts to keep fixed: any of stem, stage1, stage2, stage3, stage4, head; their "
              "BatchNorm layers run in inference mode.",
    "trainable_from": "Freeze every part before this one (stage1..stage4 or head).",
    "head_lr_multiplier": "The classifier's learning rate is this times the schedule's.",
    "summary": "Print the model summary, parameter counts, MACs and a memory estimate, then exit.",
    "gpu_memory_gib": "Accelerator memory for the largest-batch estimate of --summary.",
    # Recipe (configs/*.flags): resolution, crop, augmentation, EMA, weight-decay groups.
    "train_image_size": "Training crop in pixels (0: --image_size); FixRes recipes train smaller.",
    "eval_image_size": "Evaluation center crop and export size in pixels (0: --image_size).",
    "eval_resize_size": "Shorter side before the evaluation crop (0: eval crop x 256/224).",
    "crop_area_range": "RandomResizedCrop area range as fractions of the image: min,max in (0, 1].",
    "crop_aspect_range": "RandomResizedCrop aspect (width/height) range: min,max (3/4 allowed).",
    "auto_augment": "Per-image policy after crop and flip: '' (off), ta_wide "
                    "(TrivialAugmentWide) or randaugment (--ra_num_ops, --ra_magnitude).",
    "ra_num_ops": "RandAugment: ops per image.",
    "ra_magnitude": "RandAugment: magnitude bin, 0..30 (of 31).",
    "random_erase": "Random erasing probability per image (torchvision RandomErasing).",
    "random_erase_value": "Erased pixels: mean (torchvision's value 0 after normalisation) or "
                          "random (normal noise).",
    "mixup_alpha": "Mixup Beta(alpha, alpha) per batch (0: off).",
    "cutmix_alpha": "CutMix Beta(alpha, alpha) per batch (0: off).",
    "mix_switch_prob": "With mixup and cutmix on: probability that a batch uses cutmix.",
    "mix_prob": "Probability that a batch is mixed at all.",
    "repeated_aug": "Repeated augmentation: each image drawn in an epoch is seen this many times "
                    "with different augmentations (epoch length unchanged; 1: off).",
    "ema": "Keep an exponential moving average of the weights (BatchNorm statistics included); "
           "validation, best.keras and the export use it.",
    "ema_decay": "EMA decay as torchvision's --model-ema-decay (per step at batch 1, scaled by "
                 "global batch x --ema_every_steps / epochs).",
    "ema_every_steps": "Update the EMA every N optimizer steps.",
    "ema_warmup": "Warm the EMA decay up as min(decay, (1 + n) / (10 + n)) after n updates.",
    "norm_weight_decay": "SGD weight decay on BatchNorm gamma and beta (as an L2 of half this).",
}


def _define_flags():
    """One absl flag per Config field, with the field's default."""
    for field in dataclasses.fields(Config):
        default, name, help_text = field.default, field.name, HELP[field.name]
        if isinstance(default, bool):
            flags.DEFINE_bool(name, default, help_text)
        elif isinstance(default, int):
            flags.DEFINE_integer(name, default, help_text)
        elif isinstance(default, float):
            flags.DEFINE_float(name, default, help_text)
        elif isinstance(default, tuple):
            flags.DEFINE_list(name, [str(v) for v in default], help_text)
        else:
            flags.DEFINE_string(name, default, help_text)


_define_flags()
flags.DEFINE_integer("tf_log_level", None, "TensorFlow's C++ log level (TF_CPP_MIN_LOG_LEVEL): 0 "
                     "all, 1 warnings and errors, 2 errors, 3 none. Default: the "
                     "TF_CPP_MIN_LOG_LEVEL environment variable, else 1.")
FLAGS = flags.FLAGS


def config_from_flags():
    return Config(**{f.name: FLAGS[f.name].value for f in dataclasses.fields(Config)})


def main(argv):
    if len(argv) > 1:
        return _fail(f"unexpected arguments: {' '.join(argv[1:])}; flags look like --depth=50.")
    try:
        config = config_from_flags().validate()
    except ValueError as e:
        return _fail(e)

    logs.setup(FLAGS.tf_log_level, absl_app=True)
    logs.import_tensorflow()  # heavy import after flags are checked, without start-up noise
    from keras_resnet.training import run as train

    if config.summary:
        print(train.summarize(config))
        return 0
    try:
        train.train_and_evaluate(config)
    except train.UserError as e:
        return _fail(e)
    except train.Interrupted as e:  # already logged; not finished, so not exit status 0
        return e.exit_status
    except Exception as e:  # a full disk, from Python's writes or TensorFlow's (an OpError)
        message = files.no_space_message(
            e, config.resolved_model_dir,
            "training resumes from its last checkpoint; what was written before is kept")
        if message is None:
            raise
        return _fail(message)
    return 0


def _fail(error):
    """One line on stderr, exit status 2: what was wrong and what to do."""
    print(f"error: {error}", file=sys.stderr)
    return 2


def run():
    app.run(main)


if __name__ == "__main__":
    run()
