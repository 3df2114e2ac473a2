"""Static and learned loss weighting, and the training wrapper that applies them (on features: no backbone)."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest

from multitask.errors import ConfigError
from multitask.model import FEATURE_DIM, build_heads
from multitask.settings import check_loss_weights, parse_loss_weights
from multitask.weighting import (
    MultiTaskTrainer,
    StaticWeighting,
    UncertaintyWeighting,
    make_weighting,
)

RNG = np.random.default_rng(0)
FEATURES = RNG.normal(size=(48, FEATURE_DIM)).astype("float32")
LABELS = {"organ": RNG.integers(0, 9, 48), "cancer": RNG.integers(0, 2, 48)}
SAMPLE_WEIGHTS = {task: RNG.uniform(0.2, 3, 48).astype("float32") for task in ("organ", "cancer")}


def cross_entropy(logits: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Keras' sum-over-batch-size sparse cross-entropy, computed independently in NumPy."""
    logits = logits.astype(np.float64)
    log_probs = logits - logits.max(1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(1, keepdims=True))
    losses = -log_probs[np.arange(len(labels)), labels]
    if weights is not None:
        losses = losses * weights
    return float(losses.mean())


@pytest.fixture(scope="module")
def heads():
    keras.utils.set_random_seed(1)
    return build_heads()


def evaluate(trainer, sample_weight=None) -> dict[str, float]:
    trainer.compile(optimizer="adam")
    return trainer.evaluate(FEATURES, LABELS, sample_weight=sample_weight, batch_size=len(FEATURES), verbose=0,
                            return_dict=True)


def test_static_loss_is_weighted_sum_of_head_losses(heads):
    logits = heads.predict(FEATURES, verbose=0)
    organ, cancer = cross_entropy(logits["organ"], LABELS["organ"]), cross_entropy(logits["cancer"], LABELS["cancer"])
    logs = evaluate(MultiTaskTrainer(heads, StaticWeighting({"organ": 2.0, "cancer": 0.25})))
    assert logs["organ_loss"] == pytest.approx(organ, rel=1e-4)
    assert logs["cancer_loss"] == pytest.approx(cancer, rel=1e-4)
    assert logs["loss"] == pytest.approx(2.0 * organ + 0.25 * cancer, rel=1e-4)
    assert logs["task_loss"] == pytest.approx(logs["loss"], rel=1e-5)  # fixed weights: the same objective
    assert logs["organ_accuracy"] == pytest.approx(np.mean(logits["organ"].argmax(1) == LABELS["organ"]))


def test_dict_sample_weights_weight_each_head_separately(heads):
    logits = heads.predict(FEATURES, verbose=0)
    logs = evaluate(MultiTaskTrainer(heads, StaticWeighting({"organ": 1.0, "cancer": 1.0})), SAMPLE_WEIGHTS)
    for task in ("organ", "cancer"):
        expected = cross_entropy(logits[task], LABELS[task], SAMPLE_WEIGHTS[task])
        assert logs[f"{task}_loss"] == pytest.approx(expected, rel=1e-4)


def test_uncertainty_loss_formula(heads):
    logits = heads.predict(FEATURES, verbose=0)
    weighting = UncertaintyWeighting()
    weighting.log_vars["organ"].assign(0.7)
    weighting.log_vars["cancer"].assign(-0.4)
    logs = evaluate(MultiTaskTrainer(heads, weighting))
    organ, cancer = cross_entropy(logits["organ"], LABELS["organ"]), cross_entropy(logits["cancer"], LABELS["cancer"])
    expected = math.exp(-0.7) * organ + 0.5 * 0.7 + math.exp(0.4) * cancer + 0.5 * -0.4
    assert logs["loss"] == pytest.approx(expected, rel=1e-4)
    # The fixed objective that phases are compared on ignores the learned weights: 1 per task.
    assert logs["task_loss"] == pytest.approx(organ + cancer, rel=1e-4)
    assert weighting.state()["loss_weights"]["organ"] == pytest.approx(math.exp(-0.7), rel=1e-6)


def test_losses_are_the_same_under_mirrored_strategy(heads):
    """Keras scales losses per replica; the trainer must undo and redo that exactly, learned terms included."""
    import tensorflow as tf

    from multitask.distribute import make_strategy

    weighting = UncertaintyWeighting()
    weighting.log_vars["organ"].assign(0.5)
    single = evaluate(MultiTaskTrainer(heads, weighting), SAMPLE_WEIGHTS)
    strategy = make_strategy("mirrored")
    assert strategy.num_replicas_in_sync == len(tf.config.list_logical_devices("CPU")) == 2
    with strategy.scope():
        mirrored_heads = build_heads()
        mirrored_heads.set_weights(heads.get_weights())
        learned = UncertaintyWeighting()
        learned.log_vars["organ"].assign(0.5)
        trainer = MultiTaskTrainer(mirrored_heads, learned)
        logs = evaluate(trainer, SAMPLE_WEIGHTS)
    for key in ("loss", "task_loss", "organ_loss", "cancer_loss"):
        assert logs[key] == pytest.approx(single[key], rel=1e-4), key


