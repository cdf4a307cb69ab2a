"""tf.data service: a dispatcher and a worker on localhost serve the training input."""

import os
import socket
import subprocess
import sys

import pytest

from keras_resnet.training.config import Config
from tests.kaggle_tree import make_kaggle_tree

pytestmark = pytest.mark.slow  # end-to-end runs in subprocesses

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_short_run_reads_its_input_from_the_service(tmp_path):
    from keras_resnet import data_service
    from keras_resnet.training.run import train_and_evaluate

    make_kaggle_tree(tmp_path / "imagenet", num_classes=3, train_per_class=4, val_per_class=2,
                     image_size=40)
    dispatcher = data_service.start_dispatcher()
    worker = data_service.start_worker(dispatcher.target, worker_address="localhost:%port%")
    try:
        config = Config(dataset="imagenet", data_dir=str(tmp_path / "imagenet"), depth=18,
                        image_size=32, batch_size=4, epochs=1, steps_per_epoch=2,
                        validation_steps=1, mixed_precision="float32", export=False,
                        distribution="one_device", verbose="2",
                        model_dir=str(tmp_path / "run"), export_dir=str(tmp_path / "export"),
                        tf_data_service=dispatcher.target)
        assert config.tf_data_service.startswith("grpc://localhost:")
        results = train_and_evaluate(config)
        assert results["global_step"] == 2 and results["steps_per_epoch"] == 2
        # The pipeline ran on the service worker (a task per job), not only in this process.
        assert worker._num_tasks() >= 1
    finally:
        worker._stop()
        dispatcher._stop()


def test_command_starts_a_dispatcher_and_a_worker(tmp_path):
    import tensorflow as tf

    port = free_port()
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=REPO)
    command = [sys.executable, "-m", "keras_resnet.data_service"]
    procs = [
        subprocess.Popen(command + [f"--port={port}"], env=env, cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
        subprocess.Popen(command + ["--port=0", f"--dispatcher=localhost:{port}",
                                    "--worker_address=localhost:%port%"],
                         env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True),
    ]
    try:
        ready = [p.stdout.readline() for p in procs]  # each prints one line once serving
        assert "dispatcher at grpc://localhost:" in ready[0], ready
        assert f"registered with localhost:{port}" in ready[1], ready
        ds = tf.data.Dataset.range(6).apply(tf.data.experimental.service.distribute(
            processing_mode="distributed_epoch", service=f"grpc://localhost:{port}"))
        assert sorted(int(x) for x in ds) == list(range(6))
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)
