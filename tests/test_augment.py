"""pipelines.augment against torchvision's definitions: TrivialAugmentWide / RandAugment draws,
random erasing, mixup / cutmix soft labels; eager vs tf.data; repeated augmentation."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import tensorflow as tf

from pipelines import augment as A
from pipelines import dataset as ds_lib
from tests import augment_reference as reference


def random_image(seed, size=32):
    return tf.cast(tf.random.stateless_uniform([size, size, 3], [seed, 7], 0, 256, tf.int32),
                   tf.uint8)


def seeds(n, salt=0):
    return [tf.constant([salt, i], tf.int64) for i in range(n)]


# ----- TrivialAugmentWide / RandAugment -----

def test_magnitude_tables_match_torchvision():
    ta = A.magnitude_table("ta_wide", 31)
    row = {op: ta[i] for i, op in enumerate(A.OPS)}
    np.testing.assert_allclose(row["ShearX"][[0, -1]], [0, 0.99], rtol=1e-6)
    np.testing.assert_allclose(row["TranslateX"][[0, -1]], [0, 32.0])
    np.testing.assert_allclose(row["Rotate"][[0, -1]], [0, 135.0])
    np.testing.assert_allclose(row["Brightness"][[0, -1]], [0, 0.99], rtol=1e-6)
    np.testing.assert_array_equal(row["Posterize"][[0, 5, 30]], [8, 7, 2])  # 8 - round(i / 5)
    np.testing.assert_allclose(row["Solarize"][[0, -1]], [255.0, 0.0])
    assert not row["Identity"].any() and not row["Equalize"].any()
    ra = A.magnitude_table("randaugment", 31, image_size=331)
    row = {op: ra[i] for i, op in enumerate(A.OPS)}
    np.testing.assert_allclose(row["TranslateX"][-1], 150.0, rtol=1e-6)  # 150/331 of the width
    np.testing.assert_allclose(row["Rotate"][9], 9.0)  # linspace(0, 30, 31)[9]
    np.testing.assert_array_equal(row["Posterize"][[0, 30]], [8, 4])


def test_ta_wide_draws_one_op_with_magnitude_in_range():
    table = A.magnitude_table("ta_wide", 31)
    ops = []
    for s in seeds(600):
        op, m = A._draw_op(table, s)
        op, m = int(op), float(m)
        ops.append(op)
        name = A.OPS[op]
        bins = table[op]
        assert np.isclose(np.abs(bins - abs(m)), 0, atol=1e-5).any(), (name, m)  # one of its bins
        assert m >= 0 or name in A.SIGNED
        assert abs(m) <= bins.max() + 1e-6
    counts = np.bincount(ops, minlength=len(A.OPS))
    # Uniform over 14 ops: each about 600/14 = 43 (a 4-sigma band).
    assert counts.min() > 43 - 4 * math.sqrt(43) and counts.max() < 43 + 4 * math.sqrt(43), counts
    negative = sum(float(A._draw_op(table, s)[1]) < 0 for s in seeds(200, salt=1))
    assert 30 < negative < 120  # signed ops (9 of 14) negated half of the time: about 64


def test_ta_wide_applies_exactly_the_drawn_op():
    image = random_image(1)
    table = A.magnitude_table("ta_wide", 31)
    for s in seeds(20, salt=2):
        op, m = A._draw_op(table, s)
        want = A.apply_op(image, op, m)
        np.testing.assert_array_equal(A.trivial_augment_wide(image, s), want)


def test_randaugment_uses_the_fixed_magnitude_bin():
    table = A.magnitude_table("randaugment", 31, 32)
    for s in seeds(100, salt=3):
        op, m = A._draw_op(table, s, tf.constant(9))
        assert np.isclose(abs(float(m)), table[int(op), 9])


def test_ops_keep_range_shape_and_identity_at_zero():
    image = random_image(2)
    for i, name in enumerate(A.OPS):
        out = A.apply_op(image, i, 0.0 if name in A.SIGNED else
                         {"Posterize": 8.0, "Solarize": 256.0}.get(name, 0.0))
        assert out.shape == image.shape
        if name not in ("AutoContrast", "Equalize"):  # magnitude 0 / 8 bits / 256: no change
            np.testing.assert_array_equal(out, image, err_msg=name)
    shifted = A.apply_op(image, A.OPS.index("TranslateX"), 5.0)
    np.testing.assert_array_equal(shifted[:, 5:], image[:, :-5])  # moves right by int(m)
    np.testing.assert_array_equal(shifted[:, :5], 0)  # fill 0
    solarized = A.apply_op(image, A.OPS.index("Solarize"), 128.0)
    image = np.asarray(image)
    np.testing.assert_array_equal(solarized, np.where(image >= 128, 255 - image, image))
    posterized = A.apply_op(image, A.OPS.index("Posterize"), 2.0)
    np.testing.assert_array_equal(posterized, image & 0xC0)
    # torchvision's int(magnitude): 5.7 moves by 5, -5.7 by -5 (also inside a graph).
    translate = tf.function(lambda x, m: A.apply_op(x, A.OPS.index("TranslateX"), m))
    np.testing.assert_array_equal(translate(image, tf.constant(5.7)), shifted)
    np.testing.assert_array_equal(translate(image, tf.constant(-5.7))[:, :-5], image[:, 5:])


def test_ops_match_the_reference_definitions_exactly():
    """The fast uint8 ops against their plain float32 definitions (tests/augment_reference.py),
    in a graph as tf.data runs them: every op, both signs, several magnitudes, both
    interpolations, on odd-sized and square random images and on a low-contrast one (flat and
    narrow histograms for AutoContrast / Equalize). Equal bit for bit: the fast ops compute the
    same float32 expressions (the lookup tables on the 256 levels, the shears with the projective
    transform's coordinates and weights), so no rounding may differ."""
    fast = tf.function(lambda x, op, m, interp: A.apply_op(x, op, m, interp))
    slow = tf.function(lambda x, op, m, interp: tf.cast(
        reference.apply_op(tf.cast(x, tf.float32), op, m, interp), tf.uint8))
    images = [random_image(11, 33), random_image(12, 24),
              tf.cast(tf.random.stateless_uniform([20, 27, 3], [13, 7], 90, 140, tf.int32),
                      tf.uint8),
              tf.concat([tf.fill([16, 16, 1], tf.constant(77, tf.uint8)),
                         random_image(14, 16)[..., :2]], -1)]
    for kind, size in (("ta_wide", 224), ("randaugment", 33)):
        table = A.magnitude_table(kind, 31, size)
        for op, name in enumerate(A.OPS):
            for b in (1, 13, 30):
                for sign in ((1.0, -1.0) if name in A.SIGNED else (1.0,)):
                    m, i = tf.constant(sign * table[op, b]), tf.constant(op)  # tensors: one trace
                    for interp in A.INTERPOLATIONS:
                        for image in images:
                            np.testing.assert_array_equal(
                                fast(image, i, m, interp), slow(image, i, m, interp),
                                err_msg=f"{name} m={float(m)} {interp} {image.shape}")


# ----- random erasing -----

def test_random_erasing_leaves_image_untouched_with_probability_1_minus_p():
    image, p, n = random_image(3), 0.3, 400
    untouched, areas = 0, []
    for s in seeds(n, salt=4):
        out = A.random_erasing(image, s, p=p)
        changed = np.any(np.asarray(out) != np.asarray(image), axis=-1)
        untouched += not changed.any()
        if changed.any():
            areas.append(changed.mean())
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(untouched / n - (1 - p)) < 4 * sigma, untouched / n
    # Erased area within torchvision's scale (0.02, 0.33) of the image (rounding aside).
    assert min(areas) > 0.01 and max(areas) < 0.36


def test_random_erasing_fills_with_the_mean_colour():
    image = tf.zeros([32, 32, 3], tf.uint8)
    out = np.asarray(A.random_erasing(image, tf.constant([0, 1], tf.int64), p=1.0))
    erased = out[np.any(out != 0, axis=-1)]
    np.testing.assert_array_equal(erased[0], [round(255 * m) for m in A.MEAN_RGB])


# ----- mixup / cutmix -----

def constant_batch(values, size=16):
    return tf.cast(tf.stack([tf.fill([size, size, 3], v) for v in values]), tf.uint8)


def test_mixup_labels_sum_to_one_and_equal_lambda():
    values, labels = [0, 250, 10, 240], tf.constant([0, 1, 2, 3])
    images = constant_batch(values)
    for s in seeds(20, salt=5):
        out, soft = A.mix_batch(images, labels, s, A.BatchMix(mixup_alpha=0.2), 5)
        soft = np.asarray(soft)
        np.testing.assert_allclose(soft.sum(axis=1), 1.0, atol=1e-6)
        lam = soft[0, 0]
        for i in range(4):  # image i mixed with image i-1 (roll by one), one lambda per batch
            prev = (i - 1) % 4
            assert np.isclose(soft[i, i], lam) and np.isclose(soft[i, prev], 1 - lam)
            pixel = float(np.asarray(out)[i, 0, 0, 0])
            assert abs(pixel - (lam * values[i] + (1 - lam) * values[prev])) <= 0.5 + 1e-4


def test_cutmix_label_weight_equals_pasted_area():
    values, labels = [0, 200, 100], tf.constant([2, 0, 1])
    images = constant_batch(values, size=20)
    partial = 0
    for s in seeds(40, salt=6):
        out, soft = A.mix_batch(images, labels, s, A.BatchMix(cutmix_alpha=1.0), 3)
        out, soft = np.asarray(out), np.asarray(soft)
        np.testing.assert_allclose(soft.sum(axis=1), 1.0, atol=1e-6)
        for i in range(3):
            prev = (i - 1) % 3
            pasted = np.mean(out[i, :, :, 0] == values[prev])
            assert np.isclose(soft[i, labels[prev]], pasted, atol=1e-6), (pasted, soft[i])
            partial += 0 < pasted < 1
    assert partial > 0


def test_mix_probability_and_switch():
    images, labels = constant_batch([0, 200]), tf.constant([0, 1])
    never = A.BatchMix(mixup_alpha=1.0, prob=0.0)
    assert not never.active
    half = A.BatchMix(mixup_alpha=1.0, prob=0.5)
    mixed = sum(float(A.mix_batch(images, labels, s, half, 2)[1][0, 0]) < 1 for s in seeds(200, 7))
    assert abs(mixed / 200 - 0.5) < 4 * math.sqrt(0.25 / 200)
    # Both on: cutmix leaves only 0 and 200 pixels, mixup (lambda in (0, 1)) others.
    both = A.BatchMix(mixup_alpha=1.0, cutmix_alpha=1.0, switch_prob=0.5)
    cut = 0
    for s in seeds(200, 8):
        out = np.asarray(A.mix_batch(images, labels, s, both, 2)[0])
        cut += set(np.unique(out)) <= {0, 200}
    assert abs(cut / 200 - 0.5) < 0.15


# ----- eager vs tf.data -----

def test_eager_and_tf_data_agree():
    policy = A.ImageAugment(auto_augment="ta_wide", random_erase=0.5)
    ra = A.ImageAugment(auto_augment="randaugment", random_erase=0.5, random_erase_value="random")
    images = tf.stack([random_image(i) for i in range(6)])
    keys = tf.constant([[9, i] for i in range(6)], tf.int64)
    for p in (policy, ra):
        eager = [A.augment_image(images[i], keys[i], p) for i in range(6)]
        ds = tf.data.Dataset.from_tensor_slices((images, keys)).map(
            lambda x, k, p=p: A.augment_image(x, k, p))
        for want, got in zip(eager, ds, strict=False):
            np.testing.assert_array_equal(want, got)
    mix = A.BatchMix(mixup_alpha=0.2, cutmix_alpha=1.0)
    labels = tf.range(6)
    eager = [A.mix_batch(images, labels, keys[i], mix, 6) for i in range(4)]
    ds = tf.data.Dataset.from_tensor_slices(keys[:4]).map(
        lambda k: A.mix_batch(images, labels, k, mix, 6))
    for (want_x, want_y), (got_x, got_y) in zip(eager, ds, strict=False):
        np.testing.assert_array_equal(want_x, got_x)
        np.testing.assert_allclose(want_y, got_y, atol=1e-6)


# ----- the train dataset: repeated augmentation, augmentation, mix -----

@pytest.fixture(scope="module")
def file_split(tmp_path_factory):
    """16 PNG files; file i has label i (so labels name the files)."""
    root = tmp_path_factory.mktemp("files")
    files = []
    for i in range(16):
        path = str(root / f"{i:02d}.png")
        tf.io.write_file(path, tf.io.encode_png(random_image(i, 24)))
        files.append(path)
    return SimpleNamespace(files=np.asarray(files), labels=np.arange(16), records=None,
                           num_examples=16)


def epoch_labels(split, repeats, pipeline, **extra):
    ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=pipeline,
                                     num_replicas_in_sync=2)
    ds = ds_lib.build_train_dataset(split, global_batch_size=8, image_size=16, seed=5,
                                    input_context=ctx, deterministic=True,
                                    repeated_aug=repeats, **extra)
    return [(np.asarray(x), np.asarray(y)) for x, y in ds]


