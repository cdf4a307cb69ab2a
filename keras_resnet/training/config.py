"""One configuration object for training: defaults, validation and derived values.

Every flag of `train_main.py` is one field here. Defaults follow the standard ImageNet recipe
(Goyal et al. 2017, "Accurate, Large Minibatch SGD"; He et al. 2019, "Bag of Tricks"):
SGD momentum 0.9, learning rate 0.1 per 256 images with 5 warm-up epochs, cosine decay,
label smoothing 0.1, weight decay 1e-4 on kernels only, zero-init of the last BN gamma per block.
"""

import dataclasses
import math
import os

from keras_resnet.constants import DEPTHS, VARIANTS
from pipelines.formats import SCREENS

MAX_RA_OPS = 16
DATASETS = ("imagenet", "demo", "shards", "synthetic")  # plus "tfds:NAME"
PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")
DISTRIBUTIONS = ("auto", "one_device", "mirrored", "multi_worker", "tpu")
LR_SCHEDULES = ("cosine", "step")
FREEZE_GROUPS = ("stem", "stage1", "stage2", "stage3", "stage4", "head")  # network order
AUTO_AUGMENTS = ("", "ta_wide", "randaugment")  # as pipelines.augment.AUTO_AUGMENTS
ERASE_VALUES = ("mean", "random")
EVAL_RESIZE_RATIO = 256 / 224  # as pipelines.preprocessing (no TensorFlow import here)
REFERENCE_BATCH = 256  # the learning rate is given per 256 images (linear scaling rule)


