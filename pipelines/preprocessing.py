"""Image preprocessing for ResNet training and evaluation, as pure TensorFlow functions.

Matches torchvision's classic ImageNet recipe (RandomResizedCrop + horizontal flip for training,
Resize(256) + CenterCrop(224) for evaluation) but emits uint8 RGB: mean/std normalisation is the
model's first layer (see docs/design.md). Every function works eagerly, inside `tf.data` and inside
a `tf.function` (the exported serving signature reuses `preprocess_for_eval`).
"""

import math

import tensorflow as tf

from pipelines import formats

# torchvision RandomResizedCrop defaults: crop area as a fraction of the image, and width/height.
CROP_AREA_RANGE = (0.08, 1.0)
CROP_ASPECT_RANGE = (3.0 / 4.0, 4.0 / 3.0)
CROP_ATTEMPTS = 10  # tries before falling back to a center crop, as torchvision
EVAL_RESIZE_RATIO = 256 / 224  # Resize(256) before CenterCrop(224), scaled to any image_size
# Evaluation and serving resize the whole image before the center crop: a 30000 x 1 PNG (172
# bytes) became 73 x 2,190,000 float pixels, 3 GB for one request. A longer side beyond this many
# times the shorter is first cut to its center (the crop only sees the center); images within it
# are resized untouched.
EVAL_MAX_ASPECT = 16
# Passed as `acceptable_fraction` with try_recover_truncated=True: a truncated JPEG that reaches
# the decoder decodes with its missing rows grey instead of stopping training (TF 2.21 does not
# always enforce the fraction). Index-time screening (pipelines.sources) already leaves out JPEGs
# without an end-of-image marker; files that fail to decode anyway are replaced in their batch by
# the dataset (pipelines.dataset.SUBSTITUTES), so step counts and resumes stay exact.
TRUNCATED_MIN_FRACTION = 0.75
RESIZE_METHOD = "bilinear"
# Antialiased resizing (what PIL does) doubled the CPU time per training image (2.3 vs 1.1 ms on
# 2 cores), so training resizes without it; evaluation keeps it to match torchvision's numbers.
TRAIN_ANTIALIAS = False
EVAL_ANTIALIAS = True
# libjpeg's accurate integer IDCT, as PIL, torchvision and OpenCV decode: TensorFlow's default is
# the fast one, whose pixels differ from theirs by up to ~6 levels, so a client decoding with
# PIL (the deploy contract) fed the model other pixels than our evaluation did.
JPEG_DCT = "INTEGER_ACCURATE"

def has_format(image_bytes, kind: str) -> tf.Tensor:
    """True if the bytes carry the signature of format `kind` of pipelines.formats.SIGNATURES
    (whatever the file name says)."""
    # The header padded with zeros (no signature holds one where the padding lands): substr
    # raises for an offset past the end, and bytes shorter than an offset must read as "not it".
    padded = tf.strings.join([tf.strings.substr(image_bytes, 0, formats.HEADER_BYTES),
                              b"\0" * formats.HEADER_BYTES])
    return tf.reduce_all([tf.equal(tf.strings.substr(padded, offset, len(part)), part)
                          for offset, part in formats.SIGNATURES[kind]])


def is_jpeg(image_bytes) -> tf.Tensor:
    """True if the bytes start with the JPEG signature (whatever the file name says)."""
    return has_format(image_bytes, "JPEG")


def decode_image(image_bytes, recover_truncated: bool = True) -> tf.Tensor:
    """Decodes JPEG (RGB, grayscale or CMYK), PNG, GIF, BMP or WebP by content to uint8 RGB [H, W, 3].

    `recover_truncated=False` fails on a truncated JPEG instead of greying its missing rows (the
    serving signature does this: a client should hear that its image is broken).
    """
    image_bytes = tf.convert_to_tensor(image_bytes, tf.string)
    recover = dict(try_recover_truncated=True, acceptable_fraction=TRUNCATED_MIN_FRACTION)
    image = tf.cond(
        is_jpeg(image_bytes),
        lambda: tf.io.decode_jpeg(image_bytes, channels=3, dct_method=JPEG_DCT,
                                  **(recover if recover_truncated else {})),
        lambda: _decode_not_jpeg(image_bytes),
    )
    image.set_shape([None, None, 3])
    return image


