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

from absl import flags

from keras_resnet import cli, logs

GRPC = "grpc://"


def strip_protocol(address):
    """"grpc://host:port" -> "host:port" (what WorkerConfig's dispatcher_address expects)."""
    return address[len(GRPC):] if address.startswith(GRPC) else address


def start_dispatcher(port=0, work_dir=None):
    """A running DispatchServer on `port` (0: any free port); its address is `.target`.

    With `work_dir` (a shared path) the dispatcher journals its state there and a restarted
    dispatcher resumes the running jobs (fault-tolerant mode).
    """
    tf = logs.import_tensorflow()
    config = tf.data.experimental.service.DispatcherConfig(
        port=port, work_dir=work_dir, fault_tolerant_mode=bool(work_dir))
    return tf.data.experimental.service.DispatchServer(config)


def start_worker(dispatcher, port=0, worker_address=None):
    """A running WorkerServer that registers with `dispatcher` ("host:port" or "grpc://...").

    `worker_address` is the address the dispatcher gives to trainers; "%port%" in it becomes
    the worker's port. Default: "<this host's name>:%port%".
    """
    tf = logs.import_tensorflow()
    config = tf.data.experimental.service.WorkerConfig(
        dispatcher_address=strip_protocol(dispatcher), port=port,
        worker_address=worker_address or f"{socket.gethostname()}:%port%")
    return tf.data.experimental.service.WorkerServer(config)


def define_flags(values):
    flags.DEFINE_integer("port", 0, "Port to listen on (0: any free port, printed at start).",
                         flag_values=values)
    flags.DEFINE_string("dispatcher", "", "HOST:PORT of a dispatcher: start a worker for it. "
                        "Without it, start a dispatcher.", flag_values=values)
    flags.DEFINE_integer("workers", 0, "With a dispatcher: also start this many workers in the "
                         "same process (handy on one machine).", flag_values=values)
    flags.DEFINE_string("worker_address", "", "Address trainers use to reach this worker, e.g. "
                        "host.example.com:%port% (default: this host's name).", flag_values=values)
    flags.DEFINE_string("work_dir", "", "Dispatcher journal directory: enables fault-tolerant "
                        "mode.", flag_values=values)


def main(opts, args):
    servers = []
    if opts.dispatcher:
        if opts.workers:
            raise cli.UsageError("--workers starts workers beside a dispatcher; with "
                                 "--dispatcher this process already is one worker.")
        servers.append(start_worker(opts.dispatcher, opts.port, opts.worker_address or None))
        print(f"tf.data service worker on port {servers[0]._address.rpartition(':')[2]}, "
              f"registered with {strip_protocol(opts.dispatcher)}", flush=True)
    else:
        dispatcher = start_dispatcher(opts.port, opts.work_dir or None)
        servers.append(dispatcher)
        target = dispatcher.target
        for _ in range(opts.workers):
            servers.append(start_worker(target, worker_address=opts.worker_address or None))
        host = socket.gethostname()
        print(f"tf.data service dispatcher at {target} ({opts.workers} local worker(s)); "
              f"train with --tf_data_service=grpc://{host}:{target.rpartition(':')[2]}",
              flush=True)
    try:
        while True:  # sleep, not join(): Ctrl-C / SIGTERM must still end the process
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0


def run(argv=None):
    """The command with `argv` (without the program name; default: sys.argv); exit status."""
    return cli.run(define_flags, main, argv, prog="keras_resnet.data_service", doc=__doc__)


if __name__ == "__main__":
    sys.exit(run())
