"""SavedModel export (serving raw image bytes), versioning, and the predict command.

The central test loads the export in a fresh Python that cannot import this project, as TF Serving
would, and checks it computes what the Keras model computes on the eval pipeline's pixels.
"""

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_resnet import export as export_command
from keras_resnet import predict as predict_command
from keras_resnet.model.resnet import build_resnet
from keras_resnet.serving import export
from pipelines.preprocessing import preprocess_for_eval
from tests.fixres_run import write_fixres_run

REPO = Path(__file__).resolve().parents[1]
IMAGE_SIZE = 32
CLASS_IDS = [f"n0{i}" for i in range(7)]
CLASS_NAMES = [f"name {i}" for i in range(7)]
PROB_ATOL = 1e-5


def _env(**extra):
    """The environment of a child Python, without PYTHONPATH and with TF's logs quieter."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, "TF_CPP_MIN_LOG_LEVEL": "2", **extra}


@pytest.fixture(scope="module")
def model():
    keras.utils.set_random_seed(0)
    m = build_resnet(18, num_classes=len(CLASS_IDS), input_shape=(IMAGE_SIZE, IMAGE_SIZE, 3),
                     include_preprocessing=True)
    # The initial classifier (stddev 0.01) gives every class ~1/7; larger weights make the
    # probabilities differ clearly between classes and images, so the comparison means something.
    kernel = m.get_layer("predictions").kernel
    kernel.assign(np.random.default_rng(0).normal(0, 0.3, kernel.shape).astype("float32"))
    return m


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A JPEG and a PNG of different sizes and aspect ratios (smooth, like photos), on disk."""
    rng = np.random.default_rng(1)
    root = tmp_path_factory.mktemp("images")
    files = {}
    for name, size, encode in (("a.jpg", (45, 60), tf.io.encode_jpeg),
                               ("b.png", (70, 50), tf.io.encode_png)):
        small = rng.integers(0, 256, (6, 5, 3)).astype("float32")
        pixels = tf.cast(tf.image.resize(small, size), tf.uint8)
        files[name] = root / name
        files[name].write_bytes(encode(pixels).numpy())
    return files


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    export_dir = tmp_path_factory.mktemp("saved_models") / "resnet18"
    version_dir = export.export_saved_model(model, str(export_dir), image_size=IMAGE_SIZE,
                                            class_ids=CLASS_IDS, class_names=CLASS_NAMES)
    return export_dir, Path(version_dir)


@pytest.fixture(scope="module")
def model_dir(model, tmp_path_factory):
    """A training directory as the trainer leaves it: best.keras and classes.json."""
    root = tmp_path_factory.mktemp("run")
    model.save(root / "best.keras")
    export.write_classes_json(root / "classes.json", CLASS_IDS, CLASS_NAMES)
    return root


def _expected(model, files):
    """The Keras model's probabilities on the eval pipeline's output, one row per file."""
    pixels = tf.stack([preprocess_for_eval(f.read_bytes(), IMAGE_SIZE) for f in files])
    return model(pixels, training=False).numpy()


