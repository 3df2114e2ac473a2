"""Loss weighting across the heads (LibMTL style: a separate, swappable piece), and the model that trains with it.

Each weighting turns the per-task losses ``{task: L_t}`` of one batch into the one number the optimizer minimises:

* :class:`StaticWeighting`: ``loss = sum_t w_t * L_t`` with fixed weights (``--loss-weights organ=1,cancer=1``).
* :class:`UncertaintyWeighting`: learned homoscedastic-uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018).

:class:`MultiTaskTrainer` wraps a functional model (image or features in, ``{task: logits}`` out) for ``fit`` only:
it computes the per-task sparse categorical cross-entropy from logits, combines them with a weighting, and logs
``loss``, ``<task>_loss`` and ``<task>_accuracy``. What a run saves is always the wrapped functional model, so a
``.keras`` file never contains a class from this module.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import keras
from keras import ops

from multitask.errors import ConfigError
from multitask.taxonomy import TASKS

WEIGHTINGS = ("static", "uncertainty")


class StaticWeighting:
    """Fixed weights: ``loss = sum_t w_t * L_t``."""

    def __init__(self, loss_weights: Mapping[str, float], *, tasks: tuple[str, ...] = TASKS):
        self.tasks = tuple(tasks)
        weights = check_loss_weights(loss_weights, tasks=self.tasks)
        self.loss_weights = {task: weights[task] for task in self.tasks}

    def __call__(self, losses: Mapping[str, object]):
        """The weighted sum of ``losses`` (a dict of scalar tensors keyed by task)."""
        return sum(self.loss_weights[task] * losses[task] for task in self.tasks)

    def state(self) -> dict[str, object]:
        """JSON-ready description for config.json."""
        return {"method": "static", "loss_weights": dict(self.loss_weights)}


class UncertaintyWeighting(keras.layers.Layer):
    """Learned weights from one trainable log-variance ``s_t = log sigma_t^2`` per task (Kendall et al., 2018).

    ``loss = sum_t exp(-s_t) * L_t + 0.5 * s_t``

    where ``L_t`` is the task's mean cross-entropy. This is Kendall et al.'s classification term (their eq. 10,
    ``L_t / sigma_t^2 + log sigma_t``) with ``s_t = log sigma_t^2``, learned in log space for stability. A task whose
    loss stays high gets a larger ``s_t``, so a smaller weight ``exp(-s_t)``; the ``0.5 * s_t`` term keeps the
    weights from collapsing to 0. For a fixed loss the optimum is ``s_t = log(2 L_t)``, i.e. weight ``1 / (2 L_t)``. All
    ``s_t`` start at 0, i.e. at static weights of 1.
    """

    def __init__(self, tasks: tuple[str, ...] = TASKS, **kwargs):
        super().__init__(**kwargs)
        self.tasks = tuple(tasks)
        self.log_vars = {
            task: self.add_weight(shape=(), initializer="zeros", name=f"{task}_log_var") for task in self.tasks
        }

    def call(self, losses: Mapping[str, object]):
        """The combined loss of ``losses`` (a dict of scalar tensors keyed by task)."""
        total = 0.0
        for task in self.tasks:
            s = ops.cast(self.log_vars[task], "float32")
            total = total + ops.exp(-s) * losses[task] + 0.5 * s
        return total

    def log_values(self) -> dict[str, float]:
        """Current ``<task>_log_var`` and ``<task>_weight`` (= exp(-s_t)) as plain floats, for logs."""
        out = {}
        for task in self.tasks:
            s = float(ops.convert_to_numpy(self.log_vars[task]))
            out[f"{task}_log_var"] = s
            out[f"{task}_weight"] = math.exp(-s)
        return out

    def state(self) -> dict[str, object]:
        """JSON-ready description for config.json, with the learned values."""
        values = self.log_values()
        return {
            "method": "uncertainty",
            "formula": "loss = sum_t exp(-s_t) * L_t + 0.5 * s_t",
            "log_vars": {t: values[f"{t}_log_var"] for t in self.tasks},
            "loss_weights": {t: values[f"{t}_weight"] for t in self.tasks},
        }


def make_weighting(method: str, *, tasks: tuple[str, ...], loss_weights: Mapping[str, float]):
    """A :class:`StaticWeighting` or :class:`UncertaintyWeighting` for ``tasks``."""
    if method == "static":
        return StaticWeighting(loss_weights, tasks=tasks)
    if method == "uncertainty":
        return UncertaintyWeighting(tasks, name="uncertainty_weighting")
    raise ConfigError(f"unknown weighting {method!r}; expected one of {', '.join(WEIGHTINGS)}")


def check_loss_weights(loss_weights: Mapping[str, object], *, tasks: tuple[str, ...] = TASKS) -> dict[str, float]:
    """``{task: weight}`` for every task (1.0 where not given); ConfigError for an unknown task, a bad value, or
    weights that are all 0 on the trained ``tasks``."""
    given = {task: _loss_weight(task, value) for task, value in loss_weights.items()}
    out = {task: given.get(task, 1.0) for task in TASKS}
    if not any(out[task] for task in tasks):
        raise ConfigError(f"the loss weight of {' and '.join(tasks)} is 0: nothing would be trained; give a "
                          "trained task a weight > 0")
    return out


def parse_loss_weights(text: str) -> dict[str, float]:
    """Parse ``"organ=1.0,cancer=0.5"`` into ``{task: weight}`` (only the tasks given); ConfigError when malformed."""
    weights = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep or not name.strip():
            raise ConfigError(f"bad loss weight {part!r}: expected TASK=NUMBER, e.g. organ=1.0,cancer=0.5")
        weights[name.strip()] = _loss_weight(name.strip(), value.strip())
    if not weights:
        raise ConfigError(f"no loss weights in {text!r}: expected e.g. organ=1.0,cancer=0.5")
    return weights


def _loss_weight(task: str, value: object) -> float:
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r} in loss weights; expected {' and/or '.join(TASKS)}, "
                          "e.g. organ=1.0,cancer=0.5")
    try:
        weight = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"loss weight of {task} must be a number, got {value!r}") from None
    if not math.isfinite(weight) or weight < 0:
        raise ConfigError(f"loss weight of {task} must be a finite number >= 0, got {value!r}")
    return weight


def _replicas() -> int:
    import tensorflow as tf

    return tf.distribute.get_strategy().num_replicas_in_sync


class MultiTaskTrainer(keras.Model):
    """Training-only wrapper: ``net``'s dict of logits, per-task cross-entropy, combined by ``weighting``.

    Labels and sample weights may be a dict keyed by task, or one array when ``net`` has a single head.
    Sample weights (e.g. ``--balance``) weight each task's cross-entropy; accuracy stays unweighted.
    """

    def __init__(self, net: keras.Model, weighting, **kwargs):
        super().__init__(**kwargs)
        self.net = net
        self.tasks = tuple(t for t in TASKS if t in net.output_names)
        self.weighting = weighting
        self.cross_entropy = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        self.task_losses = {t: keras.metrics.Mean(name=f"{t}_loss") for t in self.tasks}
        self.task_accuracies = {t: keras.metrics.SparseCategoricalAccuracy(name=f"{t}_accuracy") for t in self.tasks}
        self.built = True

    def call(self, inputs, training=False):
        return self.net(inputs, training=training)

    def _by_task(self, value):
        if value is None or isinstance(value, Mapping):
            return value
        if len(self.tasks) != 1:
            raise ValueError(f"expected a dict keyed by {self.tasks}, got {type(value).__name__}")
        return {self.tasks[0]: value}

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """The weighted loss of one batch (scaled per replica, as Keras expects under tf.distribute)."""
        y, weights = self._by_task(y), self._by_task(sample_weight)
        replicas = _replicas()
        losses = {}
        for task in self.tasks:
            w = None if weights is None else weights[task]
            # Keras losses come back divided by the replica count; undo that so weighting sees the true mean.
            losses[task] = self.cross_entropy(y[task], y_pred[task], sample_weight=w) * replicas
            self.task_losses[task].update_state(losses[task], sample_weight=ops.shape(y_pred[task])[0])
        return self.weighting(losses) / replicas

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        y = self._by_task(y)
        for task in self.tasks:
            self.task_accuracies[task].update_state(y[task], y_pred[task])
        return self.get_metrics_result()
