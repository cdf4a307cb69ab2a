"""Weight files in and out: torch.save zip files (without torch), safetensors, our own files.

Files are written two ways: by our NumPy writer of the torch zip format, and (where torch is
installed, as in the `test` extra) by real `torch.save`; real `torch.load(weights_only=True)` and
a torchvision-named `nn.Module` (`load_state_dict(strict=True)`) read what we write.
"""

import os
import pickle
import zipfile

import numpy as np
import pytest

from keras_resnet.model import torch_format, weights
from keras_resnet.model.errors import WeightsError
from keras_resnet.model.resnet import MEAN_RGB, STDDEV_RGB, build_resnet
from tests import torch_reference as ref

SIZE = 32
NUM_CLASSES = 7


def _images(n=2, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3)).astype(np.uint8)


def _normalised(images):
    return (images / 255.0 - np.array(MEAN_RGB)) / np.array(STDDEV_RGB)


def _rel_err(got, want):
    return float(np.abs(got - want).max() / np.abs(want).max())


def _save_numpy_torch(state, path, nest=None, prefix=""):
    """A torch.save zip file written by our NumPy writer (optionally {nest: state, "epoch": 90})."""
    state = {prefix + k: np.asarray(v) for k, v in state.items()}
    with open(path, "wb") as f:
        f.write(torch_format.torch_file_bytes({nest: state, "epoch": 90} if nest else state))
    return path


def _torch_save(state, path, nest=None, prefix=""):
    torch = pytest.importorskip("torch")
    tensors = {prefix + k: torch.from_numpy(np.array(v)) for k, v in state.items()}
    torch.save({nest: tensors} if nest else tensors, path)
    return path


WRITERS = {"numpy_writer": _save_numpy_torch, "torch.save": _torch_save}


# ------------------------------------------------------------------------ reading: round trips

@pytest.mark.parametrize("writer", WRITERS)
@pytest.mark.parametrize("nest, prefix", [(None, ""), ("state_dict", "module."), ("model", "")])
def test_torch_file_loads_and_matches_reference(tmp_path, writer, nest, prefix):
    sd = ref.random_state_dict(18, NUM_CLASSES, seed=1)
    path = WRITERS[writer](sd, str(tmp_path / "r18.pth"), nest=nest, prefix=prefix)
    model = weights.build_from_weights(path, input_shape=(SIZE, SIZE, 3))
    assert model.outputs[0].shape[-1] == NUM_CLASSES  # class count read from fc.weight
    x = _images()
    assert _rel_err(model.predict(x, verbose=0), ref.resnet_forward(sd, _normalised(x), 18)) < 1e-4


def test_tutorial_names_with_conv_bias(tmp_path):
    """The PyTorch ResNet tutorial's `identity_downsample` and conv biases (ResNet-50 layout)."""
    sd = ref.random_state_dict(50, NUM_CLASSES, seed=2, conv_bias=True)
    tutorial = {k.replace(".downsample.", ".identity_downsample."): v for k, v in sd.items()}
    path = _save_numpy_torch(tutorial, str(tmp_path / "resnet.pth"))
    state, _ = weights.read_state_dict(path)
    assert weights.detect(state) == {"depth": 50, "conv_bias": True, "num_classes": NUM_CLASSES}
    model = weights.build_from_weights(path, input_shape=(SIZE, SIZE, 3))
    x = _images()
    assert _rel_err(model.predict(x, verbose=0), ref.resnet_forward(sd, _normalised(x), 50)) < 1e-4


def test_safetensors_loads_and_matches_reference(tmp_path):
    from safetensors.numpy import save_file

    sd = ref.random_state_dict(34, NUM_CLASSES, seed=3)
    path = str(tmp_path / "model.safetensors")
    save_file(sd, path)
    model = weights.build_from_weights(path, input_shape=(SIZE, SIZE, 3))
    assert model.name == "resnet34"
    x = _images()
    assert _rel_err(model.predict(x, verbose=0), ref.resnet_forward(sd, _normalised(x), 34)) < 1e-4


def test_bfloat16_storages_are_widened(tmp_path):
    torch = pytest.importorskip("torch")
    values = torch.randn(5, 3).to(torch.bfloat16)
    torch.save({"w": values}, tmp_path / "bf16.pth")
    got = torch_format.read_torch_file(str(tmp_path / "bf16.pth"))["w"]
    assert got.dtype == np.float32 and np.array_equal(got, values.float().numpy())


