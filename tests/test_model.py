"""ResNet model tests: exact sizes, shapes, gradients, serialisation, torchvision equivalence."""

import functools

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_resnet.model.resnet import DEPTHS, MEAN_RGB, STAGES, STDDEV_RGB, build_resnet
from keras_resnet.model.torch_names import load_torchvision_state_dict, to_torchvision_state_dict
from tests import torch_reference as ref

# torchvision's `sum(p.numel() for p in resnetD().parameters())`. Non-trainable = BatchNorm
# running mean + variance = 2 * (BatchNorm channels): e.g. ResNet-18 has 64 (stem) + 2 * 2 * (64 +
# 128 + 256 + 512) (two BNs per basic block) + 128 + 256 + 512 (downsample BNs) = 4,800 channels.
PARAM_COUNTS = {
    18: (11_689_512, 9_600),
    34: (21_797_672, 17_024),
    50: (25_557_032, 53_120),
    101: (44_549_160, 105_344),
    152: (60_192_808, 151_424),
}
# The seed's PyTorch ResNet-152 gave every conv a bias: + 75,712 (one per conv output channel,
# the same number as BatchNorm channels since every conv is followed by one BN).
CONV_BIAS_152_TRAINABLE = 60_268_520
NUM_CLASSES = 10


@functools.lru_cache(maxsize=None)
def _model_64px(depth):
    """One 64 px model per depth, shared by the count and shape tests (never modified)."""
    return build_resnet(depth, input_shape=(64, 64, 3))


def _count(weights):
    return sum(int(np.prod(w.shape)) for w in weights)


def _bn_channels(depth):
    """BatchNorm channels from the architecture table, independently of the built model."""
    block_fn, blocks = STAGES[depth]
    bottleneck = block_fn.__name__ == "bottleneck_block"
    channels, c_in = 64, 64
    for stage, n in enumerate(blocks):
        width = 64 * 2**stage
        c_out = width * (4 if bottleneck else 1)
        channels += n * (width * 2 + c_out if bottleneck else 2 * width)
        if stage > 0 or c_in != c_out:
            channels += c_out  # downsample BN of the first block
        c_in = c_out
    return channels


def _images(n, size, seed=0):
    return np.random.default_rng(seed).normal(size=(n, size, size, 3)).astype(np.float32)


# ----------------------------------------------------------------------------------- sizes, shapes


@pytest.mark.parametrize("depth", DEPTHS)
def test_param_counts_match_torchvision(depth):
    model = _model_64px(depth)
    trainable, non_trainable = PARAM_COUNTS[depth]
    assert _count(model.trainable_weights) == trainable
    assert _count(model.non_trainable_weights) == non_trainable == 2 * _bn_channels(depth)
    assert model.count_params() == trainable + non_trainable


def test_conv_bias_param_count_matches_seed():
    model = build_resnet(152, conv_bias=True, input_shape=(None, None, 3))
    assert _count(model.trainable_weights) == CONV_BIAS_152_TRAINABLE
    assert CONV_BIAS_152_TRAINABLE - PARAM_COUNTS[152][0] == _bn_channels(152)


