"""pipelines.preprocessing: crop statistics, eager == tf.data, decoding by content, seeds."""

import io
import math

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from pipelines import formats
from pipelines import preprocessing as pp


def _image(h, w, seed=0):
    """Smooth gradient + mild noise, so JPEG round trips stay close to the source pixels."""
    y, x = np.mgrid[0:h, 0:w]
    noise = np.random.default_rng(seed).normal(0, 4, (h, w, 3))
    rgb = np.stack([x * 200 / w, y * 200 / h, (x + y) * 100 / (h + w) + 50], -1) + noise
    return np.clip(rgb, 0, 255).astype(np.uint8)


def _encode(rgb, fmt, mode="RGB", quality=95):
    buf = io.BytesIO()
    Image.fromarray(rgb).convert(mode).save(buf, fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _pil_rgb(data):
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.int32)


JPEG = _encode(_image(40, 56), "JPEG")
PORTRAIT = _encode(_image(60, 36, seed=1), "JPEG")
PNG = _encode(_image(40, 56), "PNG")
CMYK = _encode(_image(40, 56), "JPEG", mode="CMYK")


@pytest.mark.parametrize("data", [JPEG, PNG, CMYK], ids=["jpeg", "png", "cmyk"])
def test_decode_image_matches_pillow(data):
    # PNG is lossless (exact); CMYK goes through a colour conversion (Pillow and libjpeg round
    # differently by a level or so).
    got = pp.decode_image(data).numpy().astype(np.int32)
    want = _pil_rgb(data)
    assert got.shape == want.shape == (40, 56, 3)
    assert np.abs(got - want).mean() < 1.5 and np.abs(got - want).max() <= 8
    if data is JPEG:  # the same IDCT as Pillow (TensorFlow's default, the fast one, is not)
        np.testing.assert_array_equal(got, want)


def test_png_named_jpeg_takes_the_full_decode_path():
    # decode_and_crop_jpeg rejects PNG; the tf.cond on magic bytes must route it elsewhere.
    assert not pp.is_jpeg(PNG) and pp.is_jpeg(JPEG) and pp.is_jpeg(CMYK)
    for data in (PNG, CMYK):
        out = pp.preprocess_for_train(data, 32, [3, 4])
        assert out.shape == (32, 32, 3) and out.dtype == tf.uint8


@pytest.mark.parametrize("data", [JPEG, PNG, CMYK], ids=["jpeg", "png", "cmyk"])
def test_train_crop_is_the_sampled_window_of_the_pillow_decode(data):
    # JPEG and CMYK take the fused decode-and-crop path, PNG the full decode; all must give the
    # pixels of Pillow's RGB decode inside the window that sample_crop_window picked.
    seed = tf.constant([8, 9], tf.int64)
    crop = pp._decode_and_random_crop(tf.constant(data), seed).numpy().astype(np.int32)
    top, left, h, w = pp.sample_crop_window(tf.constant([40, 56, 3]), seed).numpy()
    want = _pil_rgb(data)[top:top + h, left:left + w]
    assert crop.shape == want.shape
    assert np.abs(crop - want).mean() < 1.5 and np.abs(crop - want).max() <= 12


def _webp(mode, **options):
    buf = io.BytesIO()
    rgb = _image(40, 56)
    image = Image.fromarray(rgb)
    if mode == "RGBA":  # a gradient of transparency, as photos cut out of their background have
        image = image.convert("RGBA")
        image.putalpha(Image.fromarray(np.tile(np.linspace(0, 255, 56, dtype=np.uint8), (40, 1))))
    if mode == "animated":
        options.update(save_all=True, append_images=[Image.new("RGB", (56, 40), (0, 0, 0))])
    image.save(buf, "WEBP", **options)
    return buf.getvalue()


@pytest.mark.parametrize("data", [_webp("RGBA", lossless=True), _webp("RGBA", quality=90)],
                         ids=["rgba_lossless", "rgba_lossy"])