def test_strided_tensors_read_like_torch(tmp_path):
    torch = pytest.importorskip("torch")
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    torch.save({"t": base.t(), "slice": base[1:3, 2:5], "scalar": torch.tensor(7)},
               tmp_path / "views.pth")
    got = torch_format.read_torch_file(str(tmp_path / "views.pth"))
    assert np.array_equal(got["t"], base.t().numpy())
    assert np.array_equal(got["slice"], base[1:3, 2:5].numpy())
    assert got["scalar"].shape == () and got["scalar"] == 7
    # An expanded view (stride 0) is copied out whole: a small one reads like torch, a large one
    # (a 1.5 KB file asking for 100 MB and more) is refused before anything is allocated.
    torch.save({"small": torch.ones(1).expand(30, 40)}, tmp_path / "expanded.pth")
    assert np.array_equal(torch_format.read_torch_file(str(tmp_path / "expanded.pth"))["small"],
                          np.ones((30, 40), np.float32))
    torch.save({"big": torch.zeros(1).expand(5000, 5000)}, tmp_path / "bomb.pth")
    assert (tmp_path / "bomb.pth").stat().st_size < 4000
    with pytest.raises(WeightsError, match=r"a tensor of size \(5000, 5000\) repeats its "
                       r"1-element storage \(an expanded view\)"):
        torch_format.read_torch_file(str(tmp_path / "bomb.pth"))


# ------------------------------------------------------------------------ writing: round trips

def test_umask_is_read_without_setting_it(monkeypatch):
    """Setting the umask to read it races with other threads creating files: on Linux it is read
    from /proc/self/status."""
    from keras_resnet import files

    before = os.umask(0o027)
    try:
        monkeypatch.setattr(os, "umask", lambda mask: pytest.fail("the umask was set"))
        assert files._umask() == 0o027
    finally:
        monkeypatch.undo()
        os.umask(before)


@pytest.mark.parametrize("fmt, suffix", [("torchvision", ".pth"), ("safetensors", ".safetensors")])
def test_written_weights_read_back_identical(tmp_path, fmt, suffix):
    model = build_resnet(18, num_classes=NUM_CLASSES, input_shape=(SIZE, SIZE, 3))
    (tmp_path / f".tmp-999999999-0123abcd-out{suffix}").write_bytes(b"a killed export's")
    path = weights.write_weights(model, str(tmp_path / f"out{suffix}"), fmt)
    assert os.listdir(tmp_path) == [f"out{suffix}"]  # no temporary left behind, stale ones gone
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask  # readable as any file the user writes
    state, _ = weights.read_state_dict(path)
    expected = weights.export_state_dict(model)
    assert state.keys() == expected.keys()
    assert all(state[k].dtype == expected[k].dtype and np.array_equal(state[k], expected[k])
               for k in expected)
    assert state["layer1.0.bn1.num_batches_tracked"].dtype == np.int64
    again = build_resnet(18, num_classes=NUM_CLASSES, input_shape=(SIZE, SIZE, 3))
    weights.load_state_dict(again, state)
    for a, b in zip(model.weights, again.weights, strict=True):
        assert np.array_equal(a.numpy(), b.numpy())


@pytest.mark.parametrize("conv_bias", [False, True])
def test_torch_loads_our_file_strict_and_agrees(tmp_path, conv_bias):
    """torch.load(weights_only=True) + a torchvision-named module's strict load; same logits.
    Conv biases are folded into BatchNorm (torchvision's convs have none)."""
    torch = pytest.importorskip("torch")
    from tests.torch_modules import ResNet

    model = build_resnet(50, num_classes=NUM_CLASSES, input_shape=(SIZE, SIZE, 3),
                         conv_bias=conv_bias, classifier_activation=None,
                         include_preprocessing=True)
    sd = ref.random_state_dict(50, NUM_CLASSES, seed=4, conv_bias=conv_bias)
    weights.load_state_dict(model, sd)
    path = weights.write_weights(model, str(tmp_path / "r50.pth"), "torchvision")
    state = torch.load(path, weights_only=True)
    net = ResNet(50, NUM_CLASSES).eval()
    net.load_state_dict(state, strict=True)
    x = _images()
    with torch.no_grad():
        got = net(torch.from_numpy(_normalised(x).astype(np.float32)).permute(0, 3, 1, 2)).numpy()
    assert _rel_err(got, model.predict(x, verbose=0)) < 1e-4


