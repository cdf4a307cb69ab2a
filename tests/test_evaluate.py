"""`python -m keras_resnet.evaluate` and `export --format=torchvision|safetensors` on a demo run."""

import gc
import json
import os
import subprocess
import sys
import weakref
import zipfile

import numpy as np
import pytest
import tensorflow as tf

from keras_resnet import evaluate as evaluate_cmd
from keras_resnet import export as export_cmd
from keras_resnet.model import weights
from keras_resnet.serving import evaluate
from pipelines import preprocessing
from pipelines.demo import make_demo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 32


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo_eval")
    # The demo with 25 validation images per class, not 200: these tests are about the command.
    make_demo(str(root / "data"), val_per_class=25)
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "train_main.py"), "--flagfile=configs/demo.flags",
         f"--data_dir={root / 'data'}", f"--model_dir={root / 'run'}",
         f"--export_dir={root / 'export'}", f"--image_size={SIZE}", "--epochs=2",
         "--steps_per_epoch=6", "--verbose=2", "--mixed_precision=float32"],
        capture_output=True, text=True, timeout=900, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    return root


def _evaluate(root, weights_path, *extra):
    out = root / f"eval-{len(os.listdir(root))}.json"
    status = evaluate_cmd.run([f"--weights={weights_path}", "--dataset=demo",
                               f"--data_dir={root / 'data'}", f"--image_size={SIZE}",
                               f"--json={out}", *extra])
    return status, (json.loads(out.read_text()) if out.exists() else None)


@pytest.mark.slow  # trains a demo model in a subprocess (module fixture)
def test_evaluate_gives_the_runs_top1(demo_run):
    """Export, best.keras and the run directory, center crop at the training size: the top-1
    and top-5 that training recorded in results.json, over every validation image."""
    recorded = json.loads((demo_run / "run" / "results.json").read_text())
    run_dir = demo_run / "run"
    for path in (demo_run / "export", run_dir / "best.keras"):
        status, result = _evaluate(demo_run, path)
        assert status == 0
        assert result["images"] == 250  # the 10 x 25 validation images made above
        assert result["top1"] == pytest.approx(recorded["val_top1"], abs=1e-6), path
        assert result["top5"] == pytest.approx(recorded["val_top5"], abs=1e-6), path
        assert (result["protocol"], result["crop_size"], result["resize_size"]) == (
            "center_crop", SIZE, preprocessing.eval_resize_size(SIZE))
    # Given no size, a run directory (or its .keras file) is evaluated at the run's own size.
    out = demo_run / "eval-run-sizes.json"
    assert evaluate_cmd.run([f"--weights={run_dir}", "--dataset=demo",
                             f"--data_dir={demo_run / 'data'}", f"--json={out}"]) == 0
    result = json.loads(out.read_text())
    _, sized = _evaluate(demo_run, run_dir)  # its latest checkpoint, --image_size given
    assert (result["crop_size"], result["top1"]) == (SIZE, sized["top1"])


@pytest.mark.slow  # trains a demo model in a subprocess (module fixture)
def test_other_protocols_and_their_limits(demo_run, capsys):
    best = demo_run / "run" / "best.keras"
    for protocol, extra in (("ten_crop", ()), ("full_image", ()),
                            ("center_crop", ("--crop_size=40", "--resize_size=44"))):
        status, result = _evaluate(demo_run, best, f"--protocol={protocol}", *extra)
        assert status == 0 and result["images"] == 250 and result["protocol"] == protocol
        assert 0 <= result["top1"] <= result["top5"] <= 1
    assert "full_image" in capsys.readouterr().out  # the table
    status, result = _evaluate(demo_run, demo_run / "export", "--protocol=ten_crop")
    assert status == 1 and result is None
    assert "is a SavedModel, which crops by itself" in capsys.readouterr().err


@pytest.mark.slow  # trains a demo model in a subprocess (module fixture)
def test_bad_weights_one_line_error_nothing_written(demo_run, tmp_path, capsys):
    evil = tmp_path / "evil.pth"
    with zipfile.ZipFile(evil, "w") as archive:
        archive.writestr("x/data.pkl", b"\x80\x02cos\nsystem\nX\x04\x00\x00\x00trueq\x00\x85R.")
    truncated = tmp_path / "cut.pth"
    truncated.write_bytes(b"PK\x03\x04" + b"\x00" * 100)
    for path, message in ((tmp_path / "missing.pth", "not found"),
                          (evil, "global os.system"), (truncated, "incomplete zip")):
        status, result = _evaluate(demo_run, path)
        err = capsys.readouterr().err.strip().splitlines()
        assert status == 1 and result is None
        assert err[-1].startswith("error:") and message in err[-1], err


