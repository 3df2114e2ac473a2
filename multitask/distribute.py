"""tf.distribute strategies, each process's role in a multi-worker cluster, and what the workers share.

``--strategy multiworker`` runs one process per machine (``TF_CONFIG`` names the cluster and this process's place
in it); every process runs the same training, with each step's gradients averaged across workers by all-reduce.
Only the chief writes the run folder: the others keep their state (checkpoints, their share of the feature cache)
in a temporary folder that is removed at the end, and stop after the last training step, leaving calibration, the
OOD detector and the saved model to the chief (none of these needs the other workers).

Keras 3 (3.15 with TensorFlow 2.21 here) cannot ``fit`` under ``MultiWorkerMirroredStrategy`` as shipped; the
TensorFlow tutorial fails the same way (keras-team/keras#20585, tensorflow/tensorflow#72388, keras-team/keras#20329).
Two bugs, both worked around in :class:`multitask.weighting.MultiTaskTrainer`, the only model we ``fit``:

1. ``fit`` and ``evaluate`` first reduce a whole batch (a tuple of ``PerReplica``) with ``strategy.reduce`` just
   to learn its shapes; the collective strategy reduces one value, not a structure, and fails with
   "Attempt to convert a value (PerReplica ...) with an unsupported type ... to a Tensor". The workaround builds
   from this worker's own first batch (:func:`first_local_batch`).
2. Every step's logs are then reduced with ``strategy.reduce("MEAN", value, axis=0)``, which fails for a scalar
   metric ("Invalid reduction dimension 0 for input with 0 dimensions"). The workaround hands the metrics over
   with one axis of length 1 (:func:`metrics_for_reduction`), so they come back as the mean over the workers.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

from multitask.errors import ConfigError
from multitask.settings import STRATEGIES

ALL_REDUCE_ROWS = 4096  # rows per all-reduce when the workers share an array (16 MB of 2,048 float32 features)


def make_strategy(name: str = "default"):
    """The tf.distribute strategy for ``name``: default (one device), mirrored (all local devices), multiworker."""
    import tensorflow as tf

    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        # MirroredStrategy() alone uses only CPU:0 when there is no GPU; name every logical CPU instead.
        devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy(devices=[d.name for d in devices])
    if name == "multiworker":
        if not os.environ.get("TF_CONFIG"):
            raise ConfigError("$strategy multiworker needs the TF_CONFIG environment variable (the cluster and this "
                              "process's place in it); see the README, section Scaling out")
        return tf.distribute.MultiWorkerMirroredStrategy()  # cluster from the TF_CONFIG environment variable
    raise ConfigError(f"strategy must be one of {', '.join(STRATEGIES)}, got {name!r}")


def worker_role() -> tuple[str, bool]:
    """This process's name in a TF_CONFIG cluster (e.g. "worker-1") and whether it is the chief, which alone
    writes the run directory. Without TF_CONFIG the process is the chief."""
    tf_config = json.loads(os.environ.get("TF_CONFIG") or "{}")
    task = tf_config.get("task", {})
    kind, index = task.get("type", "chief"), int(task.get("index", 0))
    chief = kind == "chief" or (kind == "worker" and index == 0 and "chief" not in tf_config.get("cluster", {}))
    return f"{kind}-{index}", chief


def is_multi_worker(strategy) -> bool:
    """Whether ``strategy`` spans more than one process (a MultiWorkerMirroredStrategy with 2+ workers)."""
    import tensorflow as tf

    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and \
        strategy.num_replicas_in_sync > len(strategy.extended.worker_devices)


@dataclass
class Workers:
    """This process's place among the workers of a multi-worker run, and a sum across all of them."""

    strategy: object
    rank: int  # 0 for the chief
    count: int

    @classmethod
    def of(cls, strategy) -> Workers | None:
        """The workers of ``strategy``, or None when it runs in this process alone."""
        if not is_multi_worker(strategy):
            return None
        resolver = strategy.cluster_resolver
        spec = resolver.cluster_spec().as_dict()
        tasks = [("chief", i) for i in range(len(spec.get("chief", [])))] + \
                [("worker", i) for i in range(len(spec.get("worker", [])))]
        count = strategy.num_replicas_in_sync // len(strategy.extended.worker_devices)
        return cls(strategy, tasks.index((resolver.task_type, int(resolver.task_id))), count)

    def all_sum(self, array: np.ndarray) -> np.ndarray:
        """The element-wise sum of ``array`` over the workers (every worker calls it, with the same shape)."""
        import tensorflow as tf

        array = np.asarray(array)
        local = len(self.strategy.extended.worker_devices)  # replica ids run rank * local + 0..local-1
        parts = []
        for start in range(0, max(len(array), 1), ALL_REDUCE_ROWS):
            block = tf.constant(array[start: start + ALL_REDUCE_ROWS])
            zeros = tf.zeros_like(block)
            values = self.strategy.experimental_distribute_values_from_function(
                lambda ctx, block=block, zeros=zeros: block if ctx.replica_id_in_sync_group % local == 0 else zeros)
            parts.append(self.strategy.reduce(tf.distribute.ReduceOp.SUM, values, axis=None).numpy())
        return np.concatenate(parts) if array.ndim else parts[0]


# ------------------------------------------------------------------------------------- Keras 3 workarounds


def first_local_batch(strategy, iterator):
    """This worker's first batch of a Keras epoch iterator, as plain tensors (workaround 1 above)."""
    import tensorflow as tf
    from keras import tree

    for _, _, batches in iterator:
        return tree.map_structure(
            lambda v: strategy.experimental_local_results(v)[0] if isinstance(v, tf.distribute.DistributedValues)
            else v, next(batches))
    return None


def metrics_for_reduction(strategy, metrics: dict) -> dict:
    """Step logs in a shape that Keras's multi-worker reduction accepts: (1,) instead of scalars (workaround 2)."""
    from keras import ops

    if not is_multi_worker(strategy):
        return metrics
    return {name: ops.reshape(value, (1,)) for name, value in metrics.items()}
