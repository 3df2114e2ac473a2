"""Loss weighting across the heads (LibMTL style: a protocol and one small class per method), and the training model.

Every weighting is a :class:`LossWeighting`: it turns the per-task losses ``{task: L_t}`` of one batch into the one
number the optimizer minimises, says what it is (``state()``, stored in ``config.json``), what to log each epoch
(``log_values()``), and owns its variables (Keras layer weights: none for fixed weights).

* :class:`StaticWeighting`: ``loss = sum_t w_t * L_t`` with fixed weights (``--loss-weights organ=1,cancer=1``).
* :class:`UncertaintyWeighting`: learned homoscedastic-uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018).

Whatever the method, :attr:`LossWeighting.reference_weights` are fixed weights that define one objective, the same
in every phase and epoch (the static weights, or 1 per task for learned ones). :class:`MultiTaskTrainer` logs it
as ``task_loss``; training picks the best epoch and compares phases on it, never on a learned objective that
moves while it is being compared.

:class:`MultiTaskTrainer` wraps a functional model (image or features in, ``{task: logits}`` out) for ``fit`` only:
it computes the per-task sparse categorical cross-entropy from logits, combines them with a weighting, and logs
``loss``, ``task_loss``, ``<task>_loss`` and ``<task>_accuracy``. What a run saves is always the wrapped functional
model, so a ``.keras`` file never contains a class from this module.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import keras
from keras import ops

from multitask.distribute import first_local_batch, is_multi_worker, metrics_for_reduction
from multitask.errors import ConfigError
from multitask.model import model_tasks
from multitask.settings import WEIGHTINGS, check_loss_weights
from multitask.taxonomy import TASKS


class LossWeighting(keras.layers.Layer):
    """Base class (LibMTL's ``AbsWeighting``): combine ``{task: loss}`` into one objective."""

    method = "abstract"

    def __init__(self, tasks: tuple[str, ...] = TASKS, **kwargs):
        super().__init__(name=f"{self.method}_weighting", **kwargs)
        self.tasks = tuple(tasks)

    def call(self, losses: Mapping[str, object]):
        """The combined loss of ``losses`` (a dict of scalar tensors keyed by task)."""
        raise NotImplementedError

    @property
    def reference_weights(self) -> dict[str, float]:
        """Fixed weights of the objective that best epochs and phases are compared on."""
        return {task: 1.0 for task in self.tasks}

    def log_values(self) -> dict[str, float]:
        """Values to add to each epoch's logs (learned weights); none for fixed weights."""
        return {}

    def state(self) -> dict[str, object]:
        """JSON-ready description for config.json."""
        return {"method": self.method, **self.log_values()}

    def values(self) -> list[list[float] | float]:
        """The variables' current values, JSON-ready (to restore them with :meth:`restore`)."""
        return [ops.convert_to_numpy(v).tolist() for v in self.weights]

    def restore(self, values: list) -> None:
        """Set the variables to ``values`` from :meth:`values` (a resumed or reverted run)."""
        if len(values) != len(self.weights):
            raise ConfigError(f"{self.method} weighting has {len(self.weights)} variables, got {len(values)} values")
        for variable, value in zip(self.weights, values, strict=True):
            variable.assign(value)


class StaticWeighting(LossWeighting):
    """Fixed weights: ``loss = sum_t w_t * L_t``."""

    method = "static"

    def __init__(self, loss_weights: Mapping[str, float], *, tasks: tuple[str, ...] = TASKS, **kwargs):
        super().__init__(tasks, **kwargs)
        weights = check_loss_weights(loss_weights, tasks=self.tasks)
        self.loss_weights = {task: weights[task] for task in self.tasks}

    def call(self, losses: Mapping[str, object]):
        return sum(self.loss_weights[task] * losses[task] for task in self.tasks)

    @property
    def reference_weights(self) -> dict[str, float]:
        return dict(self.loss_weights)

    def state(self) -> dict[str, object]:
        return {"method": self.method, "loss_weights": dict(self.loss_weights)}


class UncertaintyWeighting(LossWeighting):
    """Learned weights from one trainable log-variance ``s_t = log sigma_t^2`` per task (Kendall et al., 2018).

    ``loss = sum_t exp(-s_t) * L_t + 0.5 * s_t``

    where ``L_t`` is the task's mean cross-entropy. This is Kendall et al.'s classification term (their eq. 10,
    ``L_t / sigma_t^2 + log sigma_t``) with ``s_t = log sigma_t^2``, learned in log space for stability. A task whose
    loss stays high gets a larger ``s_t``, so a smaller weight ``exp(-s_t)``; the ``0.5 * s_t`` term keeps the
    weights from collapsing to 0. For a fixed loss the optimum is ``s_t = log(2 L_t)``, i.e. weight ``1 / (2 L_t)``.
    All ``s_t`` start at 0, i.e. at static weights of 1.
    """

    method = "uncertainty"

    def __init__(self, tasks: tuple[str, ...] = TASKS, **kwargs):
        super().__init__(tasks, **kwargs)
        self.log_vars = {
            task: self.add_weight(shape=(), initializer="zeros", name=f"{task}_log_var") for task in self.tasks
        }

    def call(self, losses: Mapping[str, object]):
        total = 0.0
        for task in self.tasks:
            s = ops.cast(self.log_vars[task], "float32")
            total = total + ops.exp(-s) * losses[task] + 0.5 * s
        return total

    def log_values(self) -> dict[str, float]:
        """Current ``<task>_log_var`` and ``<task>_weight`` (= exp(-s_t)) as plain floats."""
        out = {}
        for task in self.tasks:
            s = float(ops.convert_to_numpy(self.log_vars[task]))
            out[f"{task}_log_var"] = s
            out[f"{task}_weight"] = math.exp(-s)
        return out

    def state(self) -> dict[str, object]:
        values = self.log_values()
        return {
            "method": self.method,
            "formula": "loss = sum_t exp(-s_t) * L_t + 0.5 * s_t",
            "log_vars": {t: values[f"{t}_log_var"] for t in self.tasks},
            "loss_weights": {t: values[f"{t}_weight"] for t in self.tasks},
        }


METHODS: dict[str, type[LossWeighting]] = {"static": StaticWeighting, "uncertainty": UncertaintyWeighting}  # WEIGHTINGS


def make_weighting(method: str, *, tasks: tuple[str, ...], loss_weights: Mapping[str, float]) -> LossWeighting:
    """The :class:`LossWeighting` called ``method`` for ``tasks``."""
    if method == "static":
        return StaticWeighting(loss_weights, tasks=tasks)
    if method in METHODS:
        return METHODS[method](tasks)
    raise ConfigError(f"unknown weighting {method!r}; expected one of {', '.join(WEIGHTINGS)}")


def _replicas() -> int:
    if not _on_tensorflow():  # JAX or PyTorch (scripts/gpu_benchmark.py): no tf.distribute, one replica per step
        return 1
    import tensorflow as tf

    return tf.distribute.get_strategy().num_replicas_in_sync


def _on_tensorflow() -> bool:
    return keras.backend.backend() == "tensorflow"


class MultiTaskTrainer(keras.Model):
    """Training-only wrapper: ``net``'s dict of logits, per-task cross-entropy, combined by ``weighting``.

    Labels and sample weights may be a dict keyed by task, or one array when ``net`` has a single head.
    Sample weights (e.g. ``--balance``) weight each task's cross-entropy; accuracy stays unweighted.
    """

    def __init__(self, net: keras.Model, weighting: LossWeighting, **kwargs):
        super().__init__(**kwargs)
        self.net = net
        self.tasks = model_tasks(net)
        self.weighting = weighting
        self.cross_entropy = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        self.task_loss = keras.metrics.Mean(name="task_loss")
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
        batch = ops.shape(y_pred[self.tasks[0]])[0]
        for task in self.tasks:
            w = None if weights is None else weights[task]
            # Keras losses come back divided by the replica count; undo that so weighting sees the true mean.
            losses[task] = self.cross_entropy(y[task], y_pred[task], sample_weight=w) * replicas
            self.task_losses[task].update_state(losses[task], sample_weight=batch)
        reference = self.weighting.reference_weights
        self.task_loss.update_state(sum(reference[t] * losses[t] for t in self.tasks), sample_weight=batch)
        return self.weighting(losses) / replicas

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        y = self._by_task(y)
        for task in self.tasks:
            self.task_accuracies[task].update_state(y[task], y_pred[task])
        if not _on_tensorflow():
            return self.get_metrics_result()
        return metrics_for_reduction(self.distribute_strategy, self.get_metrics_result())

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Keras 3 reduces the first batch across replicas to learn its shapes, which fails under a multi-worker
        # strategy (see multitask.distribute); this worker's own first batch has the same shapes.
        if iterator is not None and data_batch is None and _on_tensorflow() and \
                is_multi_worker(self.distribute_strategy):
            iterator, data_batch = None, first_local_batch(self.distribute_strategy, iterator)
        return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)
