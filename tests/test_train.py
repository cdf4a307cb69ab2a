"""train_main.py / train_and_evaluate: a real train+eval step, the demo learning, flag errors."""

import json
import math
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from keras_resnet.training.config import Config
from tests.kaggle_tree import make_kaggle_tree

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT_KEYS = ("val_top1", "val_top5", "val_loss", "epochs", "steps_per_epoch", "global_step",
               "train_images_per_sec", "export_dir")


def tiny_config(tmp_path, **overrides):
    """ResNet-18 at 32 px, float32, a couple of steps: the smallest real run."""
    values = dict(dataset="imagenet", depth=18, image_size=32, batch_size=2, epochs=1,
                  steps_per_epoch=2, validation_steps=1, mixed_precision="float32",
                  model_dir=str(tmp_path / "run"), export_dir=str(tmp_path / "export"),
                  verbose="2", checkpoint_every_steps=1)
    values.update(overrides)
    return Config(**values)


def run_main(*args, timeout=300):
    return subprocess.run([sys.executable, os.path.join(REPO, "train_main.py"), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


@pytest.mark.slow
def test_train_and_evaluate_one_real_step(tmp_path):
    from keras_resnet.training.run import train_and_evaluate

    tree = make_kaggle_tree(tmp_path / "imagenet", num_classes=3, train_per_class=3,
                            val_per_class=2, image_size=40)
    config = tiny_config(tmp_path, data_dir=str(tmp_path / "imagenet"), steps_per_epoch=1)
    results = train_and_evaluate(config)

    run = tmp_path / "run"
    on_disk = json.loads((run / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    for key in RESULT_KEYS:
        assert key in on_disk, key
    assert on_disk["global_step"] == 1 and on_disk["steps_per_epoch"] == 1
    assert 0.0 <= on_disk["val_top1"] <= on_disk["val_top5"] <= 1.0
    assert on_disk["val_loss"] > 0
    assert (run / "curves.png").stat().st_size > 1000
    assert (run / "history.csv").read_text().count("\n") == 2  # header + one epoch
    assert (run / "best.keras").exists() and (run / "config.json").exists()
    assert (run / "latest.keras").exists() and (run / "classes.json").exists()
    # The export is a versioned SavedModel.
    assert os.path.isfile(os.path.join(on_disk["export_dir"], "saved_model.pb"))
    # The training directory serves predict and on-demand export in fresh processes (which must
    # find the model's custom layers without importing the model module themselves).
    image = next(iter(tree["val"]))
    predicted = subprocess.run([sys.executable, "-m", "keras_resnet.predict", f"--model={run}",
                                image], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    assert len([line for line in predicted.stdout.splitlines() if line.startswith("  ")]) == 3
    exported = subprocess.run([sys.executable, "-m", "keras_resnet.export", f"--model_dir={run}",
                               f"--export_dir={tmp_path / 'export'}"],
                              capture_output=True, text=True, timeout=300, cwd=REPO)
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert sorted(os.listdir(tmp_path / "export")) == ["1", "2"]
    # The tree's broken files were skipped, counted and reported with their reasons.
    report = (run / "skipped_files.tsv").read_text()
    assert len(tree["broken"]) == 3
    for path in tree["broken"]:
        assert os.path.basename(path) in report


@pytest.mark.slow
def test_summary_needs_no_data_and_counts_are_right():
    result = run_main("--depth=18", "--summary", "--image_size=224", "--dataset=imagenet",
                      "--data_dir=/nonexistent/imagenet")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "11,689,512" in result.stdout  # torchvision's trainable count for ResNet-18
    assert "stage4_block2_conv2" in result.stdout  # model.summary() is printed


@pytest.mark.parametrize("flag, expected", [
    ("--depth=42", "valid: 18, 34, 50, 101, 152"),
    ("--mixed_precision=fp8", "valid: auto, float32, mixed_float16, mixed_bfloat16"),
    ("--dataset=cifar", "tfds:NAME"),
    ("--batch_size=0", "--batch_size=0"),
    ("--step_decay_epochs=30,sixty", "--step_decay_epochs=30,sixty; use whole epoch numbers"),
])
def test_bad_flags_give_one_line_errors(flag, expected):
    result = run_main(flag, "--summary")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]  # one line
    assert result.stderr.startswith("error: ") and expected in result.stderr


@pytest.mark.slow
def test_an_ema_that_would_never_update_is_refused(tmp_path):
    """14 steps with an update every 32: best.keras and the export would have been the initial
    weights, with no word said."""
    result = run_main("--dataset=synthetic", "--depth=18", "--image_size=32", "--batch_size=2",
                      "--epochs=2", "--steps_per_epoch=7", "--ema", "--ema_every_steps=32",
                      f"--model_dir={tmp_path / 'run'}", "--export=false")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --ema updates the average every 32 steps (--ema_every_steps) but this run has 14 "
        "steps in all; use --ema_every_steps=3 or train longer.")
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


SAVE_FAILED = ("{{function_node __wrapped__SaveV2_dtypes_103_device_/job:localhost/replica:0/task:0"
               "/device:CPU:0}} /runs/r18/checkpoints/ckpt-8_temp/part-00000-of-00001.data-00000"
               "-of-00001.tempstate7; No space left on device [Op:SaveV2]")


def test_a_full_disk_is_one_line_that_says_to_rerun(monkeypatch, capsys):
    """A checkpoint save on a full disk raised a 50-line traceback; now one line naming the folder
    and what a rerun does. Another error, a GPU out of memory included, still propagates."""
    import tensorflow as tf

    import train_main
    from keras_resnet.training import run as train

    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"))
    raised = []

    def fail(config):
        raise raised[-1]

    monkeypatch.setattr(train, "train_and_evaluate", fail)
    try:
        train_main.FLAGS(["train_main.py", "--dataset=synthetic", "--model_dir=/runs/r18"])
        raised.append(tf.errors.ResourceExhaustedError(None, None, SAVE_FAILED))
        assert train_main.main(["train_main.py"]) == 2
        assert capsys.readouterr().err == (
            "error: no space left on device writing /runs/r18/checkpoints; free space and run the "
            "same command again (training resumes from its last checkpoint; what was written "
            "before is kept).\n")
        raised.append(OSError(28, "No space left on device", "/runs/r18/.tmp-7-ab12-latest.keras"))
        assert train_main.main(["train_main.py"]) == 2
        assert "error: no space left on device writing /runs/r18; free space" in \
            capsys.readouterr().err
        # A path with a space; a temporary inside a temporary: the folder above the first one.
        from keras_resnet import files

        spaced = SAVE_FAILED.replace("/runs/r18/", "/data/my runs/r18/")
        assert "writing /data/my runs/r18/checkpoints;" in files.no_space_message(
            tf.errors.ResourceExhaustedError(None, None, spaced), "/x", "y")
        nested = "{{function_node f}} out/r18/.tmp-12-ab12cd34-export/variables/v.data; " \
                 "No space left on device [Op:SaveV2]"
        assert "writing out/r18;" in files.no_space_message(
            tf.errors.ResourceExhaustedError(None, None, nested), "/x", "y")
        raised.append(tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor"))
        with pytest.raises(tf.errors.ResourceExhaustedError, match="OOM"):
            train_main.main(["train_main.py"])
    finally:
        train_main.FLAGS.unparse_flags()


def test_folders_of_failed_checkpoint_saves_are_removed_when_the_run_restarts(tmp_path):
    """A save that failed (a full disk) leaves TensorFlow's `ckpt-N_temp/` folder, up to a whole
    checkpoint; the next run's writer removes it, keeps the checkpoints, and saves anew."""
    import keras
    import tensorflow as tf

    from keras_resnet.training import checkpoint as ckpt_lib

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    optimizer = keras.optimizers.SGD(0.1)
    directory = tmp_path / "checkpoints"
    ckpt_lib.TrainingCheckpoint(model, optimizer, str(directory)).save(0, 4)
    failed = directory / "ckpt-8_temp"
    failed.mkdir()
    (failed / "part-00000-of-00001.data-00000-of-00001.tempstate77").write_bytes(b"x" * 100)
    restarted = ckpt_lib.TrainingCheckpoint(model, optimizer, str(directory))
    assert not failed.exists()
    assert restarted.restore() == (0, 4)
    assert sorted(p.name for p in directory.iterdir() if p.name.startswith("ckpt-0.")) == [
        "ckpt-0.data-00000-of-00001", "ckpt-0.index"]
    # A worker that does not write leaves the chief's folder alone.
    failed.mkdir()
    ckpt_lib.TrainingCheckpoint(model, optimizer, str(directory), write=False)
    assert failed.exists()
    assert tf.train.latest_checkpoint(str(directory)).endswith("ckpt-0")


@pytest.mark.parametrize("started, now", [(True, False), (False, True)])
def test_a_resume_must_keep_ema_as_it_started(tmp_path, started, now):
    """Either way: off -> on failed in the restore with a message about 'ema/...' variables, and
    on -> off restored without a word (best.keras then held EMA weights, results.json said ema
    false)."""
    import keras

    from keras_resnet.files import write_json_atomic
    from keras_resnet.training import checkpoint as ckpt_lib
    from keras_resnet.training import run

    write_json_atomic(str(tmp_path / "config.json"), {"ema": started, "depth": 18})
    checkpoints = str(tmp_path / "checkpoints")
    run._check_ema_as_started(Config(ema=now), str(tmp_path), checkpoints)  # nothing to resume
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    ckpt_lib.TrainingCheckpoint(model, keras.optimizers.SGD(0.1), checkpoints).save(0, 1)
    with pytest.raises(run.UserError) as info:
        run._check_ema_as_started(Config(ema=now), str(tmp_path), checkpoints)
    flag = str(started).lower()
    assert str(info.value) == (f"{tmp_path} was started with --ema={flag}: resume with "
                               f"--ema={flag}, or use another --model_dir.")
    run._check_ema_as_started(Config(ema=started), str(tmp_path), checkpoints)


def test_data_dir_defaults_per_dataset():
    assert Config(dataset="imagenet").resolved_data_dir == "data/imagenet"
    assert Config(dataset="demo").resolved_data_dir == "data/demo"  # never inside data/imagenet
    assert Config(dataset="tfds:mnist").resolved_data_dir == ""  # TFDS's own default
    assert Config(dataset="demo", data_dir="/x").resolved_data_dir == "/x"


@pytest.mark.slow
def test_missing_imagenet_says_how_to_get_it(tmp_path):
    result = run_main("--dataset=imagenet", f"--data_dir={tmp_path / 'nothing'}", "--depth=18",
                      f"--model_dir={tmp_path / 'run'}")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "python -m keras_resnet.download" in result.stderr
    assert "--dataset=demo" in result.stderr


def test_a_dataset_of_one_class_is_refused(tmp_path, monkeypatch):
    # A softmax over one class is always 1: it would "train" to 100% and learn nothing.
    from keras_resnet.training import inputs
    from tests.kaggle_tree import image_bytes

    (tmp_path / "train" / "cat").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        (tmp_path / "train" / "cat" / f"{i}.jpg").write_bytes(image_bytes(rng, 32))
    config = Config(dataset="imagenet", data_dir=str(tmp_path), batch_size=2)
    with pytest.raises(inputs.UserError, match=r"has 1 class \(cat\); a classifier needs at "
                                               r"least 2: add a folder per class"):
        inputs.load_data(config, writer=False)
    # A TFDS dataset has no folder: the message names the TFDS data dir, not "None".
    from pipelines import sources

    one_class = sources.load_source("imagenet", str(tmp_path))
    monkeypatch.setattr(sources, "load_source", lambda *args, **kwargs: one_class)
    with pytest.raises(inputs.UserError) as refused:
        inputs.load_data(Config(dataset="tfds:one_class", batch_size=2), writer=False)
    assert "under the TFDS data dir has 1 class" in str(refused.value)
    assert "None" not in str(refused.value) and "folder" not in str(refused.value)


def test_batch_must_divide_over_replicas(tmp_path, monkeypatch):
    from keras_resnet.training import run as train

    class TwoReplicas:
        num_replicas_in_sync = 2

    monkeypatch.setattr(train.distribute, "make_strategy", lambda *a: TwoReplicas())
    with pytest.raises(train.UserError, match="--batch_size=3 does not divide evenly over 2"):
        train.train_and_evaluate(tiny_config(tmp_path, batch_size=3, dataset="synthetic"))


@pytest.mark.slow
def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(tmp_path):
    from keras_resnet.training.run import UserError, train_and_evaluate

    config = tiny_config(tmp_path, dataset="synthetic", batch_size=4, epochs=2, steps_per_epoch=4,
                         base_learning_rate=1e30, warmup_epochs=0, export=False)
    with pytest.raises(UserError, match="loss became NaN/inf at epoch 1, step 2") as error:
        train_and_evaluate(config)
    assert "last good checkpoint is kept" in str(error.value)
    reader = tf_checkpoint_reader(tmp_path / "run" / "checkpoints")
    weights = [reader.get_tensor(n) for n in reader.get_variable_to_shape_map()]
    weights = [w for w in weights if getattr(w, "dtype", None) == np.float32]
    assert len(weights) > 60 and all(np.isfinite(w).all() for w in weights)
    assert not (tmp_path / "run" / "results.json").exists()


def tf_checkpoint_reader(directory):
    import tensorflow as tf

    return tf.train.load_checkpoint(str(directory))


@pytest.mark.slow
def test_demo_learns_well_above_chance(tmp_path):
    """A short demo run (10 classes: chance is 10%) must learn."""
    result = run_main("--flagfile=configs/demo.flags", f"--data_dir={tmp_path / 'demo'}",
                      f"--model_dir={tmp_path / 'run'}", f"--export_dir={tmp_path / 'export'}",
                      "--image_size=32", "--epochs=4", "--verbose=2", "--export=false",
                      timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["val_top1"] >= 0.5, results
    assert results["global_step"] == 4 * results["steps_per_epoch"]


@pytest.mark.slow
def test_file_cache_is_per_split_file_list_and_input_pipeline(tmp_path, monkeypatch):
    from keras_resnet.training.run import train_and_evaluate
    from pipelines import preprocessing

    make_kaggle_tree(tmp_path / "imagenet", num_classes=3, train_per_class=3, val_per_class=2,
                     image_size=40, broken=False)
    cache = tmp_path / "cache" / "imagenet"  # its directory does not exist yet

    def train(run, cache=cache, **overrides):
        """The finished caches (tf.data writes a cache's .index last) after a one-step run."""
        config = tiny_config(tmp_path, data_dir=str(tmp_path / "imagenet"), steps_per_epoch=1,
                             validation_steps=0, export=False, cache=str(cache),
                             model_dir=str(tmp_path / run), **overrides)
        assert train_and_evaluate(config)["global_step"] == 1
        return {p.name.removesuffix(".index") for p in cache.parent.glob("*.index")}

    first = train("run1")
    names = sorted(n.split("-")[0] for n in first)
    assert names == ["imagenet.train", "imagenet.val"], first
    assert all(n.endswith(".pipeline0-of-1") for n in first), first
    # Another image size caches other validation pixels: a new val cache, the same train one.
    second = train("run2", image_size=48)
    assert len(second - first) == 1 and next(iter(second - first)).startswith("imagenet.val-")
    # Another JPEG decoder (IDCT) gives other pixels: a new val cache, never the old pixels.
    with monkeypatch.context() as patch:
        patch.setattr(preprocessing, "JPEG_DCT", "INTEGER_FAST")
        decoder = train("run2b", image_size=48)
    assert len(decoder - second) == 1 and next(iter(decoder - second)).startswith("imagenet.val-")
    second = decoder
    # So does another cut of very long images.
    with monkeypatch.context() as patch:
        patch.setattr(preprocessing, "EVAL_MAX_ASPECT", 8)
        bound = train("run2c", image_size=48)
    assert len(bound - second) == 1 and next(iter(bound - second)).startswith("imagenet.val-")
    second = bound
    # Another file list (a new training image) gets caches of its own, never the old bytes.
    extra = tmp_path / "imagenet" / "ILSVRC" / "Data" / "CLS-LOC" / "train"
    first_class = sorted(extra.iterdir())[0]
    (first_class / "extra.JPEG").write_bytes(next(first_class.iterdir()).read_bytes())
    third = train("run3", image_size=48)
    assert len(third - second) == 1 and next(iter(third - second)).startswith("imagenet.train-")
    # A run killed while writing its caches leaves tf.data's lock files and temporary shards;
    # the next run clears them instead of failing on "a concurrent caching iterator".
    killed = tmp_path / "killed" / "imagenet"
    killed.parent.mkdir()
    for name in third:
        for leftover in ("_0.lockfile", "_0.data-00000-of-00001.tempstate123"):
            (killed.parent / (name + leftover)).write_text("Created at: 1")
    fourth = train("run4", cache=killed, image_size=48)
    assert len(fourth) == 2 and fourth <= third  # run 3's caches, rewritten there
    assert not [p for p in killed.parent.glob("*tempstate123") if p.name.split("_0.")[0] in fourth]


def test_cache_leaves_out_training_files_too_big_for_memory(tmp_path, monkeypatch):
    from keras_resnet.training import inputs
    from pipelines import dataset, sources

    make_kaggle_tree(tmp_path / "imagenet", num_classes=3, train_per_class=3, val_per_class=2,
                     image_size=40, broken=False)
    source = sources.load_source("imagenet", str(tmp_path / "imagenet"))
    config = tiny_config(tmp_path, cache="memory")
    assert inputs.train_cache(config, source) == "memory"
    monkeypatch.setattr(dataset, "CACHE_MAX_BYTES", 100)  # the JPEGs are ~1 KiB each
    assert inputs.train_cache(config, source) is None
    assert inputs.train_cache(tiny_config(tmp_path), source) is None


def test_run_identity_is_compared_only_when_something_was_trained(tmp_path):
    """A run.json with no checkpoint or model beside it (a start on the wrong --data_dir that
    was stopped before its first save) is replaced; once a checkpoint exists, it is compared."""
    from keras_resnet.files import read_json
    from keras_resnet.training import checkpoint as ckpt_lib

    def identity(**change):
        return {"depth": 18, "variant": "v1.5", "conv_bias": False, "num_classes": 3,
                "class_ids": ["a", "b", "c"], "frozen": [], "batch_size": 8, **change}

    run = str(tmp_path)
    ckpt_lib.check_run_identity(run, identity())
    ckpt_lib.check_run_identity(run, identity(class_ids=["x", "y", "z"]))  # nothing trained yet
    assert read_json(os.path.join(run, ckpt_lib.RUN_JSON))["class_ids"] == ["x", "y", "z"]
    for trained in (os.path.join(ckpt_lib.CHECKPOINT_SUBDIR, "checkpoint"), ckpt_lib.BEST_MODEL,
                    ckpt_lib.FINAL_MODEL):
        os.makedirs(os.path.dirname(os.path.join(run, trained)), exist_ok=True)
        open(os.path.join(run, trained), "w").close()
        with pytest.raises(ckpt_lib.CheckpointMismatchError, match="first that differs is #0"):
            ckpt_lib.check_run_identity(run, identity())
        with pytest.raises(ckpt_lib.CheckpointMismatchError, match="batch_size: checkpoint 8"):
            ckpt_lib.check_run_identity(run, identity(class_ids=["x", "y", "z"], batch_size=16))
        os.remove(os.path.join(run, trained))
    assert read_json(os.path.join(run, ckpt_lib.RUN_JSON))["class_ids"] == ["x", "y", "z"]


def test_a_run_folder_in_use_by_another_process_is_refused(tmp_path):
    """A second run started in a folder another process trains in is refused before it reads any
    data (run.json is not compared until the first checkpoint, so it would not be); the lock goes
    with its holder, even one killed with SIGKILL."""
    from keras_resnet.training.run import UserError, train_and_evaluate

    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from keras_resnet import files\n"
         f"with files.exclusive({str(run)!r}):\n print('held', flush=True); time.sleep(300)"],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        config = tiny_config(tmp_path, data_dir=str(tmp_path / "missing"))
        with pytest.raises(UserError, match=rf"in use by another process \(pid {holder.pid} on "
                                            rf"{socket.gethostname()}\).*"
                                            r"another --model_dir"):
            train_and_evaluate(config)
    finally:
        holder.kill()
        holder.wait()
    with pytest.raises(UserError) as e:  # the lock died with its holder: on to reading the data
        train_and_evaluate(tiny_config(tmp_path, data_dir=str(tmp_path / "missing")))
    assert "in use" not in str(e.value)
    assert not any(name.startswith(".tmp") for name in os.listdir(run))


def test_time_based_checkpoints(monkeypatch):
    """--checkpoint_every_secs saves when that much time has passed, even between step saves."""
    from keras_resnet.training import checkpoint as ckpt_lib

    saved, clock = [], [0.0]

    class FakeCheckpoint:
        def save(self, epoch, step):
            saved.append((epoch, step))
            return f"ckpt-{step}"

    monkeypatch.setattr(ckpt_lib.time, "monotonic", lambda: clock[0])
    callback = ckpt_lib.CheckpointCallback(
        FakeCheckpoint(), steps_per_epoch=100, every_steps=0, every_secs=60.0, model_dir="/unused",
        stop=ckpt_lib.StopRequest(), write=False)
    callback.on_epoch_begin(0)
    for batch in range(10):
        clock[0] += 25.0  # each step takes 25 s: saves after steps 3, 6 and 9
        callback.on_train_batch_end(batch, {"loss": 1.0})
    assert saved == [(0, 3), (0, 6), (0, 9)]


def test_signal_during_last_step_saves_before_validating():
    """A stop requested during an epoch's last step lets validation and the epoch-end save run,
    then stops: the epoch is never left unvalidated."""
    from keras_resnet.training import checkpoint as ckpt_lib

    saved = []

    class FakeCheckpoint:
        def save(self, epoch, step):
            saved.append((epoch, step))
            return "ckpt"

    def new_callback():
        stop = ckpt_lib.StopRequest()
        return stop, ckpt_lib.CheckpointCallback(
            FakeCheckpoint(), steps_per_epoch=3, every_steps=0, every_secs=0,
            model_dir="/unused", stop=stop, write=False)

    stop, callback = new_callback()
    callback.on_epoch_begin(0)
    callback.on_train_batch_end(0, {"loss": 1.0})
    stop.signal_name = "SIGTERM"  # arrives during step 2 of 3: save there and stop
    with pytest.raises(ckpt_lib.TrainingInterrupted):
        callback.on_train_batch_end(1, {"loss": 1.0})
    assert saved == [(0, 2)]

    saved.clear()
    stop, callback = new_callback()
    callback.on_epoch_begin(1)
    callback.on_train_batch_end(0, {"loss": 1.0})
    callback.on_train_batch_end(1, {"loss": 1.0})
    stop.signal_name = "SIGTERM"  # arrives during the last step: save before validation
    callback.on_train_batch_end(2, {"loss": 1.0})
    assert saved == [(2, 0)]  # a preemption during the validation pass loses nothing trained
    with pytest.raises(ckpt_lib.TrainingInterrupted):
        callback.on_epoch_end(1, {"val_top1": 0.5})  # validation ran; no second save
    assert saved == [(2, 0)]

    # Without a signal the last step leaves the save to the epoch end.
    saved.clear()
    stop, callback = new_callback()
    callback.on_epoch_begin(0)
    for batch in range(3):
        callback.on_train_batch_end(batch, {"loss": 1.0})
    assert saved == []
    callback.on_epoch_end(0, {"val_top1": 0.5})
    assert saved == [(1, 0)]


class _FakeStrategy:
    def __init__(self, replicas):
        self.num_replicas_in_sync = replicas


def test_xla_auto_is_on_for_exactly_one_gpu(monkeypatch):
    import tensorflow as tf

    from keras_resnet.training import distribute

    one = _FakeStrategy(1)
    # This machine has no GPU: auto leaves XLA off; explicit settings win.
    assert distribute.choose_jit_compile("auto", one) is False
    assert distribute.choose_jit_compile("true", one) is True
    assert distribute.choose_jit_compile("false", one) is False
    gpu = tf.config.LogicalDevice("/device:GPU:0", "GPU")
    monkeypatch.setattr(tf.config, "list_logical_devices",
                        lambda kind=None: [gpu] if kind == "GPU" else [])
    assert distribute.choose_jit_compile("auto", one) is True
    assert distribute.choose_jit_compile("auto", _FakeStrategy(2)) is False
    assert distribute.choose_jit_compile("false", one) is False
    assert distribute.choose_jit_compile("auto", one, deterministic=True) is False


@pytest.mark.slow
def test_xla_train_step_with_float16_loss_scaling():
    """The single-GPU default (XLA + mixed_float16 + loss scaling + fused BatchNorm), on the CPU."""
    import keras
    import tensorflow as tf

    from keras_resnet.training import run as train

    config = Config(dataset="synthetic", depth=18, image_size=32, batch_size=4,
                    mixed_precision="mixed_float16", jit_compile="true",
                    zero_init_residual=False).validate()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        with tf.distribute.OneDeviceStrategy("/cpu:0").scope():
            model = train.make_model(config, num_classes=5)
            optimizer = train.compile_model(model, config, num_classes=5, steps_per_epoch=2)
        before = [w.numpy().copy() for w in model.trainable_weights]
        images = np.random.default_rng(0).integers(0, 256, (32, 32, 32, 3), dtype=np.uint8)
        history = model.fit(images, np.arange(32) % 5, batch_size=4, epochs=1, verbose=0)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert model.jit_compile is True
    assert isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    # Loss scaling starts at 2**15 and skips the steps whose float16 gradients overflow while it
    # halves the scale; some of the 8 steps must have been applied.
    assert 1 <= int(optimizer.iterations.numpy()) <= 8
    assert np.isfinite(history.history["loss"][0])
    unchanged = [w.path for b, w in zip(before, model.trainable_weights, strict=True)
                 if np.array_equal(b, w.numpy())]
    assert not unchanged


@pytest.mark.slow
def test_log_file_gets_progress_lines_not_a_progress_bar(tmp_path):
    """stdout is a pipe here, as in a log file: no per-step bar with escape codes."""
    result = run_main("--dataset=synthetic", "--depth=18", "--image_size=32", "--batch_size=2",
                      "--epochs=2", "--steps_per_epoch=3", "--mixed_precision=float32",
                      "--export=false", "--progress_every_secs=0.000001",
                      f"--model_dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    for epoch in (1, 2):
        for step in (1, 2, 3):
            line = next(x for x in lines if x.startswith(f"epoch {epoch}/2 step {step}/3 "))
            assert "loss " in line and "images/s, epoch ends in 0:00:" in line, line
            # The whole run's end too, before the last epoch.
            assert (", training in 0:00:" in line) is (epoch == 1), line
        assert any(x.startswith(f"epoch {epoch}/2 done in 0:") and "top1" in x for x in lines)
    assert "\x1b[" not in result.stdout and "\b" not in result.stdout


def test_progress_eta_leaves_out_the_first_steps_tracing(monkeypatch, capsys):
    """The first step traces (or compiles) the training step: 50 s here, then 1 s a step. The
    ETAs go by the later steps' pace; they had multiplied the first step's time over the run."""
    from keras_resnet.training import callbacks

    clock = iter([0.0, 50.0, 51.0, 52.0])
    monkeypatch.setattr(callbacks.time, "monotonic", lambda: next(clock))
    log = callbacks.ProgressLog(steps_per_epoch=10, epochs=2, global_batch_size=4, every_secs=1e-9)
    log.on_epoch_begin(0)
    for batch in range(3):
        log.on_train_batch_end(batch, {"loss": 1.0})
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == ("epoch 1/2 step 3/10 loss 1, 0.2 images/s, epoch ends in 0:00:07, "
                         "training in 0:00:17")
    # Validation took 30 s after epoch 1; it counts once more for epoch 2 (not for its steps).
    clock = iter([60.0, 90.0, 100.0, 110.0, 111.0, 112.0])
    log.on_test_begin()
    log.on_test_end()
    log.on_epoch_begin(1)
    for batch in range(3):
        log.on_train_batch_end(batch, {"loss": 1.0})
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == ("epoch 2/2 step 3/10 loss 1, 1.0 images/s, epoch ends in 0:00:07, "
                         "training in 0:00:37")


def test_throughput_of_an_epoch_of_one_step_is_not_zero(monkeypatch):
    """Epochs of several steps leave out the first (tracing); an epoch of one step has only it."""
    from keras_resnet.training import callbacks

    class Optimizer:
        learning_rate = 0.1

    log = callbacks.ThroughputLogger(global_batch_size=8)
    log.set_model(type("Model", (), {"optimizer": Optimizer()})())
    clock = iter([0.0, 4.0])  # epoch begins, its only step ends 4 s later
    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: next(clock))
    logs = {}
    log.on_epoch_begin(0)
    log.on_train_batch_begin(0)
    log.on_train_batch_end(0)
    log.on_epoch_end(0, logs)
    assert logs["images_per_sec"] == 2.0
    clock = iter([10.0, 30.0, 30.0, 31.0, 32.0])  # 20 s first step, then 1 s each: 16 images in 2 s
    log.on_epoch_begin(1)
    for batch in range(3):
        if batch == 1:
            log.on_train_batch_begin(batch)
        log.on_train_batch_end(batch)
    log.on_epoch_end(1, logs)
    assert logs["images_per_sec"] == 8.0
    assert log.train_images_per_sec == [2.0, 8.0]


MIRRORED_RUN = r"""
import csv, json, os, sys
import tensorflow as tf

# Two replicas on one CPU, as MirroredStrategy makes them on two GPUs.
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
real = tf.distribute.MirroredStrategy
tf.distribute.MirroredStrategy = lambda: real(["/cpu:0", "/cpu:1"])

import keras
from keras_resnet.training.config import Config
from keras_resnet.training.run import train_and_evaluate
from pipelines import dataset, sources

data_dir, run = sys.argv[1:3]
config = Config(dataset="imagenet", data_dir=data_dir, depth=18, image_size=32, batch_size=4,
                epochs=2, steps_per_epoch=2, validation_steps=0, mixed_precision="float32",
                distribution="mirrored", model_dir=run, export_dir=run + "/export", verbose="2",
                checkpoint_every_steps=1)
results = train_and_evaluate(config)
history = list(csv.DictReader(open(os.path.join(run, "history.csv"))))
# The final model, evaluated on one device over the unpadded validation set.
model = keras.saving.load_model(os.path.join(run, "latest.keras"), compile=False)
val = sources.load_source("imagenet", data_dir).val
correct = total = 0
for x, y in dataset.build_eval_dataset(val, global_batch_size=4, image_size=32):
    correct += int(tf.reduce_sum(tf.cast(tf.argmax(model(x), -1) == y, tf.int32)))
    total += int(y.shape[0])
print("RESULT " + json.dumps({"results": results, "last_val_top1": float(history[-1]["val_top1"]),
                              "single_device_top1": correct / total, "val_images": total}))
"""


@pytest.mark.slow
def test_mirrored_strategy_trains_and_evaluates_every_image_exactly(tmp_path):
    """Two replicas; 7 validation images do not fill the last global batch of 4."""
    make_kaggle_tree(tmp_path / "imagenet", num_classes=3, train_per_class=4, val_per_class=2,
                     image_size=40, broken=False)
    val_dir = tmp_path / "imagenet" / "ILSVRC" / "Data" / "CLS-LOC" / "val"
    first = sorted(val_dir.iterdir())[0]
    extra = val_dir / "ILSVRC2012_val_00000099.JPEG"  # a 7th image, labelled like the first
    extra.write_bytes(first.read_bytes())
    solution = tmp_path / "imagenet" / "LOC_val_solution.csv"
    row = next(r for r in solution.read_text().splitlines() if r.startswith(first.stem))
    solution.write_text(solution.read_text() + row.replace(first.stem, extra.stem) + "\n")

    done = subprocess.run([sys.executable, "-c", MIRRORED_RUN, str(tmp_path / "imagenet"),
                           str(tmp_path / "run")], capture_output=True, text=True, timeout=600,
                          cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO))
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.split("RESULT ", 1)[1])
    assert out["results"]["replicas"] == 2 and out["results"]["global_step"] == 4
    assert out["val_images"] == 7 and math.isfinite(out["results"]["val_loss"])
    # Padding gave the replicas full batches, and its zero weights kept accuracy exact.
    assert out["last_val_top1"] == pytest.approx(out["single_device_top1"], abs=1e-6)
