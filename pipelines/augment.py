"""The modern ImageNet augmentations as pure, seeded TensorFlow functions on uint8 images.

Per image (inside the tf.data map, after the random-resized crop and flip, as torchvision's
`references/classification/presets.py` orders them): TrivialAugmentWide or RandAugment, then
random erasing. Per batch (after batching): mixup or cutmix with soft labels, as torchvision's
`transforms.v2.MixUp` / `CutMix` chosen by `RandomChoice`.

Every random draw comes from an explicit stateless seed, so an example's pixels are a pure
function of (seed, epoch, position) and mid-epoch resume stays exact.

Why not Keras 3.15's `keras.layers.RandAugment`, `MixUp`, `CutMix`, `RandomErasing`:
- they draw from a layer `SeedGenerator` (a variable that advances on every call): inside tf.data
  the stream depends on how many elements were processed before, not on the example's position,
  and RandAugment ignores a passed seed for choosing its ops;
- RandAugment has 11 ops (no Identity), draws a random factor per op instead of
  torchvision's fixed magnitude bin, and computes the random
  parameters of all 11 ops for every image (slower);
- MixUp/CutMix draw one lambda per *example* and mix with a random permutation; torchvision's
  recipe draws one lambda per batch, pairs each image with its neighbour (roll by one; by more
  under repeated augmentation, see dataset.mix_shift) and
  corrects the cutmix lambda to the pasted area after clipping;
- RandomErasing erases with a fixed value in the input range; torchvision erases after
  normalisation with 0 (the mean colour here, as our images are uint8 before normalisation).
So each is written here from its torchvision definition.
"""

import dataclasses
import math

import numpy as np
import tensorflow as tf

# ImageNet mean / std in [0, 1] (torchvision); the model normalises with the same numbers.
MEAN_RGB = (0.485, 0.456, 0.406)
STD_RGB = (0.229, 0.224, 0.225)
AUTO_AUGMENTS = ("", "ta_wide", "randaugment")
ERASE_VALUES = ("mean", "random")
INTERPOLATIONS = ("bilinear", "nearest")
ERASE_ATTEMPTS = 10  # torchvision RandomErasing tries before leaving the image as it is

# Op order of torchvision's `_augmentation_space` (TrivialAugmentWide and RandAugment share it).
OPS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness",
       "Color", "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize")
SIGNED = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
          "Contrast", "Sharpness")


def magnitude_table(kind: str, num_bins: int = 31, image_size: int = 224) -> np.ndarray:
    """float32 [len(OPS), num_bins]: torchvision's magnitude of each op at each bin.

    kind "ta_wide": `TrivialAugmentWide._augmentation_space`; "randaugment":
    `RandAugment._augmentation_space` (translation relative to the image size). Ops without a
    magnitude (Identity, AutoContrast, Equalize) are 0.
    """
    bins = np.arange(num_bins, dtype=np.float64)
    lin = lambda hi: np.linspace(0.0, hi, num_bins)  # noqa: E731
    if kind == "ta_wide":
        shear, translate, rotate, enhance, posterize_span = 0.99, 32.0, 135.0, 0.99, 6
    elif kind == "randaugment":
        shear, translate, rotate, enhance, posterize_span = (
            0.3, 150.0 / 331.0 * image_size, 30.0, 0.9, 4)
    else:
        raise ValueError(f"kind={kind!r}; valid: ta_wide, randaugment")
    posterize = 8 - np.round(bins / ((num_bins - 1) / posterize_span))
    rows = {"ShearX": lin(shear), "ShearY": lin(shear), "TranslateX": lin(translate),
            "TranslateY": lin(translate), "Rotate": lin(rotate), "Brightness": lin(enhance),
            "Color": lin(enhance), "Contrast": lin(enhance), "Sharpness": lin(enhance),
            "Posterize": posterize, "Solarize": np.linspace(255.0, 0.0, num_bins)}
    return np.stack([rows.get(op, np.zeros(num_bins)) for op in OPS]).astype(np.float32)


