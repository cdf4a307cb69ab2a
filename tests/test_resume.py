"""Kill -9 a training run mid-epoch (and once inside a checkpoint write), restart, and check that
it resumed, that no step is done twice or skipped, and that the weights equal an uninterrupted
run's (deterministic mode, CPU)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from tests.kaggle_tree import make_kaggle_tree

pytestmark = pytest.mark.slow  # end-to-end runs in subprocesses

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPOCHS = 2
BATCH = 2

# Runs train_main with tf.train.Checkpoint._write patched: the KILL_AT_SAVE-th checkpoint write
# leaves its files torn (data file cut in half) and the process is SIGKILLed before the
# checkpoint index is updated -- what a kill in the middle of a save leaves behind.
TORN_WRITE_RUNNER = r"""
import glob, os, signal, sys
sys.path.insert(0, os.environ["REPO"])
import tensorflow as tf
from tensorflow.python.checkpoint import checkpoint_options

kill_at = int(os.environ["KILL_AT_SAVE"])
calls = [0]
original = tf.train.Checkpoint._write

def torn_write(self, prefix, options=None):
    calls[0] += 1
    if calls[0] < kill_at:
        return original(self, prefix, options=options)
    original(self, prefix, options=checkpoint_options.CheckpointOptions())  # no index update
    for data in glob.glob(prefix + ".data-*"):
        with open(data, "r+b") as f:
            f.truncate(os.path.getsize(data) // 2)
    os.kill(os.getpid(), signal.SIGKILL)

tf.train.Checkpoint._write = torn_write
import train_main
sys.argv = ["train_main.py"] + sys.argv[1:]
train_main.run()
"""


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    make_kaggle_tree(root, num_classes=3, train_per_class=4, val_per_class=2, image_size=40)
    return str(root)  # 12 train images + CMYK + PNG = 14 -> 7 steps per epoch at batch 2


def flags(data_dir, run_dir, **extra):
    values = dict(dataset="imagenet", data_dir=data_dir, depth=18, image_size=32,
                  batch_size=BATCH, epochs=EPOCHS, validation_steps=1, mixed_precision="float32",
                  model_dir=os.path.join(run_dir, "run"), export="false", verbose="2",
                  checkpoint_every_steps=1, deterministic="true", seed=3)
    values.update(extra)
    return [f"--{k}={v}" for k, v in values.items()]


def latest_step(run_dir):
    path = tf.train.latest_checkpoint(os.path.join(run_dir, "run", "checkpoints"))
    return int(path.rsplit("-", 1)[1]) if path else 0


def run_to_end(args, env=None):
    result = subprocess.run([sys.executable, os.path.join(REPO, "train_main.py"), *args],
                            capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def start_and_kill_at(args, step, sig=signal.SIGKILL):
    """Starts a run and sends `sig` once its latest checkpoint reaches global step `step`."""
    run_dir = os.path.dirname(args_value(args, "model_dir"))
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "train_main.py"), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    deadline = time.monotonic() + 300
    while latest_step(run_dir) < step:
        assert proc.poll() is None, f"run ended before step {step}:\n{proc.stdout.read()[-3000:]}"
        assert time.monotonic() < deadline, "run too slow"
        time.sleep(0.05)
    proc.send_signal(sig)
    output = proc.communicate(timeout=120)[0]
    return proc.returncode, output


def args_value(args, name):
    return next(a.split("=", 1)[1] for a in args if a.startswith(f"--{name}="))


def final_weights(run_dir):
    reader = tf.train.load_checkpoint(os.path.join(run_dir, "run", "checkpoints"))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
            if not name.startswith(("_CHECKPOINTABLE_OBJECT_GRAPH", "save_counter"))}


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("uninterrupted"))
    run_to_end(flags(data_dir, run_dir))
    return run_dir


def results(run_dir):
    return json.loads(open(os.path.join(run_dir, "run", "results.json")).read())


def assert_same_run(run_dir, reference_dir):
    got, want = results(run_dir), results(reference_dir)
    assert got["global_step"] == EPOCHS * got["steps_per_epoch"] == want["global_step"]
    a, b = final_weights(run_dir), final_weights(reference_dir)
    assert a.keys() == b.keys() and len(a) > 100
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_sigkill_mid_epoch_resumes_exactly(data_dir, uninterrupted, tmp_path):
    run_dir = str(tmp_path)
    args = flags(data_dir, run_dir)
    code, _ = start_and_kill_at(args, step=3)  # epoch 1 of 2, step 3 of 7
    assert code == -signal.SIGKILL
    killed_at = latest_step(run_dir)
    assert 3 <= killed_at < EPOCHS * 7
    # The class list is there from the start: predict/export of a killed run can name classes.
    classes = json.loads(open(os.path.join(run_dir, "run", "classes.json")).read())
    assert classes["class_ids"] == ["n01440764", "n01441764", "n01442764"]
    resumed = run_to_end(args)
    assert "Resuming at epoch" in resumed.stdout
    assert_same_run(run_dir, uninterrupted)


def test_kill_during_checkpoint_write_keeps_previous(data_dir, uninterrupted, tmp_path):
    run_dir = str(tmp_path)
    args = flags(data_dir, run_dir)
    env = dict(os.environ, REPO=REPO, KILL_AT_SAVE="5")
    torn = subprocess.run([sys.executable, "-c", TORN_WRITE_RUNNER, *args], capture_output=True,
                          text=True, timeout=600, cwd=REPO, env=env)
    assert torn.returncode == -signal.SIGKILL, torn.stderr[-3000:]
    assert latest_step(run_dir) == 4  # the torn 5th save is not in the index
    resumed = run_to_end(args)
    assert "Resuming at epoch 1/2, step 4/7" in resumed.stdout
    # Keras's epoch header counts the run's epochs, also for the rest of an interrupted epoch.
    assert "Epoch 1/2" in resumed.stdout + resumed.stderr, resumed.stdout[-2000:]
    assert "Epoch 1/1" not in resumed.stdout + resumed.stderr
    assert_same_run(run_dir, uninterrupted)


def test_sigterm_saves_and_exits_cleanly_then_resumes(data_dir, uninterrupted, tmp_path):
    run_dir = str(tmp_path)
    args = flags(data_dir, run_dir, checkpoint_every_steps=5)
    code, output = start_and_kill_at(args, step=5, sig=signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, output[-3000:]  # not finished: a scheduler restarts it
    assert "Stopped by SIGTERM" in output
    resumed = run_to_end(args)
    assert "Resuming at epoch" in resumed.stdout
    assert_same_run(run_dir, uninterrupted)


def test_best_score_survives_restart(data_dir, uninterrupted):
    best = json.loads(open(os.path.join(uninterrupted, "run", "best.json")).read())
    assert 1 <= best["epoch"] <= EPOCHS and "val_top1" in best
    # A restart of a finished run changes nothing and reports the finished results.
    before = os.path.getmtime(os.path.join(uninterrupted, "run", "best.keras"))
    again = run_to_end(flags(data_dir_of(uninterrupted), uninterrupted))
    assert "already holds a finished run" in again.stdout
    assert os.path.getmtime(os.path.join(uninterrupted, "run", "best.keras")) == before


def test_results_of_a_shorter_run_do_not_mark_a_longer_one_finished(data_dir, uninterrupted,
                                                                      tmp_path):
    """--epochs raised, the extra epoch trained and checkpointed, then the final save failed (a
    full disk): results.json still holds the shorter run's. The rerun must write the final files
    again, not report the old results as this run's."""
    shutil.copytree(os.path.join(uninterrupted, "run"), tmp_path / "run")
    stale = results(str(tmp_path))
    stale.update(global_step=stale["global_step"] - stale["steps_per_epoch"], epochs=EPOCHS - 1)
    (tmp_path / "run" / "results.json").write_text(json.dumps(stale))
    os.remove(tmp_path / "run" / "latest.keras")
    again = run_to_end(flags(data_dir, str(tmp_path)))
    assert "already holds a finished run" not in again.stdout
    # Not "Resuming at epoch 3/2": every epoch is trained, only the final files are missing.
    assert "Resuming at epoch" not in again.stdout
    assert f"All {EPOCHS} epochs are trained" in again.stdout
    assert results(str(tmp_path))["global_step"] == EPOCHS * stale["steps_per_epoch"]
    assert (tmp_path / "run" / "latest.keras").exists()
    assert_same_run(str(tmp_path), uninterrupted)  # and nothing was trained twice


def test_a_resume_with_other_training_flags_says_so_and_records_it(data_dir, tmp_path):
    """It goes on (a user may mean it), but no longer as if never stopped: a warning names the
    flags, and the training set when images were added meanwhile; flag_changes.json keeps them
    with the step. Turning EMA on is refused, naming --ema."""
    run_dir = str(tmp_path)
    data_dir = shutil.copytree(data_dir, tmp_path / "data")  # images are added to this copy
    args = flags(data_dir, run_dir, epochs=1, label_smoothing=0.1)
    code, _ = start_and_kill_at(args, step=3)
    assert code == -signal.SIGKILL
    killed_at = latest_step(run_dir)
    refused = subprocess.run([sys.executable, os.path.join(REPO, "train_main.py"), *args,
                              "--ema", "--ema_every_steps=1"],
                             capture_output=True, text=True, timeout=600, cwd=REPO)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1] == (
        f"error: {os.path.join(run_dir, 'run')} was started with --ema=false: resume with "
        "--ema=false, or use another --model_dir.")
    started = json.loads(open(os.path.join(run_dir, "run", "config.json")).read())["train_data"]
    assert started["examples"] == 14
    train = next(p for p in (tmp_path / "data").rglob("train/*") if p.is_dir())
    image = next(train.iterdir())
    for i in range(2):
        shutil.copy(image, train / f"added_{i}.JPEG")
    resumed = run_to_end([*args, "--label_smoothing=0.3", "--checkpoint_every_steps=2"])
    assert ("Resuming with changed flags (--label_smoothing 0.1 -> 0.3) and training set (14 -> "
            "16 images, or other files or labels; epochs follow the new set's order, so this one "
            f"sees some images twice and some not at all): from global step {killed_at} the run "
            "differs") in resumed.stdout + resumed.stderr
    changes = json.loads(open(os.path.join(run_dir, "run", "flag_changes.json")).read())
    config = json.loads(open(os.path.join(run_dir, "run", "config.json")).read())
    assert changes == [{"global_step": killed_at,
                        "changed": {"label_smoothing": [0.1, 0.3],
                                    "train_data": [started, config["train_data"]]}}]
    assert config["train_data"]["examples"] == 16
    assert config["train_data"]["fingerprint"] != started["fingerprint"]
    assert config["label_smoothing"] == 0.3 and config["checkpoint_every_steps"] == 2