def test_uncertainty_weighting_learns_and_moves_its_weights():
    keras.utils.set_random_seed(2)
    centres = RNG.normal(scale=3.0, size=(9, FEATURE_DIM)).astype("float32")
    organ = RNG.integers(0, 9, 256)
    features = centres[organ] + RNG.normal(size=(256, FEATURE_DIM)).astype("float32")
    labels = {"organ": organ, "cancer": (organ % 2)}
    weighting = make_weighting("uncertainty", tasks=("organ", "cancer"), loss_weights={})
    trainer = MultiTaskTrainer(build_heads(), weighting)
    trainer.compile(optimizer=keras.optimizers.Adam(1e-2))
    history = trainer.fit(features, labels, epochs=4, batch_size=32, verbose=0).history
    assert history["loss"][-1] < history["loss"][0]
    assert history["organ_accuracy"][-1] > 0.9 and history["cancer_accuracy"][-1] > 0.9
    assert len(trainer.trainable_weights) == len(trainer.net.trainable_weights) + 2
    assert all(abs(v) > 0.01 for v in weighting.state()["log_vars"].values())


def test_single_head_accepts_plain_label_arrays():
    trainer = MultiTaskTrainer(build_heads(("cancer",)), StaticWeighting({"cancer": 1.0}, tasks=("cancer",)))
    trainer.compile(optimizer="adam")
    logs = trainer.evaluate(FEATURES, LABELS["cancer"], verbose=0, return_dict=True)
    assert set(logs) == {"loss", "task_loss", "cancer_loss", "cancer_accuracy"}
    assert logs["loss"] == pytest.approx(logs["cancer_loss"], rel=1e-5)


def test_parse_loss_weights():
    assert parse_loss_weights("organ=1.5, cancer=0") == {"organ": 1.5, "cancer": 0.0}
    assert parse_loss_weights("cancer=2") == {"cancer": 2.0}


@pytest.mark.parametrize(("text", "message"), [
    ("liver=1", "unknown task 'liver'"),
    ("organ=-1", "must be a finite number >= 0, got '-1'"),
    ("organ=abc", "must be a number, got 'abc'"),
    ("cancer=inf", "must be a finite number >= 0"),
    ("organ", "expected TASK=NUMBER"),
    ("", "no loss weights"),
])
def test_parse_loss_weights_rejects_bad_text(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_loss_weights(text)


def test_loss_weights_must_train_something():
    assert check_loss_weights({"cancer": 0}) == {"organ": 1.0, "cancer": 0.0}
    with pytest.raises(ConfigError, match="loss weight of organ and cancer is 0"):
        check_loss_weights({"organ": 0, "cancer": 0})
    with pytest.raises(ConfigError, match="loss weight of cancer is 0"):
        check_loss_weights({"cancer": 0}, tasks=("cancer",))


def test_unknown_weighting_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown weighting 'magic'"):
        make_weighting("magic", tasks=("organ",), loss_weights={})


def test_every_weighting_follows_the_protocol():
    """Static and learned weightings answer the same questions; only learned ones have variables to restore."""
    from multitask.settings import WEIGHTINGS
    from multitask.weighting import METHODS, LossWeighting

    assert tuple(METHODS) == WEIGHTINGS
    static = make_weighting("static", tasks=("organ", "cancer"), loss_weights={"organ": 2.0})
    learned = make_weighting("uncertainty", tasks=("organ", "cancer"), loss_weights={})
    assert isinstance(static, LossWeighting) and isinstance(learned, LossWeighting)
    assert static.values() == [] and static.log_values() == {}
    assert static.reference_weights == {"organ": 2.0, "cancer": 1.0}
    assert learned.reference_weights == {"organ": 1.0, "cancer": 1.0}
    learned.log_vars["cancer"].assign(0.3)
    saved = learned.values()
    learned.log_vars["cancer"].assign(-1.0)
    learned.restore(saved)
    assert learned.log_values()["cancer_log_var"] == pytest.approx(0.3)
    with pytest.raises(ConfigError, match="has 2 variables, got 1"):
        learned.restore([0.0])