@pytest.mark.parametrize("fmt", ["torchvision", "safetensors"])
def test_v1_bottleneck_model_is_not_written_in_torchvision_names(tmp_path, fmt):
    # Same shapes as v1.5: torchvision would load it strictly and compute something else.
    model = build_resnet(50, num_classes=NUM_CLASSES, input_shape=(SIZE, SIZE, 3), variant="v1")
    with pytest.raises(WeightsError, match=r"ResNet v1 model .* --format=onnx"):
        weights.write_weights(model, str(tmp_path / "v1.pth"), fmt)
    assert not os.listdir(tmp_path)


def test_our_keras_file_and_training_dir_read(tmp_path):
    model = build_resnet(18, num_classes=NUM_CLASSES, input_shape=(SIZE, SIZE, 3), variant="v1")
    model.save(str(tmp_path / "m.keras"))
    state, known = weights.read_state_dict(str(tmp_path / "m.keras"))
    assert known == {"variant": "v1.5"}  # basic blocks: no stride choice to record
    assert np.array_equal(state["fc.bias"], model.get_layer("predictions").bias.numpy())


# ------------------------------------------------------------------------------ bad input

def _pickle_calling_os_system(marker):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    return pickle.dumps({"conv1.weight": Evil()}, protocol=2)


def test_pickle_with_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("evil/data.pkl", _pickle_calling_os_system(marker))
        archive.writestr("evil/byteorder", b"little")
    with pytest.raises(WeightsError, match=r"refused to load: .*global (posix|os)\.system") as e:
        weights.read_state_dict(str(path))
    assert "\n" not in str(e.value)
    assert not marker.exists()
    # The same pickle unpickled normally would have run it: the test's file is a real attack.
    pickle.loads(_pickle_calling_os_system(marker))
    assert marker.exists()