# ----- the ops: uint8 images [H, W, 3] in, uint8 out; torchvision's tensor definitions -----
# Each op equals its plain float32 definition (tests/augment_reference.py, the code these replaced)
# bit for bit; they are written to do fewer passes over the image: per-value ops are a 256-entry
# lookup table computed with the reference's float arithmetic, translations a slice and a pad,
# shears a blend of two gathered neighbours with the projective transform's own coordinates.

def _lut(image, table):
    """table[image]: table uint8 [256] (all channels) or [3, 256] (per channel)."""
    index = tf.cast(image, tf.int32)
    if table.shape.rank == 2:
        index += tf.constant([0, 256, 512])
    return tf.gather(tf.reshape(table, [-1]), index)


def _levels():  # the 256 uint8 levels as float32 (a function: no tensor at import time)
    return tf.range(256, dtype=tf.float32)


def _blend_levels(degenerate, factor):
    """`_blend` of each of the 256 levels with a scalar (or [3, 1]) degenerate, as uint8."""
    levels = _levels()
    out = tf.floor(tf.clip_by_value(factor * levels + (1.0 - factor) * degenerate, 0.0, 255.0))
    return tf.cast(out, tf.uint8)


def _blend(image, degenerate, factor):
    """torchvision `_blend`: factor * image + (1 - factor) * degenerate, clipped, truncated."""
    return tf.floor(tf.clip_by_value(factor * image + (1.0 - factor) * degenerate, 0.0, 255.0))


def _grayscale(image):
    """torchvision rgb_to_grayscale on uint8 (truncated), float32 [H, W, 1]."""
    r, g, b = tf.unstack(tf.cast(image, tf.float32), axis=-1)
    return tf.floor(0.2989 * r + 0.587 * g + 0.114 * b)[..., None]


def _affine(image, matrix, interpolation):
    """Samples input (x, y) = matrix @ (x_out, y_out, 1) for each output pixel; fill 0."""
    shape = tf.shape(image)
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=tf.cast(image, tf.float32)[None],
        transforms=tf.concat([matrix, tf.zeros([2])], 0)[None], output_shape=shape[:2],
        fill_value=0.0, interpolation=interpolation.upper(), fill_mode="CONSTANT")[0]
    return tf.cast(tf.round(out) if interpolation == "bilinear" else out, tf.uint8)


def _round_half_away(x):  # std::round, as the projective transform's nearest neighbour
    a = tf.abs(x)
    whole = tf.floor(a)
    return tf.sign(x) * (whole + tf.cast(a - whole >= 0.5, tf.float32))


def _shear_rows(image, m, interp):
    """Output (x, y) samples input (x + m * y, y): one row at a time, with the coordinates, the
    weights and the fill of the projective transform (bilinear: two horizontal neighbours, as the
    vertical weight is exactly 0)."""
    shape = tf.shape(image)
    h, w = shape[0], shape[1]
    rows = tf.range(h, dtype=tf.float32)[:, None]
    cols = tf.range(w, dtype=tf.float32)[None, :]
    x = cols + m * rows  # the transform's 1 * x + m * y + 0, in float32
    padded = tf.pad(image, [[0, 0], [1, 1], [0, 0]])  # index 0 and w + 1: the fill 0

    def column(index):  # input column `index` (float), fill outside; [H, W, 3]
        index = tf.cast(tf.clip_by_value(index + 1.0, 0.0, tf.cast(w + 1, tf.float32)), tf.int32)
        return tf.gather(padded, index, axis=1, batch_dims=1)

    if interp == "nearest":
        return column(_round_half_away(x))
    x_floor = tf.floor(x)
    left, right = (tf.cast(column(i), tf.float32) for i in (x_floor, x_floor + 1.0))
    value = (x_floor + 1.0 - x)[..., None] * left + (x - x_floor)[..., None] * right
    return tf.cast(tf.round(value), tf.uint8)


def _shear_x(image, m, interp):  # F.affine(shear=[degrees(atan(m)), 0], center=[0, 0])
    return _shear_rows(image, m, interp)


