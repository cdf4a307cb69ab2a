"""Parameter counts, multiply-accumulates and a training-memory estimate for `--summary`.

Everything is computed by walking a built Keras functional model (Keras APIs only), at the
input size the model was built with, so `build_resnet(d, input_shape=(S, S, 3))` gives the
numbers at `--image_size=S`. Counts are per image unless a batch size is given.

Numbers for the default models at 224x224 (float32, 1000 classes; see tests/test_stats.py):

    depth  trainable    non-trainable  MACs v1.5 (v1)      activations kept per image
    18     11,689,512    9,600          1.814 G              fp32  24.3 MiB, mixed 12.2 MiB
    34     21,797,672   17,024          3.664 G              fp32  33.9 MiB, mixed 17.0 MiB
    50     25,557,032   53,120          4.089 G  (3.858 G)   fp32  86.6 MiB, mixed 43.3 MiB
    101    44,549,160  105,344          7.801 G  (7.570 G)   fp32 125.7 MiB, mixed 62.8 MiB
    152    60,192,808  151,424         11.514 G (11.282 G)   fp32 173.9 MiB, mixed 87.0 MiB
"""

import dataclasses

import keras
import numpy as np

MIB = 2**20
GIB = 2**30

# Layers whose output the backward pass of the TensorFlow backend keeps alive (see
# `activation_bytes_per_image`). Add and BatchNormalization outputs are not in this list: no
# gradient needs them (BN's gradient uses its input, the conv output).
_SAVED_OUTPUT_LAYERS = (
    keras.layers.Conv2D,  # = the BatchNormalization input, needed for BN's gradient
    keras.layers.ReLU,  # ReLU's gradient is computed from its output
    keras.layers.ZeroPadding2D,  # the padded input of a strided conv (its weight gradient)
    keras.layers.MaxPooling2D,  # max-pool's gradient needs its output (and input = a ReLU output)
    keras.layers.GlobalAveragePooling2D,  # the Dense input
    keras.layers.Dropout,  # the mask-applied output feeds the Dense
    keras.layers.Activation,  # softmax's gradient is computed from its output
)


