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
runs a 2-worker `fit` unpatched, then with fix 1 only, and fails once a stage works without its
fix: then delete that `patch_*` function.

Peers: MultiWorkerMirroredStrategy() waits for every task in TF_CONFIG with no deadline: a
missing peer hangs it forever, holding the GIL (so no Python thread can time it out), and
TensorFlow ignores SIGTERM meanwhile. `make_strategy` configures TensorFlow's coordination
service itself, as the strategy would, plus a registration deadline that applies to every task;
when it passes, it probes each peer's address over TCP and raises `ClusterError` with
one line naming the addresses that do not answer.
"""

import json
import os
import socket

import tensorflow as tf
from absl import logging


class ClusterError(RuntimeError):
    """The multi-worker cluster in TF_CONFIG did not form (a peer is unreachable or late)."""


PEER_TIMEOUT_SECS = 300.0  # workers of one job may start minutes apart (scheduling, image pulls)
PROBE_TIMEOUT_SECS = 2.0


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


def peer_error(tasks, me, timeout):
    """One line for a cluster that did not form: the unreachable peers, or what else to check."""
    bad = unreachable_peers(tasks, me)
    if bad:
        names = ", ".join(f"{name} at {address}" for name, address in bad)
        return (f"multi-worker ({me}): could not reach {names} within {timeout:g} s. Start every "
                f"task listed in TF_CONFIG and check the host names, ports and firewall.")
    peers = ", ".join(address for name, address in tasks if name != me)
    return (f"multi-worker ({me}): peers {peers} accept connections but the cluster did not form "
            f"within {timeout:g} s; check that every task runs with the same TF_CONFIG cluster.")


def _configure_coordination(timeout_secs):
    """Sets up the coordination service as MultiWorkerMirroredStrategy would, plus a deadline.

    The strategy configures the service only when none is configured yet, and without a
    registration deadline. `cluster_register_with_barrier` (a field `configure_coordination_service`
    does not expose) makes the deadline apply to every task: without it task 0, which hosts the
    service, waits for missing peers forever.
    """
    from tensorflow.compiler.xla.tsl.protobuf import coordination_config_pb2
    from tensorflow.python.distribute import multi_worker_util
    from tensorflow.python.eager import context

    cluster_spec = tf.distribute.cluster_resolver.TFConfigClusterResolver().cluster_spec()
    jobs = [coordination_config_pb2.CoordinatedJob(name=job, num_tasks=cluster_spec.num_tasks(job))
            for job in ("chief", "worker") if job in cluster_spec.jobs]
    ctx = context.context()
    ctx.configure_coordination_service(
        service_type="standalone",
        service_leader=multi_worker_util.coordination_leader(cluster_spec),
        coordinated_jobs=jobs,
        cluster_register_timeout_in_ms=int(timeout_secs * 1000))
    config = getattr(ctx, "_coordination_service_config", None)
    if config is not None and hasattr(config, "cluster_register_with_barrier"):
        config.cluster_register_with_barrier = True
    else:
        logging.warning("This TensorFlow has no cluster_register_with_barrier: task 0 may wait "
                        "for missing peers without a deadline.")


def make_strategy(peer_timeout_secs=PEER_TIMEOUT_SECS):
    """MultiWorkerMirroredStrategy from TF_CONFIG, with Keras patched and a deadline for peers.

    Call before any other TensorFlow op runs (the strategy starts this process's gRPC server).
    Without TF_CONFIG this is a one-worker strategy over the local devices. Raises
    `ClusterError`, naming the peers it cannot reach, when the cluster has not formed
    within `peer_timeout_secs` (counted from this task's start).
    """

    patch_keras()
    tasks, me = cluster_tasks()
    if len(tasks) < 2:
        return tf.distribute.MultiWorkerMirroredStrategy()
    logging.info("Waiting up to %g s for the cluster %s (this task: %s).", peer_timeout_secs,
                 [address for _, address in tasks], me)
    _configure_coordination(peer_timeout_secs)
    try:
        return tf.distribute.MultiWorkerMirroredStrategy()
    except (tf.errors.DeadlineExceededError, tf.errors.UnavailableError) as e:
        logging.info("The cluster did not form: %s", e)
        raise ClusterError(peer_error(tasks, me, peer_timeout_secs)) from None


def in_multi_worker_mode(strategy):
    """True for a MultiWorkerMirroredStrategy whose cluster has more than one task."""
    return (isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
            and strategy.extended._in_multi_worker_mode())


# The private Keras functions the fixes replace, with the parameters they must have. Checked
# before patching: a Keras release that renames or reshapes them fails at start-up, in one line,
# instead of training with a fix that no longer applies.
PATCHED = {
    "TensorFlowTrainer._maybe_symbolic_build": ("self", "iterator", "data_batch"),
    "reduce_per_replica": ("values", "strategy", "reduction"),
}
TESTED_KERAS = "3.15"


class UnsupportedKeras(RuntimeError):
    """The installed Keras does not have the internals the multi-worker fixes patch."""


def check_keras_internals():
    """Raises UnsupportedKeras, naming the Keras version, unless every function in PATCHED
    exists in keras.src.backend.tensorflow.trainer with the expected parameters."""
    import inspect

    import keras

    try:
        from keras.src.backend.tensorflow import trainer as tf_trainer
    except ImportError:
        tf_trainer = None
    for name, expected in PATCHED.items():
        target = tf_trainer
        for part in name.split("."):
            target = getattr(target, part, None)
        try:
            found = tuple(inspect.signature(target).parameters) if target else None
        except (TypeError, ValueError):
            found = None
        if found != expected:
            raise UnsupportedKeras(
                f"Keras {keras.__version__}: keras.src.backend.tensorflow.trainer.{name} is "
                f"{'missing' if target is None else f'{name}{found}'}, not {name}{expected} "
                f"as the multi-worker fix expects (tested with Keras {TESTED_KERAS}); install "
                f"keras=={TESTED_KERAS}.* for multi-worker training.")


def patch_keras():
    """Applies both fixes above to Keras's TensorFlow trainer (once per process), after
    checking that the functions they replace still look as expected."""
    check_keras_internals()
    patch_symbolic_build()
    patch_reduce_per_replica()


def patch_symbolic_build():
    """Fix 1: build metrics and optimizer from this worker's own batch, with no all-reduce."""
    from keras.src import tree
    from keras.src.backend.tensorflow import trainer as tf_trainer

    original = tf_trainer.TensorFlowTrainer._maybe_symbolic_build
    if getattr(original, "_keras_resnet_patch", False):
        return

    def local_value(strategy, v):
        if isinstance(v, tf.distribute.DistributedValues):
            return strategy.experimental_local_results(v)[0]
        return v

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        strategy = self._distribute_strategy
        if iterator is not None and strategy is not None and in_multi_worker_mode(strategy):
            for _, _, it in iterator:  # as the original: the first batch, then stop
                data_batch = tree.map_structure(lambda v: local_value(strategy, v), next(it))
                break
            iterator = None
        return original(self, iterator=iterator, data_batch=data_batch)

    _maybe_symbolic_build._keras_resnet_patch = True
    tf_trainer.TensorFlowTrainer._maybe_symbolic_build = _maybe_symbolic_build


def patch_reduce_per_replica():
    """Fix 2: the "mean" of step outputs is a mean across replicas (axis=None), not along axis 0."""
    from keras.src import tree
    from keras.src.backend.tensorflow import trainer as tf_trainer

    original = tf_trainer.reduce_per_replica
    if getattr(original, "_keras_resnet_patch", False):
        return

    def reduce_per_replica(values, strategy, reduction):
        if reduction in ("mean", "auto") and in_multi_worker_mode(strategy):
            return tree.map_structure(lambda v: strategy.reduce("MEAN", v, axis=None), values)
        return original(values, strategy, reduction)

    reduce_per_replica._keras_resnet_patch = True
    # The trainer's step functions look this name up in the module at trace time.
    tf_trainer.reduce_per_replica = reduce_per_replica