def test_center_crop_is_the_eval_pipelines():
    protocol = evaluate.Protocol.make("center_crop", SIZE)
    for shape in ((40, 40), (37, 81), (90, 33)):
        image = tf.constant(np.random.default_rng(0).integers(0, 256, (*shape, 3)), tf.uint8)
        np.testing.assert_array_equal(evaluate.preprocess(image, protocol),
                                      preprocessing.center_crop_for_eval(image, SIZE))
    ten = evaluate.preprocess(image, evaluate.Protocol.make("ten_crop", SIZE)).numpy()
    assert ten.shape == (10, SIZE, SIZE, 3)
    np.testing.assert_array_equal(ten[5], ten[0][:, ::-1])  # the mirror of the first corner
    np.testing.assert_array_equal(ten[4], evaluate.preprocess(image, protocol))
    assert evaluate_cmd.PROTOCOLS == evaluate.PROTOCOLS


@pytest.mark.slow
@pytest.mark.parametrize("fmt, name", [("torchvision", "w.pth"), ("safetensors", "w.safetensors")])
def test_export_weight_files(demo_run, tmp_path, fmt, name):
    import keras

    out = tmp_path / name
    status = export_cmd.run([f"--model_dir={demo_run / 'run'}", f"--format={fmt}",
                             f"--output={out}"])
    assert status == 0 and sorted(os.listdir(tmp_path)) == [name, name + ".json"]
    # The class names travel beside the file (and in a safetensors file's metadata), with what a
    # torchvision client feeds.
    classes = json.loads((demo_run / "run" / "classes.json").read_text())
    side = json.loads((tmp_path / (name + ".json")).read_text())
    assert side["class_names"] == classes["class_names"] and side["format"] == fmt
    assert "mean (0.485, 0.456, 0.406)" in side["preprocessing"] and "input" not in side
    if fmt == "safetensors":
        from safetensors import safe_open

        with safe_open(str(out), "np") as f:
            meta = f.metadata()
        assert meta["format"] == "pt"
        assert json.loads(meta["class_ids"]) == classes["class_ids"]
    model = keras.saving.load_model(demo_run / "run" / "best.keras", compile=False)
    state, _ = weights.read_state_dict(str(out))
    expected = weights.export_state_dict(model)
    assert state.keys() == expected.keys()
    for key in expected:
        np.testing.assert_array_equal(state[key], expected[key], err_msg=key)
    # The file evaluates like the run it came from.
    status, result = _evaluate(demo_run, out)
    recorded = json.loads((demo_run / "run" / "results.json").read_text())
    assert status == 0 and result["top1"] == pytest.approx(recorded["val_top1"], abs=1e-6)
    assert export_cmd.run([f"--model_dir={demo_run / 'run'}", f"--format={fmt}"]) == 2


MIRRORED_PREDICT = r"""
import numpy as np
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from keras_resnet.model.resnet import build_resnet
from keras_resnet.serving import evaluate

strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
with strategy.scope():
    model = build_resnet(18, num_classes=7, input_shape=(32, 32, 3), include_preprocessing=True)
images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
single = evaluate.keras_predictor(model)(images)
split = evaluate.keras_predictor(model, strategy)(images)  # 5 images over 2 replicas: padded
assert split.shape == (5, 7), split.shape
np.testing.assert_allclose(split, single, rtol=1e-5, atol=1e-6)
print("MIRRORED OK", strategy.num_replicas_in_sync)
"""


@pytest.mark.slow
def test_prediction_split_over_two_replicas_equals_one_device():
    """Evaluation under MirroredStrategy (two CPU replicas standing in for two GPUs): an odd
    batch is padded so no replica is empty, and the probabilities equal a single device's."""
    run = subprocess.run([sys.executable, "-c", MIRRORED_PREDICT], cwd=REPO, capture_output=True,
                         text=True, timeout=300,
                         env=dict(os.environ, PYTHONPATH=REPO, CUDA_VISIBLE_DEVICES=""))
    assert run.returncode == 0 and "MIRRORED OK 2" in run.stdout, run.stderr[-3000:]


