"""MultiWorkerMirroredStrategy for Keras 3 `model.fit`: a bounded wait for peers, and a fix.

`make_strategy()` builds the strategy from TF_CONFIG and makes `model.fit` / `evaluate` work with
it. Keras 3.15 fails out of the box (keras-team/keras#20585, tensorflow/tensorflow#72388), in two
places of `keras/src/backend/tensorflow/trainer.py`, both reproduced with two processes on
localhost:

1. `TensorFlowTrainer._maybe_symbolic_build` takes one distributed batch to build the metrics
   and optimizer, and turns it into plain tensors with `strategy.reduce("MEAN", (x, y), axis=None)`.
   The collective strategy's `reduce` accepts one `PerReplica` value, not a tuple of them
   ("Attempt to convert a value (PerReplica ...) to a Tensor"); and averaging a data batch across
   workers is a pointless all-reduce anyway: only its shapes and dtypes matter here.
   Fix: take this worker's first replica's batch (`experimental_local_results(v)[0]`), with no
   communication. It has the per-replica shape, as the mean would.
2. `reduce_per_replica(..., reduction="mean")`, which turns the per-replica outputs of
   `train_step` / `test_step` (loss and metric results, scalars) into logs, calls
   `strategy.reduce("MEAN", v, axis=0)` under the collective strategy. `axis=0` asks to reduce
   the tensor's own first axis (an error on a scalar); the single-worker branch's
   `tf.reduce_mean(local_results, axis=0)` means the *replica* axis. Its multi-worker equivalent
   is `strategy.reduce("MEAN", v, axis=None)`: the mean across all replicas of all workers.
   Metric variables are sync-on-read, so each replica's result is its local value; after this
   all-reduce every worker logs the same numbers (callbacks then decide alike on every worker).

Both replacements run only for a MultiWorkerMirroredStrategy in multi-worker mode; everything
else goes to the original Keras code. `tests/test_multi_worker.py::test_keras_still_needs_patch`
runs a 2-worker `fit` without the patch and fails once Keras works unpatched: then delete
`patch_keras` and its call.

Peers: MultiWorkerMirroredStrategy() blocks until every task in TF_CONFIG has joined, with no
deadline (a missing peer hangs it forever, and TensorFlow ignores SIGTERM meanwhile). A watchdog
thread waits `peer_timeout_secs`; if the cluster has not formed by then it probes every peer's
address over TCP and ends the process with one line naming the addresses that do not answer.
"""

import json
import os
import socket
import sys
import threading

import tensorflow as tf
from absl import logging

PEER_TIMEOUT_SECS = 300.0  # workers of one job may start minutes apart (scheduling, image pulls)
PROBE_TIMEOUT_SECS = 2.0
EXIT_CODE = 2  # as train_main's user errors

_patched = False


def cluster_tasks(tf_config=None):
    """[(task name, "host:port")] of every chief/worker task in TF_CONFIG, and this task's name."""
    config = json.loads(tf_config if tf_config is not None else os.environ.get("TF_CONFIG") or "{}")
    cluster, task = config.get("cluster", {}), config.get("task", {})
    tasks = [(f"{job} {i}", address) for job in ("chief", "worker")
             for i, address in enumerate(cluster.get(job, []))]
    return tasks, f"{task.get('type')} {task.get('index', 0)}"


def _split_address(address):
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def unreachable_peers(tasks, me, timeout=PROBE_TIMEOUT_SECS):
    """The (name, address) of peers that refuse or drop a TCP connection within `timeout` s."""
    bad = []
    for name, address in tasks:
        if name == me:
            continue
        try:
            socket.create_connection(_split_address(address), timeout=timeout).close()
        except (OSError, ValueError):
            bad.append((name, address))
    return bad


def _peer_error(tasks, me, timeout):
    bad = unreachable_peers(tasks, me)
    if bad:
        names = ", ".join(f"{name} at {address}" for name, address in bad)
        return (f"multi-worker ({me}): could not reach {names} within {timeout:g} s. Start every "
                f"task listed in TF_CONFIG and check the host names, ports and firewall.")
    peers = ", ".join(address for name, address in tasks if name != me)
    return (f"multi-worker ({me}): peers {peers} accept connections but the cluster did not form "
            f"within {timeout:g} s; check that every task runs with the same TF_CONFIG cluster.")


class _Watchdog:
    """Ends the process with a one-line error if the `with` body outlasts `timeout` seconds.

    The body is blocked inside TensorFlow's C++ runtime, which neither raises nor lets a signal
    handler run, so exiting the process is the only bounded way out.
    """

    def __init__(self, timeout, tasks, me):
        self.timeout, self.tasks, self.me = timeout, tasks, me
        self._done = threading.Event()

    def _watch(self):
        if self._done.wait(self.timeout):
            return
        message = _peer_error(self.tasks, self.me, self.timeout)
        logging.error("%s", message)
        print(f"error: {message}", file=sys.stderr, flush=True)
        os._exit(EXIT_CODE)

    def __enter__(self):
        threading.Thread(target=self._watch, name="peer-watchdog", daemon=True).start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        return False


def make_strategy(peer_timeout_secs=PEER_TIMEOUT_SECS):
    """MultiWorkerMirroredStrategy from TF_CONFIG, patched Keras, peers awaited with a deadline.

    Call before any other TensorFlow op runs (the strategy starts this process's gRPC server).
    """
    tasks, me = cluster_tasks()
    if len(tasks) < 1:
        raise ValueError("--distribution=multi_worker needs TF_CONFIG naming the cluster, e.g. "
                         '{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
                         '"task": {"type": "worker", "index": 0}}.')
    patch_keras()
    logging.info("Waiting up to %g s for the cluster %s (this task: %s).", peer_timeout_secs,
                 [address for _, address in tasks], me)
    with _Watchdog(peer_timeout_secs, tasks, me):
        return tf.distribute.MultiWorkerMirroredStrategy()


def in_multi_worker_mode(strategy):
    """True for a MultiWorkerMirroredStrategy whose cluster has more than one task."""
    return (isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
            and strategy.extended._in_multi_worker_mode())


def patch_keras():
    """Applies the two fixes above to Keras's TensorFlow trainer (once per process)."""
    global _patched
    if _patched:
        return
    from keras.src.backend.tensorflow import trainer as tf_trainer
    from keras.src.utils import tree

    original_build = tf_trainer.TensorFlowTrainer._maybe_symbolic_build
    original_reduce = tf_trainer.reduce_per_replica

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        strategy = self._distribute_strategy
        if iterator is not None and strategy is not None and in_multi_worker_mode(strategy):
            for _, _, it in iterator:  # the loop of the original: one batch, then stop
                data_batch = tree.map_structure(
                    lambda v: (strategy.experimental_local_results(v)[0]
                               if isinstance(v, tf.distribute.DistributedValues) else v),
                    next(it))
                break
            iterator = None
        return original_build(self, iterator=iterator, data_batch=data_batch)

    def reduce_per_replica(values, strategy, reduction):
        if reduction in ("mean", "auto") and in_multi_worker_mode(strategy):
            return tree.map_structure(lambda v: strategy.reduce("MEAN", v, axis=None), values)
        return original_reduce(values, strategy, reduction)

    tf_trainer.TensorFlowTrainer._maybe_symbolic_build = _maybe_symbolic_build
    # Called by its global name from the train/test functions built in the trainer module.
    tf_trainer.reduce_per_replica = reduce_per_replica
    _patched = True
