"""tf.distribute strategies, and each process's role in a multi-worker cluster."""

from __future__ import annotations

import json
import os

from multitask.errors import ConfigError
from multitask.settings import STRATEGIES


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