def test_repeated_augmentation_each_image_r_times_across_two_replicas(file_split):
    for repeats in (2, 4):
        per_replica = [np.concatenate([y for _, y in epoch_labels(file_split, repeats, p)])
                       for p in (0, 1)]
        seen = np.concatenate(per_replica)
        assert len(seen) == 16  # epoch length unchanged
        files, counts = np.unique(seen, return_counts=True)
        assert (counts == repeats).all() and len(files) == 16 // repeats
        for f in files:  # the copies are spread over both replicas
            assert all((per == f).any() for per in per_replica)


def test_repeated_copies_get_different_augmentations(file_split):
    images = np.concatenate([x for x, _ in epoch_labels(file_split, 2, 0)] +
                            [x for x, _ in epoch_labels(file_split, 2, 1)])
    labels = np.concatenate([y for _, y in epoch_labels(file_split, 2, 0)] +
                            [y for _, y in epoch_labels(file_split, 2, 1)])
    for f in np.unique(labels):
        a, b = images[labels == f]
        assert not np.array_equal(a, b)


def test_train_dataset_mixes_batches_with_soft_labels(file_split):
    mix = A.BatchMix(mixup_alpha=0.2, cutmix_alpha=1.0)
    policy = A.ImageAugment(auto_augment="ta_wide", random_erase=0.25)
    first = epoch_labels(file_split, 1, 0, augment=policy, mix=mix, num_classes=16)
    again = epoch_labels(file_split, 1, 0, augment=policy, mix=mix, num_classes=16)
    for (x, y), (x2, y2) in zip(first, again, strict=False):  # a pure function of (seed, epoch, position)
        assert x.dtype == np.uint8 and y.shape == (4, 16)
        np.testing.assert_allclose(y.sum(axis=1), 1.0, atol=1e-6)
        np.testing.assert_array_equal(x, x2)
        np.testing.assert_array_equal(y, y2)
    # Resume: skipping one global step gives the same later batches.
    ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=0,
                                     num_replicas_in_sync=2)
    skipped = ds_lib.build_train_dataset(
        file_split, global_batch_size=8, image_size=16, seed=5, input_context=ctx,
        deterministic=True, augment=policy, mix=mix, num_classes=16, skip_steps=1)
    for (x, y), (want_x, want_y) in zip(skipped, first[1:], strict=False):
        np.testing.assert_array_equal(x, want_x)
        np.testing.assert_array_equal(y, want_y)