def _shear_y(image, m, interp):  # output (x, y) samples (x, m * x + y): the transposed shear
    return tf.transpose(_shear_rows(tf.transpose(image, [1, 0, 2]), m, interp), [1, 0, 2])


def _shift(image, m, axis):
    """Moves the image by int(m) pixels along `axis` (torchvision truncates), fill 0."""
    n = tf.shape(image)[axis]
    k = tf.clip_by_value(tf.cast(m, tf.int32), -n, n)
    paddings = [[0, 0], [0, 0], [0, 0]]
    paddings[axis] = [tf.maximum(k, 0), tf.maximum(-k, 0)]
    begin, size = [0, 0, 0], [-1, -1, -1]
    begin[axis], size[axis] = tf.maximum(-k, 0), n
    return tf.slice(tf.pad(image, paddings), begin, size)


def _translate_x(image, m, _):  # translate=[int(m), 0]: output x samples input x - int(m)
    return _shift(image, m, 1)


def _translate_y(image, m, _):
    return _shift(image, m, 0)


def _rotate(image, degrees, interp):
    """Counter-clockwise by `degrees` about the image centre (F.rotate)."""
    shape = tf.cast(tf.shape(image), tf.float32)
    cx, cy = (shape[1] - 1.0) / 2.0, (shape[0] - 1.0) / 2.0
    a = degrees * math.pi / 180.0
    cos, sin = tf.cos(a), tf.sin(a)
    # input = R(a) (out - c) + c, in image coordinates (y down): a CCW turn on screen.
    return _affine(image, tf.stack([cos, -sin, cx - cos * cx + sin * cy,
                                    sin, cos, cy - sin * cx - cos * cy]), interp)


def _brightness(image, m, _):  # blend with black: a function of the level alone
    return _lut(image, _blend_levels(0.0, 1.0 + m))


def _color(image, m, _):
    out = _blend(tf.cast(image, tf.float32), _grayscale(image), 1.0 + m)
    return tf.cast(out, tf.uint8)


def _contrast(image, m, _):  # blend with the mean grey level: a function of the level alone
    return _lut(image, _blend_levels(tf.reduce_mean(_grayscale(image)), 1.0 + m))


def _sharpness(image, m, _):
    image = tf.cast(image, tf.float32)
    kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
    kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
    blurred = tf.round(tf.nn.depthwise_conv2d(image[None], kernel, [1, 1, 1, 1], "VALID")[0])
    # The border keeps its pixels (torchvision pads the smoothed interior with the original).
    degenerate = tf.pad(blurred, [[1, 1], [1, 1], [0, 0]])
    interior = tf.pad(tf.ones_like(blurred), [[1, 1], [1, 1], [0, 0]]) > 0
    return tf.cast(_blend(image, tf.where(interior, degenerate, image), 1.0 + m), tf.uint8)


def _posterize(image, bits, _):
    mask = 256 - tf.bitwise.left_shift(1, 8 - tf.cast(bits, tf.int32))  # keep the top `bits`
    return tf.bitwise.bitwise_and(image, tf.cast(mask, tf.uint8))


def _solarize(image, threshold, _):
    levels = _levels()
    return _lut(image, tf.cast(tf.where(levels >= threshold, 255.0 - levels, levels), tf.uint8))


def _autocontrast(image, m, _):
    low = tf.cast(tf.reduce_min(image, axis=[0, 1]), tf.float32)[:, None]  # [3, 1]
    high = tf.cast(tf.reduce_max(image, axis=[0, 1]), tf.float32)[:, None]
    flat = tf.equal(low, high)
    low, high = tf.where(flat, 0.0, low), tf.where(flat, 255.0, high)
    table = tf.floor(tf.clip_by_value((_levels() - low) * (255.0 / (high - low)), 0.0, 255.0))
    return _lut(image, tf.cast(table, tf.uint8))