def _decode_not_jpeg(image_bytes) -> tf.Tensor:
    """PNG, GIF, BMP or WebP -> uint8 RGB [H, W, 3] (an animation's first frame).

    TensorFlow's WebP decoder refuses `channels=3` for a WebP with an alpha channel ("Number of
    channels requested does not match input"): a still WebP is decoded with its own channels and
    the alpha dropped, as Pillow's `convert("RGB")` (torchvision's loader) and
    `decode_png(channels=3)` drop it. An animated WebP keeps `channels=3`, which TensorFlow 2.21
    refuses with an error ("WebP Animation must be 4 channel RGBA"): with `channels=0` its
    decoder corrupts the heap and aborts the process.
    """
    return tf.cond(
        has_format(image_bytes, "WebP") & tf.logical_not(_is_animated_webp(image_bytes)),
        lambda: tf.io.decode_image(image_bytes, channels=0, expand_animations=False)[:, :, :3],
        lambda: tf.io.decode_image(image_bytes, channels=3, expand_animations=False),
    )


def _is_animated_webp(image_bytes) -> tf.Tensor:
    """True for a WebP whose extended header (the VP8X chunk) sets the animation flag."""
    # Padded with zeros as in has_format: substr raises for an offset past the end.
    padded = tf.strings.join([tf.strings.substr(image_bytes, 0, 21), b"\0" * 21])
    flags = tf.io.decode_raw(tf.strings.substr(padded, 20, 1), tf.uint8)[0]
    return tf.equal(tf.strings.substr(padded, 12, 4), b"VP8X") & tf.not_equal(
        tf.bitwise.bitwise_and(flags, tf.constant(2, tf.uint8)), 0)