def data_dir_of(run_dir):
    return json.loads(open(os.path.join(run_dir, "run", "config.json")).read())["data_dir"]


def test_checkpoint_of_another_depth_or_batch_size_is_refused(data_dir, uninterrupted):
    run = os.path.join(uninterrupted, "run")
    before = {name: open(os.path.join(run, name)).read() for name in ("run.json", "config.json")}
    for change, message in ((dict(depth=34), "different model (depth: checkpoint 18 vs now 34)"),
                            # The schedule and data position count steps of the old batch size.
                            (dict(batch_size=2 * BATCH), "another global batch size (batch_size: "
                             f"checkpoint {BATCH} vs now {2 * BATCH})")):
        result = subprocess.run(
            [sys.executable, os.path.join(REPO, "train_main.py"),
             *flags(data_dir, uninterrupted, epochs=EPOCHS + 1, **change)],
            capture_output=True, text=True, timeout=600, cwd=REPO)
        assert result.returncode != 0
        assert message in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert before == {name: open(os.path.join(run, name)).read() for name in before}


def test_run_folder_of_another_dataset_with_as_many_classes_is_refused(
        data_dir, uninterrupted, tmp_path):
    # Same class count, other class ids: resuming (or "already finished") would export the old
    # model under the new dataset's class names.
    from tests.kaggle_tree import IMAGE_ROOT

    other = tmp_path / "other"
    train = os.path.join(data_dir, IMAGE_ROOT, "train")
    for i, wnid in enumerate(sorted(os.listdir(train))):
        for split in ("train", "val"):
            shutil.copytree(os.path.join(train, wnid), other / split / f"kind{i}")
    run = os.path.join(uninterrupted, "run")
    before = {name: open(os.path.join(run, name)).read()
              for name in ("run.json", "config.json", "classes.json")}
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "train_main.py"), *flags(str(other), uninterrupted)],
        capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode != 0
    assert ("class ids: 3 in the checkpoint vs 3 now, the first that differs is #0: checkpoint "
            "'n01440764' vs now 'kind0'") in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "already holds" not in result.stdout
    assert before == {name: open(os.path.join(run, name)).read() for name in before}