def _equalize_table(channel):
    """torchvision's equalize lookup table of one channel: int32 [256]."""
    hist = tf.math.bincount(tf.reshape(tf.cast(channel, tf.int32), [-1]), minlength=256,
                            maxlength=256)
    last_nonzero = tf.gather(hist, tf.reduce_max(tf.where(hist > 0)))
    step = (tf.reduce_sum(hist) - tf.cast(last_nonzero, tf.int32)) // 255
    safe = tf.maximum(step, 1)
    lut = (tf.cumsum(hist) + safe // 2) // safe
    lut = tf.clip_by_value(tf.concat([[0], lut[:-1]], 0), 0, 255)
    return tf.where(step == 0, tf.range(256), lut)  # step 0: the channel as it is


def _equalize(image, m, _):
    tables = tf.stack([_equalize_table(image[..., c]) for c in range(3)])
    return _lut(image, tf.cast(tables, tf.uint8))


_OP_FNS = {"Identity": lambda image, m, _: image, "ShearX": _shear_x, "ShearY": _shear_y,
           "TranslateX": _translate_x, "TranslateY": _translate_y, "Rotate": _rotate,
           "Brightness": _brightness, "Color": _color, "Contrast": _contrast,
           "Sharpness": _sharpness, "Posterize": _posterize, "Solarize": _solarize,
           "AutoContrast": _autocontrast, "Equalize": _equalize}


def apply_op(image, op_index, magnitude, interpolation: str = "bilinear") -> tf.Tensor:
    """Applies OPS[op_index] with a (signed) magnitude to a uint8 [H, W, 3] image."""
    image = tf.convert_to_tensor(image)
    magnitude = tf.cast(magnitude, tf.float32)
    branches = [lambda op=op: _OP_FNS[op](image, magnitude, interpolation) for op in OPS]
    out = tf.switch_case(tf.cast(op_index, tf.int32), branches)
    out.set_shape(image.shape)
    return out


def _draw_op(table, seed, magnitude_bin=None):
    """(op index, signed magnitude): op uniform over OPS; bin uniform (TA-wide) or fixed (RA);
    a signed op's magnitude is negated with probability 1/2."""
    op_seed, bin_seed, sign_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    num_ops, num_bins = table.shape
    op = tf.random.stateless_uniform([], op_seed, 0, num_ops, dtype=tf.int32)
    if magnitude_bin is None:
        magnitude_bin = tf.random.stateless_uniform([], bin_seed, 0, num_bins, dtype=tf.int32)
    magnitude = tf.gather_nd(tf.constant(table), tf.stack([op, magnitude_bin]))
    signed = tf.gather(tf.constant([o in SIGNED for o in OPS]), op)
    negate = signed & (tf.random.stateless_uniform([], sign_seed) < 0.5)
    return op, tf.where(negate, -magnitude, magnitude)


def trivial_augment_wide(image, seed, num_bins: int = 31, interpolation: str = "bilinear"):
    """torchvision TrivialAugmentWide on a uint8 [H, W, 3] image: one op, a random bin."""
    op, magnitude = _draw_op(magnitude_table("ta_wide", num_bins), seed)
    return apply_op(image, op, magnitude, interpolation)


def rand_augment(image, seed, num_ops: int = 2, magnitude: int = 9, num_bins: int = 31,
                 interpolation: str = "bilinear"):
    """torchvision RandAugment(num_ops, magnitude) on a uint8 [S, S, 3] image (static size)."""
    size = image.shape[1] or 224
    table = magnitude_table("randaugment", num_bins, size)
    out = image
    for s in tf.unstack(tf.random.experimental.stateless_split(seed, num_ops)):
        op, m = _draw_op(table, s, tf.constant(magnitude, tf.int32))
        out = apply_op(out, op, m, interpolation)
    return out


def erase_box(image_shape, seed, scale=(0.02, 0.33), ratio=(0.3, 3.3)):
    """torchvision RandomErasing.get_params: int32 [top, left, height, width]; height 0 when no
    attempt fits (the image is then left as it is)."""
    h, w = tf.cast(image_shape[0], tf.float32), tf.cast(image_shape[1], tf.float32)
    area_seed, ratio_seed, top_seed, left_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, 4))
    area = h * w * tf.random.stateless_uniform([ERASE_ATTEMPTS], area_seed, *scale)
    aspect = tf.exp(tf.random.stateless_uniform(
        [ERASE_ATTEMPTS], ratio_seed, math.log(ratio[0]), math.log(ratio[1])))
    eh = tf.round(tf.sqrt(area * aspect))
    ew = tf.round(tf.sqrt(area / aspect))
    fits = (eh < h) & (ew < w)
    first = tf.argmax(tf.cast(fits, tf.int32))
    found = tf.reduce_any(fits)
    eh = tf.cast(tf.where(found, eh[first], 0.0), tf.int32)
    ew = tf.cast(tf.where(found, ew[first], 0.0), tf.int32)
    top = tf.random.stateless_uniform([], top_seed, 0, tf.cast(h, tf.int32) - eh + 1, tf.int32)
    left = tf.random.stateless_uniform([], left_seed, 0, tf.cast(w, tf.int32) - ew + 1, tf.int32)
    return tf.stack([top, left, eh, ew])