@pytest.mark.parametrize("depth", DEPTHS)
def test_stage_output_shapes(depth):
    model = _model_64px(depth)
    size = 64
    expansion = 4 if depth >= 50 else 1
    assert model.get_layer("conv1").output.shape == (None, size // 2, size // 2, 64)
    assert model.get_layer("pool1").output.shape == (None, size // 4, size // 4, 64)
    for stage, num_blocks in enumerate(STAGES[depth][1], start=1):
        k = stage + 1  # stage1 (conv2_x) is at 1/4 of the input, stage4 (conv5_x) at 1/32
        out = model.get_layer(f"stage{stage}_block{num_blocks}_out").output
        assert out.shape == (None, size // 2**k, size // 2**k, 64 * 2 ** (stage - 1) * expansion)
    assert model.output.shape == (None, 1000)


def test_bad_depth_lists_valid_depths():
    with pytest.raises(ValueError, match=r"depth=42") as info:
        build_resnet(42)
    message = str(info.value)
    assert "18, 34, 50, 101, 152" in message
    assert "\n" not in message


# -------------------------------------------------------------------------- training-time behaviour


def test_backward_pass_reaches_every_weight():
    model = build_resnet(18, NUM_CLASSES, (32, 32, 3), classifier_activation=None)
    images = _images(4, 32)
    labels = np.arange(4) % NUM_CLASSES
    with tf.GradientTape() as tape:
        logits = model(images, training=True)
        loss = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
        loss = keras.ops.mean(loss)
    grads = tape.gradient(loss, model.trainable_weights)
    assert np.isfinite(float(loss))
    assert len(grads) == len(model.trainable_weights) == 62  # 20 conv + 20 BN * 2 + fc * 2
    for weight, grad in zip(model.trainable_weights, grads, strict=True):
        assert grad is not None, weight.path
        grad = keras.ops.convert_to_numpy(grad)
        assert np.all(np.isfinite(grad)), weight.path
        assert np.abs(grad).max() > 0, weight.path


def test_keras_save_load_round_trip(tmp_path):
    model = build_resnet(18, NUM_CLASSES, (32, 32, 3), include_preprocessing=True, dropout=0.2,
                         l2=5e-5)
    load_torchvision_state_dict(model, ref.random_state_dict(18, NUM_CLASSES, seed=3))
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    path = tmp_path / "resnet18.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert [w.path for w in loaded.weights] == [w.path for w in model.weights]
    np.testing.assert_allclose(loaded.predict(images, verbose=0), model.predict(images, verbose=0),
                               rtol=0, atol=1e-6)
    assert len(loaded.losses) == len(model.losses) == 21


_PLAIN_LOAD = """
import json, sys
import keras, numpy as np
model = keras.saving.load_model(sys.argv[1])
images = np.load(sys.argv[2])
print(json.dumps({"backend": keras.backend.backend(),
                  "ours": sorted(m for m in sys.modules if m.startswith("keras_resnet")),
                  "probs": keras.ops.convert_to_numpy(model(images, training=False)).tolist()}))
"""


def test_saved_keras_file_loads_without_this_package_on_another_backend(tmp_path):
    """best.keras / latest.keras are for anyone with Keras 3: plain `keras.saving.load_model`
    reads them on the torch backend without importing keras_resnet, with the same outputs; our
    own loader gets the fused layers back (and still reads files that name them)."""
    import json
    import os
    import subprocess
    import sys
    import zipfile

    from keras_resnet.model import layers, weights
    from keras_resnet.training.checkpoint import save_keras_atomic

    model = build_resnet(18, NUM_CLASSES, (32, 32, 3), include_preprocessing=True, dropout=0.2,
                         l2=5e-5)
    load_torchvision_state_dict(model, ref.random_state_dict(18, NUM_CLASSES, seed=3))
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3)).astype(np.float32)
    expected = model.predict(images, verbose=0)
    path = save_keras_atomic(model, str(tmp_path / "best.keras"))
    with zipfile.ZipFile(path) as archive:
        assert "keras_resnet" not in archive.read("config.json").decode()
    np.save(tmp_path / "images.npy", images)
    env = dict(os.environ, KERAS_BACKEND="torch")
    out = subprocess.run([sys.executable, "-c", _PLAIN_LOAD, path, str(tmp_path / "images.npy")],
                         env=env, capture_output=True, text=True, check=True, cwd=tmp_path)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["backend"] == "torch" and result["ours"] == []
    np.testing.assert_allclose(result["probs"], expected, rtol=0, atol=1e-5)

    old = tmp_path / "old.keras"  # as earlier versions wrote it: our class names in the config
    model.save(old)
    for loaded in (weights.load_keras(path), weights.load_keras(str(old))):
        kinds = {type(x) for x in loaded.layers}
        assert layers.FusedBatchNormalization in kinds
        assert keras.layers.BatchNormalization not in kinds
        assert all(isinstance(x.kernel_regularizer, layers.L1L2)
                   for x in loaded.layers if isinstance(x, keras.layers.Conv2D))
        assert len(loaded.losses) == len(model.losses) == 21
        np.testing.assert_array_equal(loaded.predict(images, verbose=0), expected)


def test_zero_init_residual_zeroes_last_bn_of_each_block():
    for depth, last_bn in ((18, "bn2"), (50, "bn3")):
        model = build_resnet(depth, NUM_CLASSES, (32, 32, 3), zero_init_residual=True)
        for layer in model.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                gamma = keras.ops.convert_to_numpy(layer.gamma)
                expected = 0.0 if layer.name.endswith(f"_{last_bn}") else 1.0
                assert np.all(gamma == expected), layer.name


def test_regularizers_only_on_conv_and_dense_kernels():
    l2 = 1e-4
    model = build_resnet(18, NUM_CLASSES, (32, 32, 3), l2=l2)
    kernels = []
    for layer in model.layers:
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)):
            assert layer.kernel_regularizer is not None, layer.name
            assert layer.bias_regularizer is None, layer.name
            kernels.append(keras.ops.convert_to_numpy(layer.kernel))
        elif isinstance(layer, keras.layers.BatchNormalization):
            assert layer.gamma_regularizer is None and layer.beta_regularizer is None, layer.name
    assert len(model.losses) == len(kernels) == 21  # 20 convs + the classifier
    expected = l2 * sum(float(np.sum(k.astype(np.float64) ** 2)) for k in kernels)
    assert float(keras.ops.sum(keras.ops.stack(model.losses))) == pytest.approx(expected, rel=1e-4)
    assert not build_resnet(18, NUM_CLASSES, (32, 32, 3)).losses