def test_webp_with_alpha_decodes_as_pillow_rgb(data):
    # TensorFlow's WebP decoder refused channels=3 for these ("Number of channels requested does
    # not match input"): every such training image was replaced by a stand-in, and serving and
    # evaluation refused it. Pillow's convert("RGB") drops the alpha (torchvision's loader).
    want = _pil_rgb(data)
    got = pp.decode_image(data).numpy().astype(np.int32)
    assert got.shape == want.shape == (40, 56, 3)
    assert np.abs(got - want).max() <= 2
    seed = tf.constant([8, 9], tf.int64)
    top, left, h, w = pp.sample_crop_window(tf.constant([40, 56, 3]), seed).numpy()
    crop = pp._decode_and_random_crop(tf.constant(data), seed).numpy().astype(np.int32)
    assert np.abs(crop - want[top:top + h, left:left + w]).max() <= 2
    ds = tf.data.Dataset.from_tensors(tf.constant(data)).map(
        lambda b: (pp.preprocess_for_eval(b, 32), pp.preprocess_for_train(b, 32, seed)))
    in_eval, in_train = next(iter(ds))
    assert in_eval.shape == in_train.shape == (32, 32, 3)
    np.testing.assert_array_equal(in_eval.numpy(), pp.preprocess_for_eval(data, 32).numpy())


@pytest.mark.parametrize("data", [_webp("animated", lossless=True), _webp("animated")],
                         ids=["lossless", "lossy"])
def test_animated_webp_fails_with_an_error_not_a_crash(data):
    # TensorFlow 2.21 corrupts the heap decoding an animated WebP with channels=0 (the process
    # aborts): it must keep failing with an error, which the dataset's stand-in catches.
    assert pp._is_animated_webp(data).numpy()
    assert not pp._is_animated_webp(_webp("RGBA")).numpy() and not pp._is_animated_webp(b"").numpy()
    # The header check (no TensorFlow) leaves such a file out before training, naming it.
    assert formats.is_animated_webp(data[:formats.HEADER_BYTES])
    assert not formats.is_animated_webp(_webp("RGBA")[:formats.HEADER_BYTES])
    with pytest.raises(tf.errors.InvalidArgumentError, match="Animation"):
        pp.decode_image(data)


@tf.function
def _windows(shape, seeds):
    return tf.map_fn(lambda s: pp.sample_crop_window(shape, s), seeds, fn_output_signature=tf.int32)


@pytest.mark.parametrize("shape", [(375, 500), (500, 375), (64, 64)])
def test_crop_windows_respect_area_and_aspect_ranges(shape):
    seeds = tf.stack([tf.range(2000), tf.fill([2000], 7)], axis=1)
    top, left, h, w = _windows(tf.constant(shape + (3,)), seeds).numpy().T.astype(float)
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= shape[0]).all() and (left + w <= shape[1]).all()
    # Rounding width and height to pixels moves area and aspect by at most ~1 px per side.
    area = h * w / (shape[0] * shape[1])
    slack_area = (h + w + 1) / (shape[0] * shape[1])
    assert (area >= pp.CROP_AREA_RANGE[0] - slack_area).all() and (area <= 1.0).all()
    aspect = w / h
    assert (aspect >= pp.CROP_ASPECT_RANGE[0] * (1 - 1 / h) - 1 / h).all()
    assert (aspect <= pp.CROP_ASPECT_RANGE[1] * (1 + 1 / h) + 1 / h).all()
    # The draws cover the ranges (log-uniform aspect, uniform area), not one corner of them.
    assert area.min() < 0.12 and area.max() > 0.9
    assert np.log(aspect).min() < math.log(0.8) and np.log(aspect).max() > math.log(1.25)
    assert len(np.unique(top)) > 20 and len(np.unique(left)) > 20