def test_a_fixres_saved_model_is_evaluated_at_its_own_sizes(tmp_path):
    """A SavedModel crops by itself at the sizes it records (FixRes: 40 of a 52 shorter side, not
    the 256/224 rule): the matching protocol runs, another one is refused with the flags to use."""
    import keras

    from keras_resnet.model.resnet import build_resnet
    from keras_resnet.serving import export
    from pipelines.sources import load_source

    keras.utils.set_random_seed(0)
    model = build_resnet(18, num_classes=3, input_shape=(None, None, 3),
                         include_preprocessing=True)
    source = load_source("demo", make_demo(str(tmp_path / "data"), num_classes=3,
                                           train_per_class=1, val_per_class=2))
    split = source.val
    saved = export.export_saved_model(model, str(tmp_path / "export"), image_size=40,
                                      class_ids=source.class_ids, resize_size=52)
    result = evaluate.evaluate_path(saved, split, evaluate.Protocol.make(
        "center_crop", 40, resize_size=52), progress=False)
    assert (result["images"], result["crop_size"], result["resize_size"]) == (6, 40, 52)
    with pytest.raises(ValueError) as refused:
        evaluate.evaluate_path(saved, split, evaluate.Protocol.make("center_crop", 40),
                               progress=False)
    assert ("crops by itself (center crop 40 of a 52 shorter side): evaluate it with "
            "--protocol=center_crop --image_size=40 --resize_size=52") in str(refused.value)
    # Given no size (the command's flags all at their defaults), it takes the SavedModel's own.
    result = evaluate.evaluate_path(saved, split, evaluate.Protocol.make("center_crop", 224),
                                    progress=False, sizes_given=False)
    assert (result["crop_size"], result["resize_size"]) == (40, 52)
    out = tmp_path / "eval.json"  # the command: no size flag given
    assert evaluate_cmd.run([f"--weights={tmp_path / 'export'}", "--dataset=demo",
                             f"--data_dir={tmp_path / 'data'}", f"--json={out}"]) == 0
    assert json.loads(out.read_text())["resize_size"] == 52
    assert evaluate_cmd.run([f"--weights={tmp_path / 'export'}", "--dataset=demo",
                             f"--data_dir={tmp_path / 'data'}", "--image_size=40"]) == 1


def test_a_model_that_fails_on_every_image_says_so():
    """Batches that the model refuses are retried image by image (one bad file must not cost its
    batch); when every image fails, the error names the model's failure, not the data."""
    def batches():
        class Batch:  # what the datasets yield: .numpy() gives a new array
            def __init__(self, array):
                self.array = array

            def numpy(self):
                return self.array.copy()

        for _ in range(2):
            yield Batch(np.zeros([3, 8, 8, 3], np.float32)), Batch(np.arange(3))

    seen, first_batch_alive = [], []

    def refuses(inputs):
        seen.append(weakref.ref(inputs.base if inputs.base is not None else inputs))
        if len(seen) > 4:  # in the second batch (the batch, then its 3 images one by one)
            gc.collect()
            first_batch_alive.append(seen[0]() is not None)
        raise tf.errors.InvalidArgumentError(None, None, "Expected image (JPEG, PNG, ...)\n"
                                                         "\t [[{{node DecodeImage}}]]")

    with pytest.raises(ValueError, match=r"failed on every image it was given \(6; the first "
                                         r"error: Expected image \(JPEG, PNG, \.\.\.\)\)"):
        evaluate.evaluate(refuses, batches(), progress=False)
    # A refused batch is not kept (by its errors' tracebacks) while the next ones are evaluated.
    assert first_batch_alive == [False] * 4
    probs = np.eye(3, dtype=np.float32)
    assert evaluate.evaluate(lambda inputs: probs[:len(inputs)], batches(),
                             progress=False)["images"] == 6
    with pytest.raises(ValueError, match="no image could be evaluated"):
        evaluate.evaluate(refuses, iter(()), progress=False)