@pytest.fixture
def mixed_bfloat16():
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


@pytest.mark.parametrize("activation", ["softmax", None])
def test_mixed_precision_outputs_float32(mixed_bfloat16, activation):
    model = build_resnet(18, NUM_CLASSES, (32, 32, 3), classifier_activation=activation)
    assert model.get_layer("conv1").compute_dtype == "bfloat16"
    assert model.get_layer("conv1").kernel.dtype == "float32"  # float32 master weights
    assert model.get_layer("predictions").compute_dtype == "float32"
    outputs = model(_images(2, 32), training=False)
    assert model.output.dtype == "float32"
    assert keras.backend.standardize_dtype(outputs.dtype) == "float32"
    if activation == "softmax":
        np.testing.assert_allclose(keras.ops.convert_to_numpy(outputs).sum(-1), 1.0, rtol=1e-5)


def test_preprocessing_layer_equals_manual_normalisation():
    sd = ref.random_state_dict(18, NUM_CLASSES, seed=5)
    with_pre = build_resnet(18, NUM_CLASSES, (32, 32, 3), include_preprocessing=True,
                            classifier_activation=None)
    without = build_resnet(18, NUM_CLASSES, (32, 32, 3), classifier_activation=None)
    load_torchvision_state_dict(with_pre, sd)
    load_torchvision_state_dict(without, sd)
    assert with_pre.input.dtype == "uint8"
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    manual = (images / 255.0 - np.array(MEAN_RGB)) / np.array(STDDEV_RGB)
    expected = without.predict(manual.astype(np.float32), verbose=0)
    actual = with_pre.predict(images, verbose=0)
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


# ------------------------------------------------------------------ torchvision weights, equivalence


@pytest.mark.parametrize(
    "depth, size, variant, conv_bias",
    [
        (18, 57, "v1.5", False),  # odd sizes: every strided layer floors (57 -> 29 -> 15 -> 8 ...)
        (18, 33, "v1.5", True),
        (50, 64, "v1.5", False),
        (50, 45, "v1", False),
    ],
)
def test_matches_numpy_torchvision_reference(depth, size, variant, conv_bias):
    sd = ref.random_state_dict(depth, NUM_CLASSES, seed=depth + size, conv_bias=conv_bias)
    model = build_resnet(depth, NUM_CLASSES, (size, size, 3), classifier_activation=None,
                         variant=variant, conv_bias=conv_bias)
    load_torchvision_state_dict(model, sd)
    images = _images(2, size, seed=1)
    expected = ref.resnet_forward(sd, images, depth, variant)
    actual = keras.ops.convert_to_numpy(model(images, training=False))
    atol = 1e-4 * np.abs(expected).max()
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=atol)
    if depth == 18 and not conv_bias:
        # The comparison is sharp enough to catch Keras's default BatchNorm epsilon (1e-3).
        for layer in model.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.epsilon = 1e-3
        wrong_eps = keras.ops.convert_to_numpy(model(images, training=False))
        assert np.abs(wrong_eps - expected).max() > 10 * atol


def test_bn_momentum_matches_pytorch():
    model = build_resnet(18, NUM_CLASSES, (32, 32, 3))
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            assert layer.momentum == pytest.approx(0.9) and layer.epsilon == 1e-5, layer.name
    # One training step updates running = 0.9 * running + 0.1 * batch statistic, as PyTorch's
    # momentum=0.1. (PyTorch's running_var takes the unbiased batch variance, Keras the biased
    # one: a factor n / (n - 1), n = batch * height * width, here 4 * 16 * 16.)
    images = _images(4, 32)
    conv1 = keras.Model(model.input, model.get_layer("conv1").output)(images)
    conv1 = keras.ops.convert_to_numpy(conv1).astype(np.float64)
    model(images, training=True)
    bn1 = model.get_layer("bn1")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(bn1.moving_mean),
                               0.1 * conv1.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(bn1.moving_variance),
                               0.9 + 0.1 * conv1.var(axis=(0, 1, 2)), rtol=1e-4)


def test_v1_and_v1_5_differ_only_in_stride_placement():
    sd = ref.random_state_dict(50, NUM_CLASSES, seed=7)
    outputs = {}
    for variant in ("v1", "v1.5"):
        model = build_resnet(50, NUM_CLASSES, (32, 32, 3), variant=variant,
                             classifier_activation=None)
        load_torchvision_state_dict(model, sd)  # same weight shapes in both variants
        strides = {name: model.get_layer(f"stage2_block1_{name}").strides
                   for name in ("conv1", "conv2")}
        assert strides == ({"conv1": (2, 2), "conv2": (1, 1)} if variant == "v1"
                           else {"conv1": (1, 1), "conv2": (2, 2)})
        outputs[variant] = keras.ops.convert_to_numpy(model(_images(2, 32), training=False))
    assert np.abs(outputs["v1"] - outputs["v1.5"]).max() > 1e-2