def test_crop_falls_back_to_aspect_clamped_center_crop():
    # A 10x1000 strip admits no crop with aspect <= 4/3 and area >= 8%: torchvision falls back to
    # the full height and width round(10 * 4/3) = 13, centred.
    windows = _windows(tf.constant([10, 1000, 3]), tf.constant([[1, 2], [3, 4]])).numpy()
    np.testing.assert_array_equal(windows, [[0, (1000 - 13) // 2, 10, 13]] * 2)


def test_train_same_seed_same_pixels_different_seed_different():
    a = pp.preprocess_for_train(JPEG, 32, tf.constant([5, 6], tf.int64)).numpy()
    b = pp.preprocess_for_train(JPEG, 32, tf.constant([5, 6], tf.int64)).numpy()
    c = pp.preprocess_for_train(JPEG, 32, tf.constant([5, 7], tf.int64)).numpy()
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_train_flips_about_half_the_time():
    # Brightness rises left to right, so a flipped output has a darker right edge.
    ramp = np.repeat(np.linspace(0, 255, 56)[None, :, None], 40, 0).repeat(3, 2).astype(np.uint8)
    data = tf.constant(_encode(ramp, "PNG"))
    ds = tf.data.Dataset.range(200).map(
        lambda i: pp.preprocess_for_train(data, 16, tf.stack([i, i])))
    flipped = [int(x[:, 0].numpy().mean() > x[:, -1].numpy().mean()) for x in ds]
    assert 70 < sum(flipped) < 130


@pytest.mark.parametrize("data", [JPEG, PORTRAIT, PNG, CMYK], ids=["jpeg", "portrait", "png", "cmyk"])
def test_eval_and_train_identical_eagerly_and_in_tf_data(data):
    seed = tf.constant([11, 12], tf.int64)
    eager_eval = pp.preprocess_for_eval(data, 32).numpy()
    eager_train = pp.preprocess_for_train(data, 32, seed).numpy()
    ds = tf.data.Dataset.from_tensors(tf.constant(data)).map(
        lambda b: (pp.preprocess_for_eval(b, 32), pp.preprocess_for_train(b, 32, seed)))
    in_eval, in_train = next(iter(ds))
    np.testing.assert_array_equal(eager_eval, in_eval.numpy())
    np.testing.assert_array_equal(eager_train, in_train.numpy())
    assert eager_eval.shape == (32, 32, 3) and eager_eval.dtype == np.uint8


def test_eval_is_resize_shorter_side_then_center_crop():
    # 40x56 -> shorter side round(32 * 256/224) = 37, longer int(37 * 56 / 40) = 51, then the
    # centred 32x32 window (offsets round(2.5) = 2 and round(9.5) = 10, half to even).
    assert pp.eval_resize_size(224) == 256 and pp.eval_resize_size(32) == 37
    want = tf.image.resize(_pil_rgb(PNG), [37, 51], antialias=True)
    want = np.floor(want.numpy() + 0.5)[2:34, 10:42]  # rounded half up
    got = pp.preprocess_for_eval(PNG, 32).numpy()
    np.testing.assert_array_equal(got, want)
    # Close to torchvision's PIL path too (Pillow's own bilinear resize, then the same crop).
    pil = Image.open(io.BytesIO(PNG)).convert("RGB").resize((51, 37), Image.BILINEAR)
    pil = np.asarray(pil).astype(np.int32)[2:34, 10:42]
    assert np.abs(pil - got).mean() < 2.0


@pytest.mark.parametrize("h, w", [(2, 400), (600, 3)])
def test_eval_of_a_very_long_image_resizes_only_its_centre(h, w, monkeypatch):
    """A strip 200 times longer than wide: its resized whole would be 37 x 7,400 here (3 GB for a
    30000 x 1 PNG at 64 px); only its centre, 16 times the short side, is resized. The crop is the
    resized whole's (same scale, same centre) to within rounding."""
    rgb = _image(h, w, seed=2)
    short = min(h, w)
    new = (37, 37 * w // h) if h <= w else (37 * h // w, 37)
    whole = np.floor(tf.image.resize(rgb, new, antialias=True).numpy() + 0.5)
    top, left = round((new[0] - 32) / 2), round((new[1] - 32) / 2)
    want = whole[top:top + 32, left:left + 32]
    sizes = []
    resize = pp._resize_uint8
    monkeypatch.setattr(pp, "_resize_uint8", lambda image, size, *a: sizes.append(
        tuple(np.asarray(size))) or resize(image, size, *a))
    got = pp.center_crop_for_eval(tf.constant(rgb), 32).numpy()
    assert sizes == [(37, 37 * 16) if h <= w else (37 * 16, 37)]  # not 37 x 7,400
    assert got.shape == (32, 32, 3)
    assert np.abs(got - want).max() <= 2, np.abs(got - want).max()
    assert pp.EVAL_MAX_ASPECT * short < max(h, w)  # the case the bound is for


def test_truncated_jpeg_decodes_what_is_there():
    big = _encode(_image(200, 240, seed=3), "JPEG", quality=90)
    cut = big[: len(big) * 9 // 10]
    assert pp.decode_image(cut).shape == (200, 240, 3)
    assert pp.preprocess_for_train(cut, 32, [1, 2]).shape == (32, 32, 3)


def test_format_check_of_bytes_shorter_than_a_signature_says_no():
    # The SavedModel checks every format on what a client sends: 0-11 bytes must read as "not
    # that format" (substr past the end raised "pos 8 out of range" from the WebP check).
    import tensorflow as tf

    from pipelines import formats
    from pipelines.preprocessing import has_format

    for data in (b"", b"hello", b"\xff\xd8\xff", b"RIFF1234WEB"):
        found = [k for k in formats.SIGNATURES if has_format(tf.constant(data), k).numpy()]
        assert found == ([formats.image_format(data)] if formats.image_format(data) else []), data
    assert has_format(tf.constant(b"RIFF1234WEBP"), "WebP").numpy()
