"""The TrivialAugmentWide / RandAugment ops as first written: plain float32 definitions, each
one line away from torchvision's tensor functional (`F.affine`, `F.adjust_*`, ...).

Kept as the reference that `pipelines.augment`'s faster ops are tested against
(`tests/test_augment.py::test_ops_match_the_reference_definitions_exactly`). Not used in training.
TranslateX / TranslateY truncate the magnitude as torchvision's `int(magnitude)` does.
"""

import math

import tensorflow as tf

from pipelines.augment import OPS

# ----- the ops: float32 images in [0, 255], [H, W, 3]; torchvision's tensor definitions -----

def _blend(image, degenerate, factor):
    """torchvision `_blend`: factor * image + (1 - factor) * degenerate, clipped, truncated."""
    return tf.floor(tf.clip_by_value(factor * image + (1.0 - factor) * degenerate, 0.0, 255.0))


def _grayscale(image):
    """torchvision rgb_to_grayscale on uint8 (truncated), [H, W, 1]."""
    r, g, b = tf.unstack(image, axis=-1)
    return tf.floor(0.2989 * r + 0.587 * g + 0.114 * b)[..., None]


def _affine(image, matrix, interpolation):
    """Samples input (x, y) = matrix @ (x_out, y_out, 1) for each output pixel; fill 0."""
    shape = tf.shape(image)
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=image[None], transforms=tf.concat([matrix, tf.zeros([2])], 0)[None],
        output_shape=shape[:2], fill_value=0.0, interpolation=interpolation.upper(),
        fill_mode="CONSTANT")[0]
    return tf.round(out) if interpolation == "bilinear" else out


def _int(m):  # torchvision's int(magnitude): truncates toward zero
    return tf.cast(tf.cast(m, tf.int32), tf.float32)


def _shear_x(image, m, interp):  # F.affine(shear=[degrees(atan(m)), 0], center=[0, 0])
    return _affine(image, tf.stack([1.0, m, 0.0, 0.0, 1.0, 0.0]), interp)


def _shear_y(image, m, interp):
    return _affine(image, tf.stack([1.0, 0.0, 0.0, m, 1.0, 0.0]), interp)


def _translate_x(image, m, interp):  # translate=[int(m), 0]: output x samples input x - m
    return _affine(image, tf.stack([1.0, 0.0, -_int(m), 0.0, 1.0, 0.0]), interp)


def _translate_y(image, m, interp):
    return _affine(image, tf.stack([1.0, 0.0, 0.0, 0.0, 1.0, -_int(m)]), interp)


def _rotate(image, degrees, interp):
    """Counter-clockwise by `degrees` about the image centre (F.rotate)."""
    shape = tf.cast(tf.shape(image), tf.float32)
    cx, cy = (shape[1] - 1.0) / 2.0, (shape[0] - 1.0) / 2.0
    a = degrees * math.pi / 180.0
    cos, sin = tf.cos(a), tf.sin(a)
    # input = R(a) (out - c) + c, in image coordinates (y down): a CCW turn on screen.
    return _affine(image, tf.stack([cos, -sin, cx - cos * cx + sin * cy,
                                    sin, cos, cy - sin * cx - cos * cy]), interp)


def _brightness(image, m, _):
    return _blend(image, tf.zeros_like(image), 1.0 + m)


def _color(image, m, _):
    return _blend(image, _grayscale(image), 1.0 + m)


def _contrast(image, m, _):
    return _blend(image, tf.reduce_mean(_grayscale(image)), 1.0 + m)


def _sharpness(image, m, _):
    kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
    kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
    blurred = tf.round(tf.nn.depthwise_conv2d(image[None], kernel, [1, 1, 1, 1], "VALID")[0])
    # The border keeps its pixels (torchvision pads the smoothed interior with the original).
    degenerate = tf.pad(blurred, [[1, 1], [1, 1], [0, 0]])
    interior = tf.pad(tf.ones_like(blurred), [[1, 1], [1, 1], [0, 0]]) > 0
    return _blend(image, tf.where(interior, degenerate, image), 1.0 + m)


def _posterize(image, bits, _):
    mask = 256 - tf.bitwise.left_shift(1, 8 - tf.cast(bits, tf.int32))  # keep the top `bits`
    return tf.cast(tf.bitwise.bitwise_and(tf.cast(image, tf.int32), mask), tf.float32)


def _solarize(image, threshold, _):
    return tf.where(image >= threshold, 255.0 - image, image)


def _autocontrast(image, m, _):
    low = tf.reduce_min(image, axis=[0, 1], keepdims=True)
    high = tf.reduce_max(image, axis=[0, 1], keepdims=True)
    flat = tf.equal(low, high)
    low, high = tf.where(flat, 0.0, low), tf.where(flat, 255.0, high)
    return tf.floor(tf.clip_by_value((image - low) * (255.0 / (high - low)), 0.0, 255.0))


def _equalize_channel(channel):
    values = tf.cast(channel, tf.int32)
    hist = tf.math.bincount(tf.reshape(values, [-1]), minlength=256, maxlength=256)
    last_nonzero = tf.gather(hist, tf.reduce_max(tf.where(hist > 0)))
    step = (tf.reduce_sum(hist) - tf.cast(last_nonzero, tf.int32)) // 255
    safe = tf.maximum(step, 1)
    lut = (tf.cumsum(hist) + safe // 2) // safe
    lut = tf.clip_by_value(tf.concat([[0], lut[:-1]], 0), 0, 255)
    return tf.where(step == 0, channel, tf.cast(tf.gather(lut, values), tf.float32))


def _equalize(image, m, _):
    return tf.stack([_equalize_channel(image[..., c]) for c in range(3)], axis=-1)


_OP_FNS = {"Identity": lambda image, m, _: image, "ShearX": _shear_x, "ShearY": _shear_y,
           "TranslateX": _translate_x, "TranslateY": _translate_y, "Rotate": _rotate,
           "Brightness": _brightness, "Color": _color, "Contrast": _contrast,
           "Sharpness": _sharpness, "Posterize": _posterize, "Solarize": _solarize,
           "AutoContrast": _autocontrast, "Equalize": _equalize}


def apply_op(image, op_index, magnitude, interpolation: str = "bilinear") -> tf.Tensor:
    """Applies OPS[op_index] with a (signed) magnitude to a float32 [H, W, 3] image in [0, 255]."""
    branches = [lambda op=op: _OP_FNS[op](image, magnitude, interpolation) for op in OPS]
    out = tf.switch_case(tf.cast(op_index, tf.int32), branches)
    out.set_shape(image.shape)
    return out


