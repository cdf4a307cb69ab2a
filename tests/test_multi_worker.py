"""Multi-worker training: two CPU worker processes on localhost, each with its own TF_CONFIG.

Workers are plain subprocesses (about 4 s each to start TensorFlow on 2 cores); every test
passes steps_per_epoch so nothing waits on a full epoch.
"""

import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from pipelines.sources import INDEX_FILE
from tests.kaggle_tree import make_kaggle_tree

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FINGERPRINT = re.compile(r"weights fingerprint: ([0-9a-f]{16})")


def free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def tf_config(ports, index):
    return json.dumps({"cluster": {"worker": [f"localhost:{p}" for p in ports]},
                       "task": {"type": "worker", "index": index}})


def worker_env(ports, index, tmpdir):
    env = dict(os.environ, TF_CONFIG=tf_config(ports, index), CUDA_VISIBLE_DEVICES="",
               TF_CPP_MIN_LOG_LEVEL="2", TMPDIR=str(tmpdir), PYTHONPATH=REPO)
    os.makedirs(tmpdir, exist_ok=True)
    return env


def run_workers(commands, envs, timeout):
    """Starts one process per command, waits for all; returns [(returncode, stdout, stderr)]."""
    procs = [subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for cmd, env in zip(commands, envs, strict=True)]
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outs, strict=True)]


def files_under(root):
    return sorted(os.path.relpath(os.path.join(d, f), root)
                  for d, _, files in os.walk(root) for f in files)


@pytest.mark.slow
def test_two_workers_train_main_chief_writes_everything(tmp_path):
    """train_main.py on two workers: both exit 0 with equal weights; only the chief writes.

    Each worker gets its own --model_dir / --export_dir, so whatever a worker writes is
    attributable: the non-chief's directories must not even be created.
    """
    data_dir = tmp_path / "imagenet"
    make_kaggle_tree(data_dir, num_classes=3, train_per_class=4, val_per_class=2, image_size=40)
    data_files = files_under(data_dir)  # no index yet: both workers build one, the chief saves it
    ports = free_ports(2)
    commands, envs = [], []
    for i in range(2):
        commands.append([
            sys.executable, "train_main.py", "--dataset=imagenet", f"--data_dir={data_dir}",
            "--distribution=auto", "--depth=18", "--image_size=32", "--batch_size=4",
            "--epochs=1", "--steps_per_epoch=2", "--validation_steps=1",
            "--mixed_precision=float32", "--checkpoint_every_steps=1", "--verbose=2",
            f"--model_dir={tmp_path / f'run{i}'}", f"--export_dir={tmp_path / f'export{i}'}"])
        envs.append(worker_env(ports, i, tmp_path / f"tmp{i}"))
    (rc0, out0, err0), (rc1, out1, err1) = run_workers(commands, envs, timeout=240)
    assert rc0 == 0 and rc1 == 0, f"chief:\n{err0[-3000:]}\nworker 1:\n{err1[-3000:]}"

    # Same weights on both workers at the end (BN statistics included).
    prints = FINGERPRINT.findall(err0), FINGERPRINT.findall(err1)
    assert len(prints[0]) == 1 and prints[0] == prints[1], prints

    results = json.loads((tmp_path / "run0" / "results.json").read_text())
    assert results["global_step"] == 2 and results["replicas"] == 2
    exports = [f for f in files_under(tmp_path / "export0") if f.endswith("saved_model.pb")]
    assert len(exports) == 1, exports
    assert "checkpoints/checkpoint" in files_under(tmp_path / "run0")
    # The non-chief wrote nothing: no directory of its own, nothing new in the data directory.
    assert not (tmp_path / "run1").exists() and not (tmp_path / "export1").exists()
    # Only the index is new there (the chief's; non-chief workers never write one: see
    # test_sources.py::test_index_is_not_written_when_asked_not_to).
    assert files_under(data_dir) == sorted(data_files + [INDEX_FILE]), files_under(data_dir)
    assert "Distribution: multi_worker with 2 replica(s)" in err0