# Runs in a Python that cannot import the project (as TF Serving, which has only the SavedModel).
SERVING_CHECK = textwrap.dedent("""
    import importlib.abc, sys

    class Block(importlib.abc.MetaPathFinder):  # also defeats an editable install's finder
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("keras_resnet", "pipelines"):
                raise ModuleNotFoundError(name)

    sys.meta_path.insert(0, Block())
    try:
        import keras_resnet  # noqa: F401
        sys.exit("keras_resnet is importable: the test would not prove self-containment")
    except ModuleNotFoundError:
        pass

    import numpy as np
    import tensorflow as tf

    version_dir, jpeg_path, png_path, expected_path = sys.argv[1:5]
    jpeg, png = open(jpeg_path, "rb").read(), open(png_path, "rb").read()
    expected = np.load(expected_path)
    class_ids = np.array([b"n0%d" % i for i in range(7)], dtype=object)
    class_names = np.array([b"name %d" % i for i in range(7)], dtype=object)

    loaded = tf.saved_model.load(version_dir)
    assert sorted(loaded.signatures) == ["serve_images", "serving_default"], loaded.signatures
    serve = loaded.signatures["serving_default"]
    assert list(serve.structured_input_signature[1]) == ["image_bytes"]
    assert [c.decode() for c in loaded.class_names[0].numpy()] == [
        n.decode() for n in class_names]

    def check(out, want):
        probs = out["probabilities"].numpy()
        assert out["probabilities"].dtype == tf.float32 and probs.shape == want.shape
        np.testing.assert_allclose(probs, want, rtol=0, atol=__ATOL__)
        top = np.argsort(-want, axis=1, kind="stable")[:, :5]
        np.testing.assert_array_equal(out["classes"].numpy(), top)
        np.testing.assert_allclose(out["scores"].numpy(), np.take_along_axis(want, top, 1),
                                   rtol=0, atol=__ATOL__)
        np.testing.assert_array_equal(out["labels"].numpy(), class_ids[top])
        np.testing.assert_array_equal(out["names"].numpy(), class_names[top])

    check(serve(image_bytes=tf.constant([jpeg, png])), expected)
    # The uint8 signature applies the same resize + center crop to decoded images of any size.
    for encoded, want in ((jpeg, expected[:1]), (png, expected[1:])):
        # Decoded as the export decodes (libjpeg's accurate IDCT, as PIL): TF's default differs.
        pixels = (tf.io.decode_jpeg(encoded, channels=3, dct_method="INTEGER_ACCURATE")
                  if encoded is jpeg else tf.io.decode_image(encoded, channels=3))[None]
        check(loaded.signatures["serve_images"](images=pixels), want)

    for bad, name, says in ((b"not an image", "garbage", "image_bytes[1] is not a JPEG, PNG"),
                            (png[:60], "truncated PNG", "image_bytes[1] is a truncated image"),
                            (jpeg[:len(jpeg) // 2], "truncated JPEG",
                             "image_bytes[1] is a truncated image"),
                            # Signature and end marker in place, no scan: only the decoder can
                            # tell, and its message (README) does not name the image.
                            (jpeg[:20] + jpeg[-2:], "damaged JPEG", "Invalid JPEG data")):
        try:
            serve(image_bytes=tf.constant([jpeg, bad]))
            sys.exit(f"a batch with a {name} did not raise")
        except tf.errors.InvalidArgumentError as e:
            assert says in e.message, e.message
    # Bytes after the end marker (a motion photo's video, say) do not change the prediction.
    check(serve(image_bytes=tf.constant([jpeg + bytes(5000), png])), expected)
    # An empty batch gets empty outputs of the right shapes and types.
    for out in (serve(image_bytes=tf.constant([], tf.string)),
                loaded.signatures["serve_images"](images=tf.zeros([0, 9, 9, 3], tf.uint8))):
        assert out["probabilities"].shape == (0, 7) and out["names"].shape == (0, 5), out
        assert out["classes"].dtype == tf.int64 and out["labels"].dtype == tf.string
    check(serve(image_bytes=tf.constant([jpeg, png])), expected)  # the server still works
    print("SERVING OK")
""").replace("__ATOL__", repr(PROB_ATOL))