def _number(text):
    """A float from a flag list item: '0.08', '3/4' or a number."""
    if isinstance(text, str) and "/" in text:
        num, den = text.split("/", 1)
        return float(num) / float(den)
    return float(text)


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
    # Recipe: resolution, crop, augmentation, EMA, weight-decay groups (configs/*.flags).
    train_image_size: int = 0  # 0: image_size
    eval_image_size: int = 0  # 0: image_size
    eval_resize_size: int = 0  # 0: eval_image_size * 256/224
    crop_area_range: tuple = (0.08, 1.0)  # RandomResizedCrop scale (fraction of the area)
    crop_aspect_range: tuple = (3.0 / 4.0, 4.0 / 3.0)  # RandomResizedCrop ratio (width/height)
    auto_augment: str = ""  # "", "ta_wide" (TrivialAugmentWide) or "randaugment"
    ra_num_ops: int = 2
    ra_magnitude: int = 9  # bin of 31
    random_erase: float = 0.0  # probability
    random_erase_value: str = "mean"
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_switch_prob: float = 0.5  # with both alphas > 0: probability a batch uses cutmix
    mix_prob: float = 1.0  # probability a batch is mixed at all
    repeated_aug: int = 1
    ema: bool = False
    ema_decay: float = 0.99998  # torchvision --model-ema-decay (adjusted, see ema_update_decay)
    ema_every_steps: int = 32
    ema_warmup: bool = True
    norm_weight_decay: float = 0.0  # SGD weight decay on BatchNorm gamma/beta

    def __post_init__(self):
        self.freeze = tuple(str(g).strip() for g in self.freeze if str(g).strip())
        try:
            self.step_decay_epochs = tuple(int(e) for e in self.step_decay_epochs)
        except (TypeError, ValueError):
            raise ValueError(f"--step_decay_epochs={','.join(map(str, self.step_decay_epochs))}; "
                             "use whole epoch numbers, e.g. 30,60,80.") from None
        for name in ("crop_area_range", "crop_aspect_range"):
            value = getattr(self, name)
            try:
                pair = tuple(_number(v) for v in value)
            except (TypeError, ValueError):
                pair = ()
            if len(pair) != 2:
                raise ValueError(f"--{name}={','.join(map(str, value))}; use two numbers, "
                                 "e.g. 0.08,1.") from None
            setattr(self, name, pair)

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

    @property
    def resolved_train_image_size(self):
        return self.train_image_size or self.image_size

    @property
    def resolved_eval_image_size(self):
        return self.eval_image_size or self.image_size

    @property
    def resolved_eval_resize_size(self):
        """Shorter side before the evaluation center crop (FixRes: e.g. 232 for 224)."""
        return self.eval_resize_size or int(round(self.resolved_eval_image_size *
                                                  EVAL_RESIZE_RATIO))

    @property
    def ema_update_decay(self):
        """Decay per EMA update, torchvision's reference: alpha = (1 - ema_decay) * global batch *
        ema_every_steps / epochs, clipped to 1 (the average spans a fixed share of the run)."""
        alpha = (1.0 - self.ema_decay) * self.batch_size * self.ema_every_steps / self.epochs
        return 1.0 - min(1.0, alpha)

    def recipe_lines(self):
        """The resolved training recipe, one 'name: value' line each (the start-up log block)."""
        rows = [
            ("model", f"ResNet-{self.depth} {self.variant}"),
            ("epochs", self.epochs),
            ("global batch", self.batch_size),
            ("peak learning rate", f"{self.learning_rate:g} ({self.base_learning_rate:g} per "
                                   f"{REFERENCE_BATCH}), {self.lr_schedule}, warm-up "
                                   f"{self.warmup_epochs_for_run():g} epochs"),
            ("optimizer", f"SGD momentum {self.momentum:g}{' nesterov' if self.nesterov else ''}"),
            ("weight decay", f"{self.weight_decay:g} kernels, {self.norm_weight_decay:g} "
                             "BatchNorm gamma/beta"),
            ("label smoothing", self.label_smoothing),
            ("train crop", f"{self.resolved_train_image_size} px, area "
                           f"{self.crop_area_range[0]:g}-{self.crop_area_range[1]:g}, aspect "
                           f"{self.crop_aspect_range[0]:.3g}-{self.crop_aspect_range[1]:.3g}"),
            ("eval", f"resize {self.resolved_eval_resize_size}, crop "
                     f"{self.resolved_eval_image_size}"),
            ("auto augment", (f"{self.auto_augment}" + (
                f" N={self.ra_num_ops} M={self.ra_magnitude}"
                if self.auto_augment == "randaugment" else "")) or "off"),
            ("random erasing", f"p={self.random_erase:g} ({self.random_erase_value})"
                               if self.random_erase else "off"),
            ("mixup / cutmix", f"alpha {self.mixup_alpha:g} / {self.cutmix_alpha:g}, switch "
                               f"{self.mix_switch_prob:g}, p={self.mix_prob:g}"
                               if self.mixup_alpha or self.cutmix_alpha else "off"),
            ("repeated augmentation", self.repeated_aug if self.repeated_aug > 1 else "off"),
            ("EMA", f"decay {self.ema_update_decay:.6g} per update every {self.ema_every_steps} "
                    f"steps (--ema_decay={self.ema_decay:g}), warm-up "
                    f"{'on' if self.ema_warmup else 'off'}" if self.ema else "off"),
        ]
        if self.init_from or self.frozen_groups or self.head_lr_multiplier != 1.0:
            rows.append(("fine-tuning", ", ".join(filter(None, [
                f"from {self.init_from}" if self.init_from else "",
                f"frozen {'+'.join(self.frozen_groups)}" if self.frozen_groups else "",
                f"head learning rate x{self.head_lr_multiplier:g}"
                if self.head_lr_multiplier != 1.0 else ""]))))
        if self.dataset == "synthetic":  # random tensors: no crop, augmentation or mixing runs
            data_rows = {"auto augment", "random erasing", "mixup / cutmix",
                         "repeated augmentation"}
            rows = [(name, "not applied (--dataset=synthetic)" if name in data_rows
                     else f"{self.resolved_train_image_size} px random tensors, no crop"
                     if name == "train crop" else value)
                    for name, value in rows]
        width = max(len(name) for name, _ in rows)
        return [f"{name:<{width}}  {value}" for name, value in rows]

    def warmup_epochs_for_run(self):
        """5 warm-up epochs for full runs, scaled down so short runs still decay (<= epochs/6)."""
        return min(self.warmup_epochs, self.epochs / 6.0)

    def validate(self):
        """Raises ValueError with a one-line message echoing the bad value and the valid ones."""

        def check(ok, message):
            if not ok:
                raise ValueError(message)

        for field in dataclasses.fields(self):  # inf or nan passes `>= 0` or slips through
            value = getattr(self, field.name)
            numbers = [v for v in (value if isinstance(value, tuple) else (value,))
                       if isinstance(v, float)]
            check(all(math.isfinite(v) for v in numbers),
                  f"--{field.name}={','.join(f'{v:g}' for v in numbers)}; use a finite number.")
        check(self.depth in DEPTHS,
              f"--depth={self.depth} is not a ResNet depth; valid: {', '.join(map(str, DEPTHS))}.")
        check(self.variant in VARIANTS, f"--variant={self.variant!r}; valid: {', '.join(VARIANTS)}.")
        check(self.dataset in DATASETS or (self.dataset.startswith("tfds:") and len(self.dataset) > 5),
              f"--dataset={self.dataset!r}; valid: {', '.join(DATASETS)} or tfds:NAME.")
        check(self.dataset != "shards" or self.data_dir,
              "--dataset=shards needs --data_dir=DIR, the --out of `python -m pipelines.prepare`.")
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
        self._validate_recipe(check)
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

    def _validate_recipe(self, check):
        """The recipe flags (resolution, crop, augmentation, EMA, weight-decay groups)."""
        for name in ("train_image_size", "eval_image_size"):
            value = getattr(self, name)
            check(value == 0 or value >= 32, f"--{name}={value}; use 0 (--image_size) or >= 32.")
        check(self.eval_resize_size == 0 or
              self.eval_resize_size >= self.resolved_eval_image_size,
              f"--eval_resize_size={self.eval_resize_size} is smaller than the eval crop "
              f"{self.resolved_eval_image_size}; use 0 or >= {self.resolved_eval_image_size}.")
        lo, hi = self.crop_area_range
        check(0 < lo <= hi <= 1, f"--crop_area_range={lo:g},{hi:g}; use 0 < min <= max <= 1.")
        lo, hi = self.crop_aspect_range
        check(0 < lo <= hi, f"--crop_aspect_range={lo:g},{hi:g}; use 0 < min <= max.")
        check(self.auto_augment in AUTO_AUGMENTS,
              f"--auto_augment={self.auto_augment!r}; valid: '' (off), ta_wide, randaugment.")
        # Each op is unrolled into the input graph; the RandAugment paper uses 1 to 3.
        check(1 <= self.ra_num_ops <= MAX_RA_OPS,
              f"--ra_num_ops={self.ra_num_ops}; use 1..{MAX_RA_OPS}.")
        check(0 <= self.ra_magnitude <= 30, f"--ra_magnitude={self.ra_magnitude}; use 0..30.")
        for name in ("random_erase", "mix_switch_prob", "mix_prob"):
            value = getattr(self, name)
            check(0 <= value <= 1, f"--{name}={value}; use a probability in [0, 1].")
        check(self.random_erase_value in ERASE_VALUES,
              f"--random_erase_value={self.random_erase_value!r}; valid: {', '.join(ERASE_VALUES)}.")
        for name in ("mixup_alpha", "cutmix_alpha"):
            value = getattr(self, name)
            check(value >= 0, f"--{name}={value}; use >= 0 (0: off).")
        check(self.repeated_aug >= 1,
              f"--repeated_aug={self.repeated_aug}; use an integer >= 1 (1: off).")
        check(0 <= self.ema_decay < 1, f"--ema_decay={self.ema_decay}; use a value in [0, 1).")
        check(self.ema_every_steps >= 1,
              f"--ema_every_steps={self.ema_every_steps}; use an integer >= 1.")
        check(self.norm_weight_decay >= 0,
              f"--norm_weight_decay={self.norm_weight_decay}; use >= 0.")

    def to_dict(self):
        d = dataclasses.asdict(self)
        for name in ("step_decay_epochs", "crop_area_range", "crop_aspect_range", "freeze"):
            d[name] = list(getattr(self, name))
        return d