def mixed_and_plain_labels(split, repeats, num_pipelines, mix):
    """Pipeline 0's batches over 8 epochs: (soft labels after mixing, the int labels of the
    same positions without mixing). File i has label i, so a label names its source image."""
    ctx = None if num_pipelines == 1 else tf.distribute.InputContext(
        num_input_pipelines=num_pipelines, input_pipeline_id=0, num_replicas_in_sync=num_pipelines)

    def batches(**extra):
        return ds_lib.build_train_dataset(
            split, global_batch_size=8, image_size=8, seed=5, num_epochs=8, input_context=ctx,
            deterministic=True, repeated_aug=repeats, **extra)

    soft = np.concatenate([np.asarray(y) for _, y in batches(mix=mix, num_classes=16)])
    plain = np.concatenate([np.asarray(y) for _, y in batches()])
    return soft, plain


@pytest.mark.parametrize("num_pipelines", [1, 2])
def test_repeated_copies_are_not_mixed_with_each_other(file_split, num_pipelines):
    # R=4: the 4 copies of an image are consecutive in the stream (2 per batch of 4 with two
    # pipelines). Rolling by one, as torchvision does with the copies on different GPUs, paired
    # most of them with a copy of themselves, leaving 0.75 (one pipeline) / 0.5 (two) of the
    # labels one-hot; rolling by mix_shift pairs every image with another one.
    mixup = A.BatchMix(mixup_alpha=1.0)  # lambda ~ U(0, 1): never exactly 1
    soft, plain = mixed_and_plain_labels(file_split, 4, num_pipelines, mixup)
    assert len(plain) == 128 // num_pipelines
    for row, own in zip(soft, plain, strict=True):
        sources = set(np.flatnonzero(row > 1e-6))
        assert own in sources and len(sources) == 2, (own, row)  # a partner, not itself
    # The recipe's mix (mixup 0.2 / cutmix 1.0): lambda is 1 now and then (an empty box), and
    # close to 1 often with mixup 0.2. Measured one-hot share (one / two pipelines): 0.78 / 0.56
    # rolling by one, 0.125 / 0.125 now, as without repeated augmentation.
    recipe = A.BatchMix(mixup_alpha=0.2, cutmix_alpha=1.0)
    soft, _ = mixed_and_plain_labels(file_split, 4, num_pipelines, recipe)
    one_hot = np.mean(soft.max(axis=1) > 1 - 1e-6)
    assert one_hot < 0.2, one_hot


def test_mix_shift_keeps_copies_apart():
    assert ds_lib.mix_shift(1, 1, 8) == 1  # torchvision's roll by one
    assert ds_lib.mix_shift(4, 1, 8) == 4
    assert ds_lib.mix_shift(4, 2, 4) == 2  # each pipeline holds 2 consecutive copies
    assert ds_lib.mix_shift(3, 2, 8) == 2
    assert ds_lib.mix_shift(4, 4, 8) == 1  # every copy on its own pipeline
    assert ds_lib.mix_shift(4, 1, 6) == 3  # batch < 2R: the farthest partner it has
    assert ds_lib.mix_shift(4, 1, 1) == 1
