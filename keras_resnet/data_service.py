"""Start a tf.data service: a dispatcher and/or workers that run the training input pipeline.

When the GPU hosts run out of CPU cores for JPEG decoding, run the decoding on CPU-only machines:

    # machine A: the dispatcher (and, optionally, workers in the same process)
    python -m keras_resnet.data_service --port=5050 [--workers=1]
    # machines B, C, ...: one worker each (they read the images at the same paths as training)
    python -m keras_resnet.data_service --port=5051 --dispatcher=A:5050
    # the GPU host(s)
    python train_main.py ... --tf_data_service=grpc://A:5050

Workers need TensorFlow only (the pipeline arrives as a serialized graph) and read the image files
by the paths the trainer lists, so mount the dataset at the same path. The trainer asks the
service for `distributed_epoch` processing: the epoch is split into chunks handed to the workers
as they ask for more, so each image is decoded once per epoch, by one worker.
A worker must be reachable by the trainers at the address it announces: `--worker_address`
(default: this host's name and the worker's port).
"""

import socket
import sys
import time

import tensorflow as tf
from absl import app, flags

GRPC = "grpc://"


def strip_protocol(address):
    """"grpc://host:port" -> "host:port" (what WorkerConfig's dispatcher_address expects)."""
    return address[len(GRPC):] if address.startswith(GRPC) else address


def start_dispatcher(port=0, work_dir=None):
    """A running DispatchServer on `port` (0: any free port); its address is `.target`.

    With `work_dir` (a shared path) the dispatcher journals its state there and a restarted
    dispatcher resumes the running jobs (fault-tolerant mode).
    """
    config = tf.data.experimental.service.DispatcherConfig(
        port=port, work_dir=work_dir, fault_tolerant_mode=bool(work_dir))
    return tf.data.experimental.service.DispatchServer(config)


def start_worker(dispatcher, port=0, worker_address=None):
    """A running WorkerServer that registers with `dispatcher` ("host:port" or "grpc://...").

    `worker_address` is the address the dispatcher gives to trainers; "%port%" in it becomes
    the worker's port. Default: "<this host's name>:%port%".
    """
    config = tf.data.experimental.service.WorkerConfig(
        dispatcher_address=strip_protocol(dispatcher), port=port,
        worker_address=worker_address or f"{socket.gethostname()}:%port%")
    return tf.data.experimental.service.WorkerServer(config)


FLAGS = flags.FLAGS
flags.DEFINE_integer("port", 0, "Port to listen on (0: any free port, printed at start).")
flags.DEFINE_string("dispatcher", "", "HOST:PORT of a dispatcher: start a worker for it. "
                    "Without it, start a dispatcher.")
flags.DEFINE_integer("workers", 0, "With a dispatcher: also start this many workers in the same "
                     "process (handy on one machine).")
flags.DEFINE_string("worker_address", "", "Address trainers use to reach this worker, e.g. "
                    "host.example.com:%port% (default: this host's name).")
flags.DEFINE_string("work_dir", "", "Dispatcher journal directory: enables fault-tolerant mode.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}.")
    servers = []
    if FLAGS.dispatcher:
        if FLAGS.workers:
            raise app.UsageError("--workers starts workers beside a dispatcher; with "
                                 "--dispatcher this process already is one worker.")
        servers.append(start_worker(FLAGS.dispatcher, FLAGS.port, FLAGS.worker_address or None))
        print(f"tf.data service worker on port {servers[0]._address.rpartition(':')[2]}, "
              f"registered with {strip_protocol(FLAGS.dispatcher)}", flush=True)
    else:
        dispatcher = start_dispatcher(FLAGS.port, FLAGS.work_dir or None)
        servers.append(dispatcher)
        target = dispatcher.target
        for _ in range(FLAGS.workers):
            servers.append(start_worker(target, worker_address=FLAGS.worker_address or None))
        host = socket.gethostname()
        print(f"tf.data service dispatcher at {target} ({FLAGS.workers} local worker(s)); "
              f"train with --tf_data_service=grpc://{host}:{target.rpartition(':')[2]}",
              flush=True)
    try:
        while True:  # sleep, not join(): Ctrl-C / SIGTERM must still end the process
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(app.run(main))
