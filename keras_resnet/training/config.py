"""One configuration object for training: defaults, validation and derived values.

Every flag of `train_main.py` is one field here. Defaults follow the standard ImageNet recipe
(Goyal et al. 2017, "Accurate, Large Minibatch SGD"; He et al. 2019, "Bag of Tricks"):
SGD momentum 0.9, learning rate 0.1 per 256 images with 5 warm-up epochs, cosine decay,
label smoothing 0.1, weight decay 1e-4 on kernels only, zero-init of the last BN gamma per block.
"""

import dataclasses
import os

from keras_resnet.constants import DEPTHS, VARIANTS
from pipelines.formats import SCREENS

DATASETS = ("imagenet", "demo", "synthetic")  # plus "tfds:NAME"
PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")
DISTRIBUTIONS = ("auto", "one_device", "mirrored", "multi_worker", "tpu")
LR_SCHEDULES = ("cosine", "step")
FREEZE_GROUPS = ("stem", "stage1", "stage2", "stage3", "stage4", "head")  # network order
REFERENCE_BATCH = 256  # the learning rate is given per 256 images (linear scaling rule)


@dataclasses.dataclass
class Config:
    """Training configuration. Units: epochs, steps (optimizer updates), images, seconds."""

    # Model.
    depth: int = 152
    variant: str = "v1.5"
    conv_bias: bool = False
    dropout: float = 0.0
    zero_init_residual: bool = True
    # Data.
    dataset: str = "imagenet"
    data_dir: str = ""  # default: data/imagenet, data/demo, or TFDS's own data dir
    image_size: int = 224
    cache: str = ""  # "" (off), "memory", or a file path prefix for tf.data's file cache
    check_images: str = "header"  # per-file check when indexing: header, decode or none
    tf_data_service: str = ""  # grpc://HOST:PORT of a tf.data service dispatcher
    # Optimisation.
    batch_size: int = 128  # global, split across replicas
    epochs: int = 90
    base_learning_rate: float = 0.1  # per REFERENCE_BATCH images
    lr_schedule: str = "cosine"
    warmup_epochs: float = 5.0
    step_decay_epochs: tuple = (30, 60, 80)  # for lr_schedule="step": x0.1 at each
    momentum: float = 0.9
    nesterov: bool = False
    label_smoothing: float = 0.1
    weight_decay: float = 1e-4  # SGD weight decay; the kernels' L2 regularizer is half of it
    l1: float = 0.0
    steps_per_epoch: int = 0  # 0: the whole training split
    validation_steps: int = 0  # 0: the whole validation split
    # Run.
    model_dir: str = ""  # default: runs/resnet{depth}_{dataset}
    export_dir: str = ""  # default: saved_models/resnet{depth}_{dataset}
    export: bool = True
    mixed_precision: str = "auto"
    distribution: str = "auto"
    tpu: str = ""
    jit_compile: str = "auto"  # "auto", "true", "false"
    seed: int = 0
    deterministic: bool = False
    checkpoint_every_steps: int = 500
    checkpoint_every_secs: float = 0.0  # 0: off; else also save when this much time has passed
    keep_checkpoints: int = 3
    verbose: str = "auto"  # Keras fit verbosity: "auto", "1" (progress bar), "2" (line per epoch)
    progress_every_secs: float = 60.0  # --verbose=auto without a terminal: a line this often
    # Fine-tuning (issue 15): pretrained weights, frozen parts, head learning rate.
    init_from: str = ""  # weights file (.pth/.pt/.safetensors/.keras) or a run directory
    freeze: tuple = ()  # groups to freeze: stem, stage1..stage4, head
    trainable_from: str = ""  # freeze every group before this one (e.g. stage4)
    head_lr_multiplier: float = 1.0  # the classifier's learning rate = this x the schedule's
    # Inspection (--summary).
    summary: bool = False
    gpu_memory_gib: float = 80.0

    def __post_init__(self):
        self.freeze = tuple(str(g).strip() for g in self.freeze if str(g).strip())
        try:
            self.step_decay_epochs = tuple(int(e) for e in self.step_decay_epochs)
        except (TypeError, ValueError):
            raise ValueError(f"--step_decay_epochs={','.join(map(str, self.step_decay_epochs))}; "
                             "use whole epoch numbers, e.g. 30,60,80.") from None

    # ----- derived values (computed in one place) -----
    @property
    def learning_rate(self):
        """Peak learning rate: linear scaling with the global batch (Goyal et al. 2017)."""
        return self.base_learning_rate * self.batch_size / REFERENCE_BATCH

    @property
    def l2(self):
        """Keras adds `l2 * sum(w**2)` to the loss, whose gradient is `2 * l2 * w`."""
        return self.weight_decay / 2.0

    @property
    def run_name(self):
        return f"resnet{self.depth}_{self.dataset.replace(':', '_').replace('/', '_')}"

    @property
    def resolved_data_dir(self):
        """--data_dir, else the dataset's own default (so the demo never lands in data/imagenet)."""
        if self.data_dir:
            return self.data_dir
        return {"imagenet": "data/imagenet", "demo": "data/demo"}.get(self.dataset, "")

    @property
    def resolved_model_dir(self):
        return self.model_dir or os.path.join("runs", self.run_name)

    @property
    def resolved_export_dir(self):
        return self.export_dir or os.path.join("saved_models", self.run_name)

    @property
    def frozen_groups(self):
        """The groups --freeze and --trainable_from freeze, in network order."""
        before = FREEZE_GROUPS[:FREEZE_GROUPS.index(self.trainable_from)] if self.trainable_from \
            else ()
        return tuple(g for g in FREEZE_GROUPS if g in self.freeze or g in before)

    def warmup_epochs_for_run(self):
        """5 warm-up epochs for full runs, scaled down so short runs still decay (<= epochs/6)."""
        return min(self.warmup_epochs, self.epochs / 6.0)

    def validate(self):
        """Raises ValueError with a one-line message echoing the bad value and the valid ones."""

        def check(ok, message):
            if not ok:
                raise ValueError(message)

        check(self.depth in DEPTHS,
              f"--depth={self.depth} is not a ResNet depth; valid: {', '.join(map(str, DEPTHS))}.")
        check(self.variant in VARIANTS, f"--variant={self.variant!r}; valid: {', '.join(VARIANTS)}.")
        check(self.dataset in DATASETS or (self.dataset.startswith("tfds:") and len(self.dataset) > 5),
              f"--dataset={self.dataset!r}; valid: {', '.join(DATASETS)} or tfds:NAME.")
        check(self.check_images in SCREENS,
              f"--check_images={self.check_images!r}; valid: {', '.join(SCREENS)}.")
        check(self.image_size >= 32, f"--image_size={self.image_size} is too small; use >= 32.")
        check(self.batch_size >= 1, f"--batch_size={self.batch_size}; use a positive integer.")
        check(self.epochs >= 1, f"--epochs={self.epochs}; use a positive integer.")
        check(self.base_learning_rate > 0,
              f"--base_learning_rate={self.base_learning_rate}; use a positive number.")
        check(self.lr_schedule in LR_SCHEDULES,
              f"--lr_schedule={self.lr_schedule!r}; valid: {', '.join(LR_SCHEDULES)}.")
        check(self.warmup_epochs >= 0, f"--warmup_epochs={self.warmup_epochs}; use >= 0.")
        check(0 <= self.momentum < 1, f"--momentum={self.momentum}; use a value in [0, 1).")
        check(0 <= self.label_smoothing < 1,
              f"--label_smoothing={self.label_smoothing}; use a value in [0, 1).")
        check(self.weight_decay >= 0 and self.l1 >= 0,
              f"--weight_decay={self.weight_decay}, --l1={self.l1}; use values >= 0.")
        check(0 <= self.dropout < 1, f"--dropout={self.dropout}; use a value in [0, 1).")
        check(self.steps_per_epoch >= 0 and self.validation_steps >= 0,
              "--steps_per_epoch and --validation_steps must be >= 0 (0 means the whole split).")
        check(self.mixed_precision in PRECISIONS,
              f"--mixed_precision={self.mixed_precision!r}; valid: {', '.join(PRECISIONS)}.")
        check(self.distribution in DISTRIBUTIONS,
              f"--distribution={self.distribution!r}; valid: {', '.join(DISTRIBUTIONS)}.")
        check(self.distribution != "tpu" or self.tpu,
              "--distribution=tpu needs --tpu=NAME (the TPU name or grpc:// address).")
        check(self.jit_compile in ("auto", "true", "false"),
              f"--jit_compile={self.jit_compile!r}; valid: auto, true, false.")
        check(self.checkpoint_every_steps >= 0 and self.checkpoint_every_secs >= 0,
              "--checkpoint_every_steps and --checkpoint_every_secs must be >= 0 (0 disables).")
        check(self.keep_checkpoints >= 1, f"--keep_checkpoints={self.keep_checkpoints}; use >= 1.")
        check(self.verbose in ("auto", "0", "1", "2"),
              f"--verbose={self.verbose!r}; valid: auto, 0, 1, 2.")
        check(not self.tf_data_service or self.tf_data_service.startswith(("grpc://", "grpc+")),
              f"--tf_data_service={self.tf_data_service!r}; use grpc://HOST:PORT.")
        check(self.progress_every_secs >= 0,
              f"--progress_every_secs={self.progress_every_secs}; use >= 0 (0: per epoch only).")
        self._validate_finetuning(check)
        check(self.gpu_memory_gib > 0, f"--gpu_memory_gib={self.gpu_memory_gib}; use > 0.")
        return self

    def _validate_finetuning(self, check):
        groups = ", ".join(FREEZE_GROUPS)
        bad = [g for g in self.freeze if g not in FREEZE_GROUPS]
        check(not bad, f"--freeze={','.join(self.freeze)}: unknown {', '.join(bad)}; valid: {groups}.")
        check(not self.trainable_from or self.trainable_from in FREEZE_GROUPS[1:],
              f"--trainable_from={self.trainable_from!r}; valid: {', '.join(FREEZE_GROUPS[1:])}.")
        check(not (self.freeze and self.trainable_from),
              "pass --freeze or --trainable_from, not both.")
        check(len(self.frozen_groups) < len(FREEZE_GROUPS),
              "--freeze names every part of the network: nothing would train.")
        check(self.head_lr_multiplier > 0,
              f"--head_lr_multiplier={self.head_lr_multiplier}; use a positive number.")
        check(not self.init_from or os.path.exists(self.init_from),
              f"--init_from={self.init_from}: no such file or directory.")

    def to_dict(self):
        d = dataclasses.asdict(self)
        d["step_decay_epochs"] = list(self.step_decay_epochs)
        d["freeze"] = list(self.freeze)
        return d