def sample_crop_window(image_shape, seed, area_range=CROP_AREA_RANGE,
                       aspect_range=CROP_ASPECT_RANGE) -> tf.Tensor:
    """torchvision RandomResizedCrop's window for an image of `image_shape` ([H, W, ...]).

    Tries CROP_ATTEMPTS (area, log-uniform aspect) pairs and keeps the first that fits, else a
    center crop clamped to aspect_range. area_range: fractions of the image area; aspect_range:
    width / height. `seed` is a stateless [2] seed. Returns int32 [top, left, height, width].
    """
    height = tf.cast(image_shape[0], tf.float32)
    width = tf.cast(image_shape[1], tf.float32)
    area_seed, aspect_seed, top_seed, left_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, 4))
    area = height * width * tf.random.stateless_uniform(
        [CROP_ATTEMPTS], area_seed, *area_range)
    aspect = tf.exp(tf.random.stateless_uniform(
        [CROP_ATTEMPTS], aspect_seed, *(math.log(r) for r in aspect_range)))
    crop_w = tf.round(tf.sqrt(area * aspect))
    crop_h = tf.round(tf.sqrt(area / aspect))
    fits = (crop_w > 0) & (crop_h > 0) & (crop_w <= width) & (crop_h <= height)
    first = tf.argmax(tf.cast(fits, tf.int32))

    # Fallback: the largest center crop whose aspect lies in CROP_ASPECT_RANGE.
    ratio = width / height
    lo, hi = aspect_range
    fallback_w = tf.where(ratio < lo, width, tf.where(ratio > hi, tf.round(height * hi), width))
    fallback_h = tf.where(ratio < lo, tf.round(width / lo), height)
    found = tf.reduce_any(fits)
    crop_h = tf.cast(tf.where(found, crop_h[first], fallback_h), tf.int32)
    crop_w = tf.cast(tf.where(found, crop_w[first], fallback_w), tf.int32)

    h, w = tf.cast(height, tf.int32), tf.cast(width, tf.int32)
    # Same draw as torchvision's randint(0, H - h + 1); the fallback is centred instead.
    top = tf.random.stateless_uniform([], top_seed, 0, h - crop_h + 1, dtype=tf.int32)
    left = tf.random.stateless_uniform([], left_seed, 0, w - crop_w + 1, dtype=tf.int32)
    top = tf.where(found, top, (h - crop_h) // 2)
    left = tf.where(found, left, (w - crop_w) // 2)
    return tf.stack([top, left, crop_h, crop_w])


def _resize_uint8(image, size, antialias: bool) -> tf.Tensor:
    image = tf.image.resize(image, size, method=RESIZE_METHOD, antialias=antialias)
    # Bilinear weights are convex, so values stay in [0, 255]: +0.5 and truncate rounds, no clip.
    return tf.cast(image + 0.5, tf.uint8)


def _decode_and_random_crop(image_bytes, seed, area_range=CROP_AREA_RANGE,
                            aspect_range=CROP_ASPECT_RANGE) -> tf.Tensor:
    """Decodes only the random crop of a JPEG (fused, faster); other formats decode fully."""
    window_of = lambda shape: sample_crop_window(shape, seed, area_range, aspect_range)  # noqa

    def jpeg():
        window = window_of(tf.image.extract_jpeg_shape(image_bytes))
        return tf.image.decode_and_crop_jpeg(
            image_bytes, window, channels=3, dct_method=JPEG_DCT, try_recover_truncated=True,
            acceptable_fraction=TRUNCATED_MIN_FRACTION)

    def other():  # PNG (also when named .JPEG) never reaches decode_and_crop_jpeg, which rejects it
        image = _decode_not_jpeg(image_bytes)
        top, left, h, w = tf.unstack(window_of(tf.shape(image)))
        return image[top:top + h, left:left + w]

    image = tf.cond(is_jpeg(image_bytes), jpeg, other)
    image.set_shape([None, None, 3])
    return image


def preprocess_for_train(image_bytes, image_size: int, seed, area_range=CROP_AREA_RANGE,
                         aspect_range=CROP_ASPECT_RANGE) -> tf.Tensor:
    """RandomResizedCrop + random horizontal flip of encoded image bytes -> uint8 [S, S, 3].

    `seed` is a stateless int32/int64 [2] seed: the same seed gives the same crop and flip.
    area_range / aspect_range: RandomResizedCrop's scale and ratio.
    """
    image_bytes = tf.convert_to_tensor(image_bytes, tf.string)
    seed = tf.convert_to_tensor(seed)
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    image = _decode_and_random_crop(image_bytes, crop_seed, tuple(area_range), tuple(aspect_range))
    image = _resize_uint8(image, [image_size, image_size], TRAIN_ANTIALIAS)
    # Flip after the resize: the 224x224 uint8 image is smaller than the crop on average.
    flip = tf.random.stateless_uniform([], flip_seed) < 0.5
    image = tf.cond(flip, lambda: tf.reverse(image, axis=[1]), lambda: image)
    image.set_shape([image_size, image_size, 3])
    return image


def eval_resize_size(image_size: int) -> int:
    """Shorter side before the center crop: 256 for 224, scaled for other sizes."""
    return int(round(image_size * EVAL_RESIZE_RATIO))


def preprocess_for_eval(image_bytes, image_size: int, recover_truncated: bool = True,
                        resize_size: int = 0) -> tf.Tensor:
    """Decode, resize the shorter side to resize_size (0: image_size * 256/224), center crop ->
    uint8 [S, S, 3]."""
    return center_crop_for_eval(decode_image(image_bytes, recover_truncated), image_size,
                                resize_size)


def center_crop_for_eval(image, image_size: int, resize_size: int = 0) -> tf.Tensor:
    """The eval resize + center crop of a decoded uint8 RGB image [H, W, 3] -> uint8 [S, S, 3].

    Same arithmetic as torchvision's Resize(int) + CenterCrop (long side truncated, crop offset
    rounded). resize_size: the shorter side before the crop (0: image_size * 256/224; FixRes
    recipes give it, e.g. 232 for a 224 crop).
    """
    shape = tf.shape(image)
    h = tf.minimum(shape[0], shape[1] * EVAL_MAX_ASPECT)
    w = tf.minimum(shape[1], shape[0] * EVAL_MAX_ASPECT)
    top, left = (shape[0] - h) // 2, (shape[1] - w) // 2
    image = image[top:top + h, left:left + w]  # all of it unless longer than EVAL_MAX_ASPECT
    short = resize_size or eval_resize_size(image_size)
    # int(short * long / min(h, w)), computed exactly in integers.
    new_h = tf.where(h <= w, short, short * h // w)
    new_w = tf.where(h <= w, short * w // h, short)
    image = _resize_uint8(image, tf.stack([new_h, new_w]), EVAL_ANTIALIAS)
    top = tf.cast(tf.round((new_h - image_size) / 2), tf.int32)
    left = tf.cast(tf.round((new_w - image_size) / 2), tf.int32)
    image = image[top:top + image_size, left:left + image_size]
    image.set_shape([image_size, image_size, 3])
    return image