def test_saved_model_evaluation_leaves_out_a_broken_file_and_refuses_other_classes(tmp_path):
    # The serving signature refuses a whole batch for one bad file: the others are scored.
    import dataclasses

    import keras

    from keras_resnet.model.resnet import build_resnet
    from keras_resnet.serving import export
    from pipelines.sources import load_source

    keras.utils.set_random_seed(0)
    model = build_resnet(18, num_classes=3, input_shape=(None, None, 3),
                         include_preprocessing=True)
    source = load_source("demo", make_demo(str(tmp_path / "data"), num_classes=3,
                                           train_per_class=1, val_per_class=2))
    saved = export.export_saved_model(model, str(tmp_path / "export"), image_size=32,
                                      class_ids=source.class_ids)
    broken = tmp_path / "broken.jpg"
    data = open(source.val.files[0], "rb").read()
    broken.write_bytes(data[:20] + b"\x00" * 200 + b"\xff\xd9")  # passes the checks, won't decode
    # A file deleted (or unreadable) since the split was listed is left out too.
    gone = tmp_path / "deleted.jpg"
    split = dataclasses.replace(
        source.val, files=np.array([str(broken), *source.val.files[:3], str(gone),
                                    *source.val.files[3:]]),
        labels=np.array([0, *source.val.labels[:3], 1, *source.val.labels[3:]]),
        num_examples=None)
    protocol = evaluate.Protocol.make("center_crop", 32)
    result = evaluate.evaluate_path(saved, split, protocol, batch_size=4, progress=False,
                                    num_classes=3, class_ids=source.class_ids)
    whole = evaluate.evaluate_path(saved, source.val, protocol, batch_size=4, progress=False)
    assert (result["images"], result["skipped"]) == (6, 2)
    assert (result["top1"], result["top5"]) == (whole["top1"], whole["top5"])
    other = [*source.class_ids[:2], "zebra"]
    for kwargs, message in ((dict(num_classes=4), "predicts 3 classes but the dataset has 4"),
                            (dict(num_classes=3, class_ids=other),
                             r"trained on other classes than the dataset's \(class #2 is")):
        with pytest.raises(ValueError, match=message):
            evaluate.evaluate_path(saved, source.val, protocol, progress=False, **kwargs)


def test_a_classes_json_of_another_model_beside_a_keras_file_is_refused(tmp_path):
    """classes.json beside a .keras file that lists another number of classes than the model's
    output: a clear error, not an IndexError or a score against the wrong classes."""
    import keras

    from keras_resnet.model.resnet import build_resnet
    from keras_resnet.serving import export
    from pipelines.sources import load_source

    keras.utils.set_random_seed(0)
    source = load_source("demo", make_demo(str(tmp_path / "data"), num_classes=3,
                                           train_per_class=1, val_per_class=1))
    path = str(tmp_path / "model.keras")
    build_resnet(18, num_classes=3, input_shape=(None, None, 3),
                 include_preprocessing=True).save(path)
    protocol = evaluate.Protocol.make("center_crop", 32)
    export.write_classes_json(str(tmp_path / export.CLASSES_JSON), source.class_ids[:2])
    with pytest.raises(ValueError, match="lists 2 classes but the model predicts 3"):
        evaluate.evaluate_path(path, source.val, protocol, progress=False, num_classes=3,
                               class_ids=source.class_ids)
    export.write_classes_json(str(tmp_path / export.CLASSES_JSON), source.class_ids)
    result = evaluate.evaluate_path(path, source.val, protocol, progress=False, num_classes=3,
                                    class_ids=source.class_ids)
    assert (result["images"], result["skipped"]) == (3, 0)


def test_evaluate_names_the_validation_files_the_listing_left_out(tmp_path, capsys):
    """A validation file without a CSV row is not silently dropped from the numbers."""
    import keras

    from keras_resnet.model.resnet import build_resnet
    from keras_resnet.serving import export
    from pipelines.sources import load_source

    keras.utils.set_random_seed(0)
    data = make_demo(str(tmp_path / "data"), num_classes=3, train_per_class=1, val_per_class=2)
    source = load_source("imagenet", data)
    model = build_resnet(18, num_classes=3, input_shape=(32, 32, 3), include_preprocessing=True)
    saved = export.export_saved_model(model, str(tmp_path / "export"), image_size=32,
                                      class_ids=source.class_ids)
    stray = os.path.join(os.path.dirname(source.val.files[0]), "stray.JPEG")
    with open(source.val.files[0], "rb") as f, open(stray, "wb") as out:
        out.write(f.read())
    report = tmp_path / "eval.json"
    status = evaluate_cmd.run([f"--weights={saved}", "--dataset=imagenet", f"--data_dir={data}",
                               f"--json={report}"])
    err = capsys.readouterr().err
    result = json.loads(report.read_text())
    assert status == 0 and (result["images"], result["left_out"]) == (6, 1)
    assert (f"1 entry of the validation folder left out when it was listed (the first: "
            f"{stray}: no row in LOC_val_solution.csv)") in err