class _FakeTorchTensor:
    """Duck-types the part of torch.Tensor that load_torchvision_state_dict uses."""

    def __init__(self, array):
        self._array = array

    def detach(self):
        return self

    def cpu(self):
        return self

    def numpy(self):
        return self._array


def test_state_dict_round_trip_and_torch_tensors():
    sd = ref.random_state_dict(18, NUM_CLASSES, seed=11)
    model = build_resnet(18, NUM_CLASSES, (32, 32, 3))
    load_torchvision_state_dict(model, {k: _FakeTorchTensor(v) for k, v in sd.items()})
    back = to_torchvision_state_dict(model)
    assert back.keys() == sd.keys()  # including num_batches_tracked, as torchvision saves
    for key, value in sd.items():
        if key.endswith("num_batches_tracked"):
            assert back[key].dtype == np.int64 and back[key].shape == ()
        else:
            assert back[key].dtype == np.float32
            np.testing.assert_array_equal(back[key], value, err_msg=key)
    assert back["conv1.weight"].shape == (64, 3, 7, 7)
    assert back["layer2.0.downsample.0.weight"].shape == (128, 64, 1, 1)
    assert back["fc.weight"].shape == (NUM_CLASSES, 512)


def test_state_dict_mismatches_fail_clearly_and_set_nothing():
    model = build_resnet(18, NUM_CLASSES, (32, 32, 3))
    before = [keras.ops.convert_to_numpy(w) for w in model.weights]

    with pytest.raises(ValueError) as info:  # a ResNet-50 checkpoint
        load_torchvision_state_dict(model, ref.random_state_dict(50, NUM_CLASSES))
    message = str(info.value)
    assert "unexpected keys: " in message and "layer1.0.conv3.weight" in message
    assert "shape mismatches: " in message and "layer1.0.conv1.weight" in message
    assert "\n" not in message

    sd = ref.random_state_dict(18, NUM_CLASSES + 1)
    del sd["layer4.1.bn2.running_var"]
    with pytest.raises(ValueError, match=r"missing keys: layer4\.1\.bn2\.running_var") as info:
        load_torchvision_state_dict(model, sd)
    assert "fc.weight (checkpoint (11, 512), model (10, 512))" in str(info.value)

    for old, new in zip(before, model.weights, strict=True):
        np.testing.assert_array_equal(old, keras.ops.convert_to_numpy(new))


@pytest.mark.parametrize("training", [True, False])
def test_fused_batch_norm_matches_keras_batch_norm(training):
    """The fused kernel computes what Keras's BatchNormalization computes, moving stats included."""
    from keras_resnet.model.layers import FusedBatchNormalization

    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 3.0, (4, 5, 6, 8)).astype("float32")
    kwargs = dict(momentum=0.9, epsilon=1e-5)
    fused, plain = FusedBatchNormalization(**kwargs), keras.layers.BatchNormalization(**kwargs)
    fused.build(x.shape)
    plain.build(x.shape)
    gamma, beta, mean = (rng.uniform(-1, 2, 8).astype("float32") for _ in range(3))
    fused.set_weights([gamma, beta, mean, rng.uniform(0.5, 2, 8).astype("float32")])
    plain.set_weights(fused.get_weights())
    np.testing.assert_allclose(fused(x, training=training), plain(x, training=training),
                               rtol=1e-5, atol=1e-5)
    for a, b in zip(fused.get_weights(), plain.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_l2_penalty_and_its_gradient_equal_keras_l1l2():
    import tensorflow as tf

    from keras_resnet.model.layers import L1L2

    w = tf.Variable(np.random.default_rng(0).normal(size=(3, 3, 16, 32)).astype("float32"))
    values, grads = [], []
    for regularizer in (L1L2(l2=5e-5), keras.regularizers.L1L2(l2=5e-5)):
        with tf.GradientTape() as tape:
            penalty = regularizer(w)
        values.append(float(penalty))
        grads.append(tape.gradient(penalty, w).numpy())
    assert values[0] == pytest.approx(5e-5 * float(tf.reduce_sum(w * w)), rel=1e-5)
    assert values[0] == pytest.approx(values[1], rel=1e-5)
    np.testing.assert_allclose(grads[0], grads[1], rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(grads[0], 2 * 5e-5 * w.numpy(), rtol=1e-5)
    # An L1 term runs Keras's own code; the config round-trips.
    assert L1L2(l1=1e-3, l2=0.0)(w).numpy() == pytest.approx(1e-3 * np.abs(w.numpy()).sum(), rel=1e-5)
    assert L1L2.from_config(L1L2(l2=5e-5).get_config()).l2 == pytest.approx(5e-5)