@dataclasses.dataclass(frozen=True)
class ParamCounts:
    trainable: int
    non_trainable: int  # BatchNorm moving mean and variance

    @property
    def total(self):
        return self.trainable + self.non_trainable


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of device memory for training one model replica (see `estimate_memory`)."""

    weights_bytes: int  # all variables, trainable and not (float32 master copies)
    compute_copy_bytes: int  # 16-bit copies of the trainable weights (mixed precision only)
    gradients_bytes: int  # one float32 gradient per trainable weight
    optimizer_bytes: int  # optimizer slots (SGD momentum: 1, Adam: 2), float32
    activations_per_image_bytes: int  # forward outputs kept for the backward pass, per image
    batch_size: int

    @property
    def state_bytes(self):
        """Memory that does not depend on the batch size."""
        return (self.weights_bytes + self.compute_copy_bytes + self.gradients_bytes
                + self.optimizer_bytes)

    @property
    def activations_bytes(self):
        return self.activations_per_image_bytes * self.batch_size

    @property
    def total_bytes(self):
        return self.state_bytes + self.activations_bytes


def count_params(model):
    """Trainable and non-trainable parameter counts of `model` (a `ParamCounts`)."""
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    non_trainable = sum(int(np.prod(w.shape)) for w in model.non_trainable_weights)
    return ParamCounts(trainable, non_trainable)


def _output_shape(layer):
    shape = tuple(layer.output.shape)[1:]
    if any(d is None for d in shape):
        raise ValueError(
            f"Layer {layer.name!r} has an undefined output shape {shape}: build the model with a "
            "fixed input_shape, e.g. build_resnet(depth, input_shape=(224, 224, 3))."
        )
    return shape


def count_macs(model):
    """Multiply-accumulates per image for one forward pass at the model's input size.

    Counts what fvcore and torchvision's published "GFLOPS" count: convolutions
    (`out_h * out_w * k_h * k_w * c_in * c_out / groups`) and Dense layers (`in * out`); conv and
    Dense biases, BatchNorm, ReLU, pooling and the residual additions are left out (together
    about 0.5% more, as ptflops counts them). One MAC is two FLOPs.

    Matches torchvision's figures (1.81, 3.66, 4.09, 7.80, 11.51 G at 224) to 3 digits. With
    `variant="v1"` the bottleneck depths give 3.86, 7.57, 11.28 G against the paper's Table 1
    (3.8, 7.6, 11.3 G); the paper's 3.6 G for ResNet-34 is 1.8% under the 3.66 G its own
    architecture computes, and its 3.8 G for ResNet-50 is 1.5% under.
    """
    macs = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            out_h, out_w, c_out = _output_shape(layer)
            k_h, k_w, c_in_per_group, _ = layer.kernel.shape
            macs += out_h * out_w * k_h * k_w * c_in_per_group * c_out
        elif isinstance(layer, keras.layers.Dense):
            c_in, c_out = layer.kernel.shape
            positions = int(np.prod(_output_shape(layer)[:-1]))  # 1 after global pooling
            macs += positions * c_in * c_out
    return int(macs)


def activation_bytes_per_image(model, *, mixed_precision=False):
    """Bytes of forward activations kept for the backward pass, per image.

    Model (TensorFlow backend, no XLA, no recomputation): a tensor is kept when some op's
    gradient needs it. That is the output of every Conv2D (BatchNorm's input), ReLU (its own
    gradient), ZeroPadding2D (the padded input a strided conv needs for its weight gradient), MaxPooling2D,
    and the small classifier tensors. BatchNorm outputs, Add outputs and identity shortcuts are
    not kept: their gradients need no forward tensor. Transient buffers of the backward pass
    itself (about two feature maps at a time), cuDNN workspace and allocator fragmentation are
    not included.

    ResNet-152 at 224 in float32 gives 173.9 MiB (conv 86.0 + ReLU 80.3 + padding 6.8 + pool
    0.8), against 173 MiB per image for torchvision's ResNet-152, which is the PyTorch picture: conv
    outputs (86.0) + BatchNorm outputs (86.0) + input and pool, because torchvision's ReLUs and
    residual additions run in place on the BatchNorm output and PyTorch pads inside the conv.
    Keras's ReLU is not in place; stride-1 convolutions pad inside the conv as PyTorch's do, and
    only the strided ones (the stem, the strided 3x3 convs, max-pool) keep an explicit padded copy.

    With `mixed_precision`, feature maps are 16-bit (float16 or bfloat16); rank-2 classifier
    tensors (pooled features, logits, softmax) stay float32 as model.py pins them.
    """
    total = 0
    for layer in model.layers:
        if not isinstance(layer, _SAVED_OUTPUT_LAYERS):
            continue
        shape = _output_shape(layer)
        itemsize = 2 if mixed_precision and len(shape) > 1 else 4
        total += int(np.prod(shape)) * itemsize
    return total


def estimate_memory(model, batch_size, *, mixed_precision=False, optimizer_slots=1):
    """Training-memory estimate for one replica at `batch_size` (a `MemoryEstimate`).

    State: float32 weights (trainable and BatchNorm statistics), one float32 gradient and
    `optimizer_slots` float32 slots per trainable weight (SGD momentum: 1; Adam: 2). Under mixed
    precision Keras keeps float32 master variables and casts each trainable kernel to 16 bits
    for the forward pass; that copy is kept for the backward pass (+2 bytes per weight).
    """
    params = count_params(model)
    return MemoryEstimate(
        weights_bytes=4 * params.total,
        compute_copy_bytes=2 * params.trainable if mixed_precision else 0,
        gradients_bytes=4 * params.trainable,
        optimizer_bytes=4 * optimizer_slots * params.trainable,
        activations_per_image_bytes=activation_bytes_per_image(
            model, mixed_precision=mixed_precision),
        batch_size=batch_size,
    )


def max_batch_size(model, gpu_memory_gib=80.0, *, mixed_precision=False, optimizer_slots=1,
                   reserve_fraction=0.1):
    """Largest per-device batch whose `estimate_memory` fits in `gpu_memory_gib` GiB.

    `reserve_fraction` of the memory is held back for what the estimate leaves out (CUDA
    context, cuDNN workspaces, transient backward buffers, fragmentation). Returns 0 if not even
    the weights fit.
    """
    estimate = estimate_memory(model, 1, mixed_precision=mixed_precision,
                               optimizer_slots=optimizer_slots)
    available = gpu_memory_gib * GIB * (1.0 - reserve_fraction) - estimate.state_bytes
    if available <= 0:
        return 0
    return int(available // estimate.activations_per_image_bytes)


def _fmt_bytes(n):
    return f"{n / GIB:,.2f} GiB" if n >= GIB else f"{n / MIB:,.2f} MiB"


def format_summary(model, *, batch_size, gpu_memory_gib=80.0, optimizer_slots=1,
                   reserve_fraction=0.1):
    """A printable table: parameters, MACs per image, memory at `batch_size` (fp32 and mixed)."""
    params = count_params(model)
    macs = count_macs(model)
    height, width = tuple(model.input_shape)[1:3]
    fp32 = estimate_memory(model, batch_size, optimizer_slots=optimizer_slots)
    mixed = estimate_memory(model, batch_size, mixed_precision=True,
                            optimizer_slots=optimizer_slots)
    fits = [max_batch_size(model, gpu_memory_gib, mixed_precision=m,
                           optimizer_slots=optimizer_slots, reserve_fraction=reserve_fraction)
            for m in (False, True)]

    def row(label, *values):
        return f"  {label:<46}" + "".join(f"{v:>16}" for v in values)

    lines = [
        f"Parameters ({model.name})",
        row("trainable", f"{params.trainable:,}"),
        row("non-trainable (BatchNorm statistics)", f"{params.non_trainable:,}"),
        row("total", f"{params.total:,}"),
        f"Compute per image at {height}x{width}",
        row("multiply-accumulates (conv + dense)", f"{macs / 1e9:,.2f} G"),
        row("FLOPs (2 per MAC)", f"{2 * macs / 1e9:,.2f} G"),
        f"Training memory estimate, batch {batch_size:,} on one device, {optimizer_slots} "
        f"optimizer slot(s)",
        row("", "float32", "mixed (16-bit)"),
        row("weights (float32, incl. BatchNorm statistics)",
            *(_fmt_bytes(e.weights_bytes) for e in (fp32, mixed))),
        row("16-bit weight copies", *(_fmt_bytes(e.compute_copy_bytes) for e in (fp32, mixed))),
        row("gradients", *(_fmt_bytes(e.gradients_bytes) for e in (fp32, mixed))),
        row("optimizer slots", *(_fmt_bytes(e.optimizer_bytes) for e in (fp32, mixed))),
        row("activations kept for backward, per image",
            *(_fmt_bytes(e.activations_per_image_bytes) for e in (fp32, mixed))),
        row(f"activations at batch {batch_size:,}",
            *(_fmt_bytes(e.activations_bytes) for e in (fp32, mixed))),
        row("total", *(_fmt_bytes(e.total_bytes) for e in (fp32, mixed))),
        row(f"largest batch in {gpu_memory_gib:g} GiB ({reserve_fraction:.0%} reserved)",
            *(f"{b:,}" for b in fits)),
    ]
    budget = gpu_memory_gib * GIB * (1.0 - reserve_fraction)
    too_big = [label for label, e in (("float32", fp32), ("mixed", mixed)) if e.total_bytes > budget]
    if too_big:
        lines.append(f"  note: batch {batch_size:,} does not fit in {gpu_memory_gib:g} GiB "
                     f"({' or '.join(too_big)}) by this estimate.")
    return "\n".join(lines)