def random_erasing(image, seed, p: float = 0.5, value: str = "mean", scale=(0.02, 0.33),
                   ratio=(0.3, 3.3)):
    """torchvision RandomErasing(p, scale, ratio, value) on a uint8 [H, W, 3] image.

    torchvision erases the *normalised* tensor: value=0 there is the mean colour here ("mean");
    value="random" is N(0, 1) noise there, mean + std * N(0, 1) here (rounded, clipped).
    """
    apply_seed, box_seed, noise_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    shape = tf.shape(image)
    top, left, eh, ew = tf.unstack(erase_box(shape, box_seed, scale, ratio))
    erase = tf.random.stateless_uniform([], apply_seed) < p

    def erased():  # only for the erased fraction p: the mask and fill cost a pass over the image
        rows = tf.range(shape[0])[:, None, None]
        cols = tf.range(shape[1])[None, :, None]
        inside = (rows >= top) & (rows < top + eh) & (cols >= left) & (cols < left + ew)
        if value == "random":
            noise = tf.random.stateless_normal(shape, noise_seed)
            fill = tf.constant([255.0 * m for m in MEAN_RGB]) + noise * tf.constant(
                [255.0 * s for s in STD_RGB])
            fill = tf.cast(tf.clip_by_value(tf.round(fill), 0.0, 255.0), tf.uint8)
        else:
            fill = tf.constant([round(255.0 * m) for m in MEAN_RGB], tf.uint8)
        return tf.where(inside, fill, image)

    return tf.cond(erase, erased, lambda: image)


@dataclasses.dataclass(frozen=True)
class ImageAugment:
    """Per-image augmentation after crop and flip (torchvision ClassificationPresetTrain)."""

    auto_augment: str = ""  # "", "ta_wide" or "randaugment"
    ra_num_ops: int = 2
    ra_magnitude: int = 9
    magnitude_bins: int = 31
    interpolation: str = "bilinear"
    random_erase: float = 0.0  # probability
    random_erase_value: str = "mean"

    @property
    def active(self):
        return bool(self.auto_augment) or self.random_erase > 0


def augment_image(image, seed, policy: ImageAugment) -> tf.Tensor:
    """The policy's auto-augment then random erasing, on uint8 [S, S, 3]; seed: stateless [2]."""
    auto_seed, erase_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    if policy.auto_augment == "ta_wide":
        image = trivial_augment_wide(image, auto_seed, policy.magnitude_bins, policy.interpolation)
    elif policy.auto_augment == "randaugment":
        image = rand_augment(image, auto_seed, policy.ra_num_ops, policy.ra_magnitude,
                             policy.magnitude_bins, policy.interpolation)
    if policy.random_erase > 0:
        image = random_erasing(image, erase_seed, policy.random_erase, policy.random_erase_value)
    return image


# ----- per batch: mixup / cutmix -----