def test_missing_truncated_and_foreign_files(tmp_path):
    sd = ref.random_state_dict(18, NUM_CLASSES, seed=1)
    good = _save_numpy_torch(sd, str(tmp_path / "r18.pth"))
    with open(good, "rb") as f:
        data = f.read()
    cases = {
        "missing": (str(tmp_path / "nope.pth"), "not found"),
        "truncated": (str(tmp_path / "cut.pth"), "truncated"),
        "not_resnet": (_save_numpy_torch({"encoder.weight": np.zeros(3, np.float32)},
                                         str(tmp_path / "other.pth")), "not a ResNet"),
        "garbage": (str(tmp_path / "junk.safetensors"),
                    r"not a readable safetensors file \(.*\); download or save it again\.$"),
    }
    with open(cases["truncated"][0], "wb") as f:
        f.write(data[: len(data) // 2])
    with open(cases["garbage"][0], "wb") as f:
        f.write(b"hello world, not tensors")
    for name, (path, message) in cases.items():
        with pytest.raises(WeightsError, match=message) as e:
            weights.build_from_weights(path)
        assert "\n" not in str(e.value), name


def test_other_architecture_lists_keys(tmp_path):
    sd = ref.random_state_dict(50, NUM_CLASSES, seed=5)
    path = _save_numpy_torch(sd, str(tmp_path / "r50.pth"))
    with pytest.raises(WeightsError, match=r"--depth=18 but the file holds depth=50"):
        weights.build_from_weights(path, depth=18)
    model = build_resnet(18, num_classes=NUM_CLASSES, input_shape=(SIZE, SIZE, 3))
    with pytest.raises(WeightsError, match=r"unexpected keys: layer1\.0\.bn3.* shape mismatches: "
                                           r"fc\.weight \(checkpoint \(7, 2048\), model \(7, 512\)\)") as e:
        weights.load_state_dict(model, weights.read_state_dict(path)[0], path=path)
    assert "\n" not in str(e.value)
    assert "start from torchvision or timm resnet18/34/50/101/152 weights." in str(e.value)


def test_resnet_under_a_backbone_prefix_is_found(tmp_path):
    """A detection model's backbone (torchvision's `backbone.body.`, no classifier, beside its
    own heads) loads; a checkpoint with two ResNets (MoCo's query and key encoders) is refused
    naming both prefixes."""
    sd = ref.random_state_dict(18, NUM_CLASSES, seed=6)
    body = {f"backbone.body.{k}": v for k, v in sd.items() if not k.startswith("fc.")}
    heads = {"backbone.fpn.inner_blocks.0.0.weight": np.ones((256, 64, 1, 1), np.float32),
             "rpn.head.conv.0.0.weight": np.ones((256, 256, 3, 3), np.float32)}
    path = _torch_save({**body, **heads}, str(tmp_path / "fasterrcnn.pth"), nest="model")
    state, known = weights.read_state_dict(path)
    assert known["prefix"] == "backbone.body."
    assert sorted(state) == sorted(k for k in sd if not k.startswith("fc."))
    assert weights.detect(state) == {"depth": 18, "conv_bias": False, "num_classes": None}
    model = build_resnet(18, num_classes=3, input_shape=(SIZE, SIZE, 3))
    weights.load_state_dict(model, state, keep_classifier=False, path=path)
    np.testing.assert_array_equal(model.get_layer("stage4_block2_bn2").moving_variance.numpy(),
                                  sd["layer4.1.bn2.running_var"])

    moco = {f"module.encoder_{q}.{k}": v for q in "qk" for k, v in sd.items()}
    path = _save_numpy_torch(moco, str(tmp_path / "moco.pth"), nest="state_dict")
    with pytest.raises(WeightsError, match=r"holds 2 ResNets \(under 'encoder_k\.', "
                                           r"'encoder_q\.'\); save the one") as e:
        weights.read_state_dict(path)
    assert "\n" not in str(e.value)


def test_detects_depth_classes_and_bias():
    for depth in (18, 34, 50):
        sd = ref.random_state_dict(depth, 11, seed=0)
        assert weights.detect(sd) == {"depth": depth, "conv_bias": False, "num_classes": 11}
    headless = {k: v for k, v in ref.random_state_dict(18).items() if not k.startswith("fc.")}
    assert weights.detect(headless)["num_classes"] is None
    with pytest.raises(WeightsError, match="deep-stem"):
        weights.detect({"conv1.0.weight": np.zeros(1)})


def test_classifier_kept_out_when_fine_tuning():
    sd = ref.random_state_dict(18, 1000, seed=6)
    model = build_resnet(18, num_classes=NUM_CLASSES, input_shape=(SIZE, SIZE, 3))
    before = model.get_layer("predictions").kernel.numpy().copy()
    weights.load_state_dict(model, sd, keep_classifier=False)
    assert np.array_equal(model.get_layer("predictions").kernel.numpy(), before)
    assert np.array_equal(model.get_layer("conv1").kernel.numpy(),
                          sd["conv1.weight"].transpose(2, 3, 1, 0))


def test_training_directory_reads_its_latest_checkpoint(tmp_path):
    import tensorflow as tf

    from keras_resnet.files import write_json_atomic

    model = build_resnet(18, num_classes=NUM_CLASSES, input_shape=(SIZE, SIZE, 3),
                         include_preprocessing=True)
    weights.load_state_dict(model, ref.random_state_dict(18, NUM_CLASSES, seed=8))
    tf.train.Checkpoint(model=model).save(str(tmp_path / "checkpoints" / "ckpt"))
    with pytest.raises(WeightsError, match="without a training checkpoint"):
        weights.read_state_dict(str(tmp_path))  # no run.json yet
    write_json_atomic(str(tmp_path / "run.json"), {"depth": 18, "variant": "v1.5",
                                                   "conv_bias": False, "num_classes": NUM_CLASSES})
    for path in (tmp_path, tmp_path / "checkpoints"):
        state, known = weights.read_state_dict(str(path))
        assert known == {"variant": "v1.5"}
        expected = weights.export_state_dict(model)
        for key in expected:
            np.testing.assert_array_equal(state[key], expected[key], err_msg=key)


def test_training_directory_names_agree_with_the_checkpoint_module():
    from keras_resnet.training import checkpoint

    assert (weights.RUN_JSON, weights.CHECKPOINT_SUBDIR) == (checkpoint.RUN_JSON,
                                                            checkpoint.CHECKPOINT_SUBDIR)