UPSTREAM_CHECK = textwrap.dedent("""
    import sys
    import keras, numpy as np, tensorflow as tf
    from keras_resnet.training import multi_worker

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    with strategy.scope():
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        model.compile("sgd", "mse", metrics=["mae"])
    data = strategy.distribute_datasets_from_function(lambda ctx: tf.data.Dataset.from_tensors(
        (np.ones((2, 4), "float32"), np.ones((2, 2), "float32"))).repeat())

    def fit(stage):
        try:
            model.fit(data, epochs=1, steps_per_epoch=1, verbose=0)
            print(stage, "ok", flush=True)
        except Exception as e:
            print(stage, "fails:", type(e).__name__, str(e).splitlines()[0][:200], flush=True)

    fit("unpatched")
    multi_worker.patch_symbolic_build()
    fit("symbolic_build_patched")
    multi_worker.patch_reduce_per_replica()
    fit("both_patched")
""")


@pytest.mark.slow
def test_keras_still_needs_patch(tmp_path):
    """Tells us when upstream fixes keras-team/keras#20585 / tensorflow/tensorflow#72388.

    Two workers run `fit` unpatched, with fix 1 only, then with both fixes. If an unpatched stage
    starts to work, delete the corresponding patch in keras_resnet/multi_worker.py.
    """
    ports = free_ports(2)
    results = run_workers([[sys.executable, "-c", UPSTREAM_CHECK]] * 2,
                          [worker_env(ports, i, tmp_path / f"tmp{i}") for i in range(2)],
                          timeout=120)
    for rc, out, err in results:
        assert rc == 0, err[-3000:]
        lines = dict(line.split(" ", 1) for line in out.splitlines() if " " in line)
        assert lines.get("both_patched") == "ok", out
        assert lines["unpatched"].startswith("fails"), (
            "Keras now builds under MultiWorkerMirroredStrategy without help: remove "
            f"multi_worker.patch_symbolic_build. Output:\n{out}")
        assert "PerReplica" in lines["unpatched"], out
        assert lines["symbolic_build_patched"].startswith("fails"), (
            "Keras now reduces step outputs across workers correctly: remove "
            f"multi_worker.patch_reduce_per_replica. Output:\n{out}")


@pytest.mark.slow
def test_missing_peer_fails_fast_naming_its_address(tmp_path):
    """A worker whose peer never starts gets a one-line error naming it, in bounded time.

    Worker 1 waits for worker 0 (which hosts the coordination service), and worker 0 for
    worker 1: TensorFlow alone would wait forever in both cases.
    """
    script = textwrap.dedent("""
        import sys
        from keras_resnet.training import distribute, multi_worker
        try:
            multi_worker.make_strategy(peer_timeout_secs=3)
        except distribute.ClusterError as e:
            print(e)
            sys.exit(2)
        print("formed a cluster without its peer")
    """)
    for index in (1, 0):
        ports = free_ports(2)
        start = time.monotonic()
        [(rc, out, err)] = run_workers([[sys.executable, "-c", script]],
                                       [worker_env(ports, index, tmp_path / "tmp")], timeout=60)
        assert rc == 2, (rc, out, err[-2000:])
        assert time.monotonic() - start < 40
        other = 1 - index
        assert (f"multi-worker (worker {index}): could not reach worker {other} at "
                f"localhost:{ports[other]} within 3 s") in out, out


def test_cluster_tasks_and_probe():
    from keras_resnet.training import multi_worker

    config = json.dumps({"cluster": {"chief": ["a:1"], "worker": ["b:2", "[::1]:3"]},
                         "task": {"type": "worker", "index": 1}})
    tasks, me = multi_worker.cluster_tasks(config)
    assert tasks == [("chief 0", "a:1"), ("worker 0", "b:2"), ("worker 1", "[::1]:3")]
    assert me == "worker 1"
    listener = socket.socket()
    listener.bind(("localhost", 0))
    listener.listen()
    open_port, closed_port = listener.getsockname()[1], free_ports(1)[0]
    try:
        tasks = [("worker 0", f"localhost:{open_port}"), ("worker 1", f"localhost:{closed_port}"),
                 ("worker 2", "localhost:1")]
        assert multi_worker.unreachable_peers(tasks, "worker 2", timeout=2) == [
            ("worker 1", f"localhost:{closed_port}")]
    finally:
        listener.close()