@pytest.mark.slow
def test_saved_model_serves_bytes_without_the_project(model, images, exported, tmp_path):
    _, version_dir = exported
    expected_path = tmp_path / "expected.npy"
    np.save(expected_path, _expected(model, [images["a.jpg"], images["b.png"]]))
    run = subprocess.run(
        [sys.executable, "-c", SERVING_CHECK, str(version_dir), str(images["a.jpg"]),
         str(images["b.png"]), str(expected_path)],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
    # A negative return code is a signal: the corrupt image would have killed a server.
    assert run.returncode == 0 and "SERVING OK" in run.stdout, (run.returncode, run.stdout,
                                                                run.stderr[-3000:])


SAVED_MODEL_CLI = Path(sys.executable).with_name("saved_model_cli")  # installed by tensorflow


def test_saved_model_cli_lists_both_signatures(exported):
    run = subprocess.run([str(SAVED_MODEL_CLI), "show", "--dir", str(exported[1]), "--all"],
                         env=_env(),
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    for text in ("signature_def['serving_default']", "signature_def['serve_images']",
                 "inputs['image_bytes']", "DT_STRING", "inputs['images']", "DT_UINT8",
                 "outputs['probabilities']", "outputs['names']"):
        assert text in run.stdout, f"{text} missing from:\n{run.stdout}"


@pytest.mark.slow
def test_saved_model_cli_runs_on_raw_jpeg_bytes(model, exported, images, tmp_path):
    """The README's recipe: the file's bytes in a .npy, fed to `saved_model_cli run`."""
    data = images["a.jpg"].read_bytes() + b"\0\0"  # padding after the end marker, as files may
    # end in NUL bytes (a BMP's last black pixels): a bytes array (dtype S) would drop them.
    np.save(tmp_path / "a.npy", np.array([data], dtype=object), allow_pickle=True)
    assert np.load(tmp_path / "a.npy", allow_pickle=True)[0] == data
    run = subprocess.run([str(SAVED_MODEL_CLI), "run", "--dir", str(exported[1]), "--tag_set",
                          "serve", "--signature_def", "serving_default", "--inputs",
                          f"image_bytes={tmp_path / 'a.npy'}"],
                         env=_env(), capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    names = run.stdout.split("Result for output key names:")[1].split("Result for")[0]
    top = int(np.argmax(_expected(model, [images["a.jpg"]])[0]))
    assert re.findall(r"b'([^']*)'", names)[0] == CLASS_NAMES[top], run.stdout


def test_export_command_adds_a_version_and_ignores_stale_temp_dirs(exported, model_dir,
                                                                   tmp_path):
    export_dir = tmp_path / "exports"
    shutil.copytree(exported[1], export_dir / "1")
    v1_graph = (export_dir / "1" / "saved_model.pb").read_bytes()
    # What a killed export leaves behind: a temp dir of a process that no longer exists.
    stale = export_dir / ".tmp-4194305-deadbeef-export"
    (stale / "variables").mkdir(parents=True)
    (stale / "saved_model.pb").write_bytes(b"partial")
    assert export.list_versions(export_dir) == [1]

    assert export_command.run([f"--model_dir={model_dir}", f"--export_dir={export_dir}"]) == 0

    assert sorted(os.listdir(export_dir)) == ["1", "2"]  # stale temp dir cleaned up, no others
    assert (export_dir / "1" / "saved_model.pb").read_bytes() == v1_graph
    loaded = tf.saved_model.load(str(export_dir / "2"))
    assert [n.decode() for n in loaded.class_names[0].numpy()] == CLASS_NAMES
    assert export.latest_version_dir(str(export_dir)) == str(export_dir / "2")


def test_failed_export_leaves_no_version(model, tmp_path, monkeypatch):
    class Interrupted:
        def write_out(self, path, **kwargs):
            os.makedirs(path)
            Path(path, "saved_model.pb").write_bytes(b"partial")
            raise KeyboardInterrupt

    monkeypatch.setattr(export, "_build_archive", lambda *args: Interrupted())
    with pytest.raises(KeyboardInterrupt):
        export.export_saved_model(model, str(tmp_path), image_size=IMAGE_SIZE,
                                  class_ids=CLASS_IDS)
    assert os.listdir(tmp_path) == []


def test_logits_model_with_dynamic_input_exports_probabilities(images, tmp_path):
    inputs = keras.Input((None, None, 3), dtype="uint8")
    x = keras.layers.Normalization(mean=127.0, variance=64.0**2, name="normalize")(inputs)
    x = keras.layers.Conv2D(4, 3, strides=2)(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(3, kernel_initializer=keras.initializers.RandomNormal(0, 2.0))(x)
    logits_model = keras.Model(inputs, keras.layers.Activation("linear", name="logits")(x))

    version_dir = export.export_saved_model(logits_model, str(tmp_path), image_size=24,
                                            class_ids=["x", "y", "z"])
    out = tf.saved_model.load(version_dir).signatures["serving_default"](
        image_bytes=tf.constant([images["a.jpg"].read_bytes()]))
    logits = logits_model(preprocess_for_eval(images["a.jpg"].read_bytes(), 24)[None])
    np.testing.assert_allclose(out["probabilities"], tf.nn.softmax(logits), rtol=0,
                               atol=PROB_ATOL)
    assert out["classes"].shape == (1, 3)  # top 5 capped at the number of classes
    assert out["names"][0, 0] == out["labels"][0, 0]  # no names given: names are the ids


def test_mixed_precision_model_is_served_in_float32(model, images, tmp_path):
    # A bfloat16 run's model: served as is, probabilities moved by up to 1e-2.
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        mixed = build_resnet(18, num_classes=len(CLASS_IDS), input_shape=(IMAGE_SIZE, IMAGE_SIZE, 3),
                             include_preprocessing=True)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    mixed.set_weights(model.get_weights())
    assert mixed.get_layer("conv1").compute_dtype == "bfloat16"
    version_dir = export.export_saved_model(mixed, str(tmp_path), image_size=IMAGE_SIZE,
                                            class_ids=CLASS_IDS)
    pixels = np.stack([preprocess_for_eval(images[n].read_bytes(), IMAGE_SIZE).numpy()
                       for n in sorted(images)])
    out = tf.saved_model.load(version_dir).signatures["serving_default"](
        image_bytes=tf.constant([images[n].read_bytes() for n in sorted(images)]))
    want = model.predict(pixels, verbose=0)
    np.testing.assert_allclose(out["probabilities"], want, rtol=0, atol=PROB_ATOL)
    np.testing.assert_allclose(export.probabilities_fn(mixed)(pixels), want, rtol=0,
                               atol=PROB_ATOL)


def test_export_rejects_mismatches(model, tmp_path):
    with pytest.raises(ValueError, match="7 classes but 2 class ids"):
        export.export_saved_model(model, str(tmp_path), image_size=IMAGE_SIZE,
                                  class_ids=["a", "b"])
    with pytest.raises(ValueError, match="image_size=64 does not match"):
        export.export_saved_model(model, str(tmp_path), image_size=64, class_ids=CLASS_IDS)


def test_classes_json_round_trip(tmp_path):
    path = tmp_path / "classes.json"
    export.write_classes_json(path, ["n01", "n02"], ["tench", "goldfish"])
    assert export.read_classes_json(path) == (["n01", "n02"], ["tench", "goldfish"])
    path.write_text('{"ids": []}')
    with pytest.raises(ValueError, match="Cannot read class list"):
        export.read_classes_json(path)


def test_a_classes_file_that_is_not_there_is_refused_not_replaced(model_dir, tmp_path, capsys):
    """--classes naming a missing file (a typo) used to export with the labels 0..C-1 after a
    warning, although the run's classes.json was beside the model; now one line, exit 1."""
    with pytest.raises(ValueError, match="typo.json not found"):
        export.load_classes_for(str(model_dir / "best.keras"), len(CLASS_IDS),
                                str(tmp_path / "typo.json"))
    output = tmp_path / "m.pth"
    status = export_command.run([f"--model_dir={model_dir}", "--format=torchvision",
                             f"--output={output}", f"--classes={tmp_path}/typo.json"])
    err = capsys.readouterr().err.strip()
    assert status == 1 and not output.exists(), err
    assert err.startswith("error: --classes=") and "not found" in err and "\n" not in err, err
    # Left out, the classes.json beside the model is used, as before.
    assert export.load_classes_for(str(model_dir / "best.keras"), len(CLASS_IDS)) == (
        CLASS_IDS, CLASS_NAMES)


def test_a_resize_size_below_the_crop_or_below_one_is_refused(model_dir, tmp_path, capsys):
    """--resize_size=50 under a 64 crop (the demo) exported with exit 0: the SavedModel failed every
    request ('incompatible shape' inside its map), the files recorded a resize no client can crop
    from. Now one line each, nothing written."""
    for fmt, output, resize, says in (
            ("saved_model", tmp_path / "sm", IMAGE_SIZE - 1,
             f"--resize_size={IMAGE_SIZE - 1} is smaller than the crop ({IMAGE_SIZE})"),
            ("torchvision", tmp_path / "m.pth", IMAGE_SIZE - 1, "is smaller than the crop"),
            ("torchvision", tmp_path / "m.pth", -5, "--resize_size must be >= 1")):
        status = export_command.run([f"--model_dir={model_dir}", f"--format={fmt}",
                                     f"--output={output}", f"--resize_size={resize}"])
        err = capsys.readouterr().err.strip()
        assert status in (1, 2) and says in err and "\n" not in err, err
        assert not output.exists() or not os.listdir(output), fmt


TOP5_LINE = re.compile(r"^  \d\.\d{4}  n0\d  name \d$")


@pytest.mark.slow
def test_predict_command_from_saved_model(exported, images, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"this is not a jpeg")
    run = subprocess.run(
        [sys.executable, "-m", "keras_resnet.predict", f"--model={exported[0]}",
         str(images["a.jpg"]), str(tmp_path / "missing.jpg"), str(bad), str(images["b.png"])],
        # TensorFlow's warnings shown, as by default for a user (logs.DEFAULT_TF_LOG_LEVEL).
        cwd=REPO, env=_env(PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="1"), capture_output=True,
        text=True, timeout=120)
    assert run.returncode == 1, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    assert lines[0] == str(images["a.jpg"]) and lines[6] == str(images["b.png"]), run.stdout
    assert all(TOP5_LINE.match(line) for line in lines[1:6] + lines[7:12]), run.stdout
    assert "Traceback" not in run.stderr
    # The one error line per file, not TensorFlow's C++ echo of the failed op as well.
    assert "local_rendezvous" not in run.stderr and "[[{{" not in run.stderr, run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: cannot read {tmp_path / 'missing.jpg'}: No such file or directory.",
                      f"error: cannot decode {bad}: not a JPEG, PNG, GIF, BMP or WebP image "
                      "(18 bytes)."], run.stderr[-2000:]


def test_predict_from_keras_checkpoint(model, model_dir, images, capsys):
    assert predict_command.run([f"--model={model_dir / 'best.keras'}", str(images["b.png"])]) == 0
    lines = capsys.readouterr().out.splitlines()
    want = _expected(model, [images["b.png"]])[0]
    top = np.argsort(-want, kind="stable")[:5]
    assert lines == [str(images["b.png"])] + [
        f"  {want[i]:.4f}  {CLASS_IDS[i]}  {CLASS_NAMES[i]}" for i in top]


def test_predict_takes_a_folder_of_images(model_dir, images, tmp_path, capsys):
    """A folder stands for its image files, sub-folders included, in name order (Kaggle's test/
    split is 100,000 files: too many for a shell glob); other files are passed over."""
    folder = tmp_path / "test"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(images["b.png"], folder / "a_first.png")
    shutil.copy(images["a.jpg"], folder / "sub" / "c.JPEG")
    (folder / "notes.txt").write_text("not an image")
    (tmp_path / "empty").mkdir()
    assert predict_command.run([f"--model={model_dir / 'best.keras'}", str(folder)]) == 0
    out, err = capsys.readouterr()
    assert [line for line in out.splitlines() if not line.startswith("  ")] == [
        str(folder / "a_first.png"), str(folder / "sub" / "c.JPEG")]
    assert err.strip().splitlines()[-1] == "2 images predicted."
    assert predict_command.run([f"--model={model_dir / 'best.keras'}", str(tmp_path / "empty"),
                                str(images["a.jpg"])]) == 1
    out, err = capsys.readouterr()
    assert out.splitlines()[0] == str(images["a.jpg"])
    assert [line for line in err.splitlines() if line.startswith(("error", "1 image"))] == [
        f"error: {tmp_path / 'empty'} is a folder with no image files (.bmp, .gif, .jpeg, .jpg, "
        ".png, .tif, .tiff, .webp).",
        "1 image predicted, 1 failed (the error lines above)."]


def test_predict_from_keras_checkpoint_reports_bad_files_as_the_saved_model_does(
        model_dir, exported, images, tmp_path, capsys):
    jpeg = images["a.jpg"].read_bytes()
    truncated, garbage = tmp_path / "cut.jpg", tmp_path / "notes.jpg"
    truncated.write_bytes(jpeg[:len(jpeg) // 2])
    garbage.write_bytes(b"just some text")
    errors = []
    for model in (model_dir / "best.keras", exported[0]):
        status = predict_command.run([f"--model={model}", str(truncated), str(garbage),
                                      str(images["a.jpg"])])
        assert status == 1
        captured = capsys.readouterr()
        assert captured.out.splitlines()[0] == str(images["a.jpg"])  # the good file still scored
        errors.append([line for line in captured.err.splitlines() if line.startswith("error:")])
    assert errors[0] == errors[1] == [
        f"error: cannot decode {truncated}: a truncated image ({len(jpeg) // 2} bytes, no end "
        "marker); send the whole file.",
        f"error: cannot decode {garbage}: not a JPEG, PNG, GIF, BMP or WebP image (14 bytes)."]


@pytest.fixture(scope="module")
def fixres_model_dir(tmp_path_factory):
    """A FixRes run's directory: a model of any input size, trained at 32 and evaluated with a
    40 crop of a 52 shorter side (config.json, as train_main writes it)."""
    root = tmp_path_factory.mktemp("fixres_run")
    model = write_fixres_run(root, CLASS_IDS, CLASS_NAMES)
    return root, model


def _top5(model, image_bytes, image_size, resize_size):
    pixels = preprocess_for_eval(image_bytes, image_size, resize_size=resize_size)
    probs = export.probabilities_fn(model)(pixels[None])[0].numpy()
    return probs[np.argsort(-probs, kind="stable")[:5]]


def test_eval_sizes_come_from_the_flags_else_the_model_else_the_run(fixres_model_dir, model):
    root, fixres = fixres_model_dir
    path = str(root / "best.keras")
    assert export.eval_sizes(path, fixres) == (40, 52)  # the run's eval crop and resize
    assert export.eval_sizes(path, fixres, 48) == (48, 0)  # another crop: the default ratio
    assert export.eval_sizes(path, fixres, 40, 60) == (40, 60)
    assert export.eval_sizes(path, model) == (IMAGE_SIZE, 0)  # a fixed-size model: its size
    assert export.eval_sizes(os.path.join(os.path.dirname(path), "none", "x.keras"),
                             fixres) == (None, 0)  # no config.json: unknown


def test_predict_keras_model_of_a_fixres_run_uses_the_runs_eval_sizes(fixres_model_dir, images):
    from keras_resnet.serving import predict

    root, model = fixres_model_dir
    image = images["a.jpg"].read_bytes()
    scores, labels, _ = predict.load_predictor(str(root / "best.keras"))(image)
    want = _top5(model, image, 40, 52)
    np.testing.assert_allclose(scores, want, rtol=0, atol=1e-6)
    default = _top5(model, image, 224, 0)  # what it computed before: no sizes read from the run
    assert np.abs(scores - default).max() > 1e-4  # the check above tells the two apart


def test_predict_exported_file_crops_at_the_sizes_its_export_records(images, monkeypatch,
                                                                     tmp_path):
    """An ONNX/LiteRT/OpenVINO file is run after the evaluation crop the export recorded (its
    runner's `resize_size`: in the file, else its sidecar)."""
    from keras_resnet.serving import formats as deploy_formats
    from keras_resnet.serving import predict

    seen = []

    class Runner:  # stands in for a runtime: records the pixels it is given
        image_size, class_ids, class_names, resize_size = 40, CLASS_IDS, CLASS_NAMES, 52

        def __call__(self, pixels):
            seen.append(pixels)
            return np.full((len(pixels), len(CLASS_IDS)), 1 / len(CLASS_IDS), "float32")

    path = str(tmp_path / "model.onnx")
    monkeypatch.setattr(deploy_formats, "load_runner", lambda p, threads=0: Runner())
    image = images["a.jpg"].read_bytes()
    predict.load_predictor(path)(image)
    np.testing.assert_array_equal(seen[-1][0], preprocess_for_eval(image, 40, resize_size=52))
    assert not np.array_equal(seen[-1][0], preprocess_for_eval(image, 40))
    predict.load_predictor(path, resize_size=60)(image)  # the flag overrides the export's
    np.testing.assert_array_equal(seen[-1][0], preprocess_for_eval(image, 40, resize_size=60))


@pytest.mark.parametrize("fmt,suffix", [("onnx", ".onnx"), ("litert", ".tflite"),
                                        ("openvino", ".xml")])
def test_exported_file_records_the_runs_eval_sizes_for_its_runner(fixres_model_dir, tmp_path,
                                                                   fmt, suffix):
    """A FixRes run's export serves at its 40 crop of a 52 shorter side, and the file says so
    itself (a client with the file alone, its sidecar deleted)."""
    from keras_resnet.serving import deploy
    from keras_resnet.serving import formats as deploy_formats

    root, _ = fixres_model_dir
    output = str(tmp_path / f"model{suffix}")
    assert export_command.run([f"--model={root / 'best.keras'}", f"--format={fmt}",
                               f"--output={output}"]) == 0
    os.remove(deploy.sidecar_path(output))
    runner = deploy_formats.load_runner(output)
    assert (runner.image_size, runner.resize_size, runner.class_ids) == (40, 52, CLASS_IDS)


def test_calibration_images_are_cropped_as_the_served_model_input(tmp_path):
    """int8 calibration of a FixRes run sees its serving resize, not the 256/224 default."""
    from keras_resnet.serving import calibration
    from pipelines.demo import make_demo
    from pipelines.sources import load_source

    data_dir = make_demo(str(tmp_path / "demo"), num_classes=2, train_per_class=3,
                         val_per_class=1, image_size=48)
    files = calibration.sample_files(
        load_source("demo", data_dir).train.files,
        2, seed=0)
    for resize_size in (0, 40, 60):
        got = list(calibration.calibration_images("demo", data_dir, image_size=32, count=2,
                                                  resize_size=resize_size)())
        assert [g.shape for g in got] == [(1, 32, 32, 3)] * 2
        for image, path in zip(got, files, strict=True):
            want = preprocess_for_eval(tf.io.read_file(path), 32, resize_size=resize_size)
            np.testing.assert_array_equal(image[0], want.numpy().astype(np.float32))
    default, fixres = (list(calibration.calibration_images(
        "demo", data_dir, image_size=32, count=1, resize_size=r)())[0] for r in (0, 60))
    assert not np.array_equal(default, fixres)


def test_calibration_leaves_out_a_training_file_that_does_not_decode(tmp_path, capsys):
    from keras_resnet.serving import calibration
    from pipelines.demo import make_demo
    from pipelines.sources import load_source

    data_dir = make_demo(str(tmp_path / "demo"), num_classes=2, train_per_class=3,
                         val_per_class=1, image_size=48)
    files = load_source("demo", data_dir).train.files  # indexed while every file was whole
    data = open(files[2], "rb").read()
    with open(files[2], "wb") as f:  # rewritten in place: passes the checks, does not decode
        f.write(data[:20] + b"\x00" * 200 + b"\xff\xd9")
    got = list(calibration.calibration_images("demo", data_dir, image_size=32, count=6)())
    assert len(got) == 5
    assert "calibration: 5 training images (1 that did not decode left out)" in \
        capsys.readouterr().err