@dataclasses.dataclass(frozen=True)
class BatchMix:
    """Mixup / cutmix of a batch (timm's Mixup arguments; torchvision's recipe: prob 1, switch
    0.5 = RandomChoice of the two)."""

    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    switch_prob: float = 0.5  # with both on: probability of cutmix for a batch
    prob: float = 1.0  # probability that a batch is mixed at all

    @property
    def active(self):
        return (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and self.prob > 0


def sample_beta(seed, alpha: float) -> tf.Tensor:
    """One Beta(alpha, alpha) draw as X / (X + Y), X, Y ~ Gamma(alpha) (stateless)."""
    a, b = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    x = tf.random.stateless_gamma([], a, alpha)
    y = tf.random.stateless_gamma([], b, alpha)
    return x / tf.maximum(x + y, 1e-30)


def cutmix_box(height, width, lam, seed):
    """torchvision v2 CutMix box for lambda: int32 (y1, y2, x1, x2), centre uniform, sides
    sqrt(1 - lam) of the image, clipped at the border."""
    y_seed, x_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    r_x = tf.random.stateless_uniform([], x_seed, 0, width, tf.int32)
    r_y = tf.random.stateless_uniform([], y_seed, 0, height, tf.int32)
    r = 0.5 * tf.sqrt(1.0 - lam)
    half_w = tf.cast(r * tf.cast(width, tf.float32), tf.int32)
    half_h = tf.cast(r * tf.cast(height, tf.float32), tf.int32)
    return (tf.maximum(r_y - half_h, 0), tf.minimum(r_y + half_h, height),
            tf.maximum(r_x - half_w, 0), tf.minimum(r_x + half_w, width))


def mix_batch(images, labels, seed, mix: BatchMix, num_classes: int, shift: int = 1):
    """Mixup or cutmix of a uint8 batch [B, H, W, 3] with int labels [B] -> (uint8 images,
    float32 soft labels [B, num_classes] summing to 1).

    Each image is mixed with the one `shift` places before it in the batch (wrapping round) with
    one lambda per batch; torchvision rolls by one (shift=1). A larger shift keeps repeated
    augmentation's copies, which sit next to each other, from being each other's partner.
    cutmix's lambda is the kept area after clipping the box. Mixed pixels are rounded to uint8
    (at most 0.5/255 from the float mix; the labels are exact).
    """
    apply_seed, switch_seed, lam_seed, box_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, 4))
    one_hot = tf.one_hot(labels, num_classes, dtype=tf.float32)
    rolled_images, rolled_labels = tf.roll(images, shift, axis=0), tf.roll(one_hot, shift, axis=0)

    def mixup():
        lam = sample_beta(lam_seed, mix.mixup_alpha)
        mixed = lam * tf.cast(images, tf.float32) + (1.0 - lam) * tf.cast(rolled_images, tf.float32)
        return tf.cast(tf.round(mixed), tf.uint8), lam

    def cutmix():
        lam = sample_beta(lam_seed, mix.cutmix_alpha)
        shape = tf.shape(images)
        y1, y2, x1, x2 = cutmix_box(shape[1], shape[2], lam, box_seed)
        rows = tf.range(shape[1])[:, None, None]
        cols = tf.range(shape[2])[None, :, None]
        box = (rows >= y1) & (rows < y2) & (cols >= x1) & (cols < x2)
        pasted = tf.cast((y2 - y1) * (x2 - x1), tf.float32)
        lam = 1.0 - pasted / tf.cast(shape[1] * shape[2], tf.float32)
        return tf.where(box[None], rolled_images, images), lam

    def mixed():
        if mix.mixup_alpha > 0 and mix.cutmix_alpha > 0:
            use_cutmix = tf.random.stateless_uniform([], switch_seed) < mix.switch_prob
            return tf.cond(use_cutmix, cutmix, mixup)
        return cutmix() if mix.cutmix_alpha > 0 else mixup()

    do_mix = tf.random.stateless_uniform([], apply_seed) < mix.prob
    out, lam = tf.cond(do_mix, mixed, lambda: (images, tf.constant(1.0)))
    return out, lam * one_hot + (1.0 - lam) * rolled_labels