@pytest.mark.slow
def test_two_workers_resume_from_the_chiefs_checkpoint(tmp_path):
    """A finished 1-epoch run on a shared model_dir, extended to 2 epochs: both workers restore
    the chief's checkpoint (the non-chief has none of its own) and end with equal weights."""
    data_dir = tmp_path / "imagenet"
    make_kaggle_tree(data_dir, num_classes=3, train_per_class=4, val_per_class=2, image_size=40)
    from pipelines import sources

    sources.load_source("imagenet", str(data_dir))

    def run(epochs):
        ports = free_ports(2)
        command = [sys.executable, "train_main.py", "--dataset=imagenet", f"--data_dir={data_dir}",
                   "--depth=18", "--image_size=32", "--batch_size=4", f"--epochs={epochs}",
                   "--steps_per_epoch=2", "--validation_steps=1", "--mixed_precision=float32",
                   "--verbose=2", "--export=false", f"--model_dir={tmp_path / 'run'}"]
        outs = run_workers([command, command],
                           [worker_env(ports, i, tmp_path / f"tmp{epochs}{i}") for i in range(2)],
                           timeout=240)
        for rc, _out, err in outs:
            assert rc == 0, err[-3000:]
        return outs

    run(1)
    (_, out0, err0), (_, out1, err1) = run(2)
    assert "Resuming at epoch 2/2, step 0/2" in out0 and "Resuming at epoch 2/2, step 0/2" in out1
    prints = FINGERPRINT.findall(err0), FINGERPRINT.findall(err1)
    assert len(prints[0]) == 1 and prints[0] == prints[1], prints
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["global_step"] == 4


@pytest.mark.slow
def test_sigterm_to_one_worker_stops_all_at_the_same_step_then_resumes(tmp_path):
    """Preemption reaches workers one at a time: a SIGTERM to the non-chief alone must make both
    workers save and exit cleanly at the same step; rerunning both finishes the run exactly."""
    import signal

    import tensorflow as tf

    data_dir = tmp_path / "imagenet"
    make_kaggle_tree(data_dir, num_classes=3, train_per_class=12, val_per_class=2, image_size=40)
    from pipelines import sources

    sources.load_source("imagenet", str(data_dir))
    run_dir = tmp_path / "run"

    def command():
        return [sys.executable, "train_main.py", "--dataset=imagenet", f"--data_dir={data_dir}",
                "--depth=18", "--image_size=32", "--batch_size=4", "--epochs=2",
                "--steps_per_epoch=8", "--validation_steps=1", "--mixed_precision=float32",
                "--verbose=2", "--export=false", "--checkpoint_every_steps=2",
                f"--model_dir={run_dir}"]

    ports = free_ports(2)
    envs = [worker_env(ports, i, tmp_path / f"tmp{i}") for i in range(2)]
    procs = [subprocess.Popen(command(), env=env, cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for env in envs]
    try:
        deadline = time.monotonic() + 240
        while not (tf.train.latest_checkpoint(str(run_dir / "checkpoints")) or "").endswith("-2"):
            assert all(p.poll() is None for p in procs), "a worker ended early"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        procs[1].send_signal(signal.SIGTERM)
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [143, 143], outs[0][1][-3000:] + outs[1][1][-3000:]
    assert "Stopped by a peer's stop" in outs[0][1] and "Stopped by SIGTERM" in outs[1][1]
    stopped_at = tf.train.latest_checkpoint(str(run_dir / "checkpoints"))
    assert int(stopped_at.rsplit("-", 1)[1]) < 16

    ports = free_ports(2)
    results = run_workers([command(), command()],
                          [worker_env(ports, i, tmp_path / f"again{i}") for i in range(2)],
                          timeout=240)
    for rc, out, err in results:
        assert rc == 0, err[-3000:]
        assert "Resuming at epoch" in out
    prints = [FINGERPRINT.findall(err) for _, _, err in results]  # one per fit call
    assert prints[0] and prints[0] == prints[1], prints
    assert json.loads((run_dir / "results.json").read_text())["global_step"] == 16


def test_keras_internals_check_passes_here_and_names_the_version_when_they_change(monkeypatch):
    import keras
    from keras.src.backend.tensorflow import trainer as tf_trainer

    from keras_resnet.training import multi_worker

    multi_worker.check_keras_internals()  # the installed Keras has the shape the fixes expect

    monkeypatch.setattr(tf_trainer, "reduce_per_replica", lambda values, strategy: values)
    with pytest.raises(multi_worker.UnsupportedKeras) as error:
        multi_worker.check_keras_internals()
    message = str(error.value)
    assert f"Keras {keras.__version__}" in message and "reduce_per_replica" in message
    assert "\n" not in message

    monkeypatch.delattr(tf_trainer.TensorFlowTrainer, "_maybe_symbolic_build")
    with pytest.raises(multi_worker.UnsupportedKeras, match="_maybe_symbolic_build is missing"):
        multi_worker.check_keras_internals()
