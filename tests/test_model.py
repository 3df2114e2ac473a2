"""Backbone, heads and the joint / single-task models: outputs, input scaling, training, saving, freezing."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from conftest import IMAGE_SIZE

from multitask.errors import ModelError
from multitask.model import (
    FEATURE_DIM,
    VARIANCE_SHRINKAGE,
    build_backbone,
    build_joint_model,
    build_single_task_model,
    fit_feature_scaling,
    freeze_backbone,
    model_parts,
    model_tasks,
)
from multitask.rundir import save_model
from multitask.weighting import MultiTaskTrainer, StaticWeighting

RNG = np.random.default_rng(0)
PIXELS = RNG.uniform(0, 255, size=(4, IMAGE_SIZE, IMAGE_SIZE, 3)).astype("float32")


@pytest.fixture(scope="module")
def joint():
    keras.utils.set_random_seed(0)
    return build_joint_model(IMAGE_SIZE, weights=None)


def test_joint_model_outputs_logits_of_both_heads(joint):
    out = joint(PIXELS)
    assert set(out) == {"organ", "cancer"} and model_tasks(joint) == ("organ", "cancer")
    assert out["organ"].shape == (4, 9) and out["cancer"].shape == (4, 2)
    assert joint.input_shape == (None, IMAGE_SIZE, IMAGE_SIZE, 3)
    # logits, not probabilities: no softmax on the output layers
    assert model_parts(joint).heads.get_layer("organ").activation is keras.activations.linear


def test_model_parts_are_the_shared_sub_models(joint):
    """Grad-CAM, fine-tuning and export ask for the parts; they are the very layers the model runs."""
    parts = model_parts(joint)
    assert parts.tasks == ("organ", "cancer") and parts.backbone.output_shape == (None, FEATURE_DIM)
    features = parts.backbone(PIXELS)
    by_parts = parts.heads(features)
    for task, logits in joint(PIXELS).items():
        np.testing.assert_allclose(np.asarray(logits), np.asarray(by_parts[task]), rtol=1e-6)
    with pytest.raises(ModelError, match="no 'backbone' and 'heads' sub-models"):
        model_parts(keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]))


def test_single_task_model_outputs_a_dict_with_one_head():
    model = build_single_task_model("organ", IMAGE_SIZE, weights=None)  # cancer: see the training test below
    out = model(PIXELS[:2])
    assert list(out) == ["organ"] and out["organ"].shape == (2, 9)
    assert model_tasks(model) == ("organ",) and model.name == "single_organ"


def test_effective_input_is_inception_preprocess_input(joint):
    """Regression test for the seed's double scaling: the first convolution sees preprocess_input(pixels)."""
    backbone = joint.get_layer("backbone")
    first_conv = next(layer for layer in backbone.layers if isinstance(layer, keras.layers.Conv2D))
    seen = keras.Model(backbone.input, first_conv.input)(PIXELS)
    expected = keras.applications.inception_v3.preprocess_input(PIXELS.copy())
    np.testing.assert_allclose(np.asarray(seen), expected, atol=1e-6)
    assert np.asarray(seen).min() >= -1.0 and np.asarray(seen).max() <= 1.0


def test_backbone_ends_at_pooled_features(joint):
    backbone = joint.get_layer("backbone")
    assert backbone.output_shape == (None, FEATURE_DIM)


@pytest.mark.parametrize("task", ["joint", "cancer"])
def test_models_train_a_few_steps_and_the_loss_falls(task):
    keras.utils.set_random_seed(3)
    if task == "joint":
        model, tasks = build_joint_model(IMAGE_SIZE, weights=None), ("organ", "cancer")
    else:
        model, tasks = build_single_task_model(task, IMAGE_SIZE, weights=None), (task,)
    pixels = PIXELS[np.arange(8) % 4].copy()
    pixels[:4] *= 0.3  # two easy groups: dark and bright images
    labels = {"organ": np.repeat([2, 5], 4), "cancer": np.repeat([0, 1], 4)}
    trainer = MultiTaskTrainer(model, StaticWeighting({t: 1.0 for t in tasks}, tasks=tasks))
    # Eager: three steps cost less than tracing InceptionV3's training graph.
    trainer.compile(optimizer=keras.optimizers.Adam(1e-3), run_eagerly=True)
    y = labels if task == "joint" else labels[task]
    loss = trainer.fit(pixels, y, batch_size=8, epochs=3, verbose=0).history["loss"]
    assert loss[-1] < 0.5 * loss[0], loss
    logits = model(pixels[:2])
    assert {t: v.shape for t, v in logits.items()} == {t: (2, {"organ": 9, "cancer": 2}[t]) for t in tasks}


def test_keras_file_round_trip_gives_identical_predictions(joint, tmp_path):
    path = save_model(joint, tmp_path / "model.keras")
    loaded = keras.models.load_model(path, safe_mode=True, compile=False)
    before, after = joint(PIXELS), loaded(PIXELS)
    assert set(after) == {"organ", "cancer"}
    for task in before:
        np.testing.assert_array_equal(before[task], after[task])


def test_freeze_backbone_unfreezes_from_a_layer_and_keeps_batchnorm_frozen():
    backbone = build_backbone(IMAGE_SIZE, weights=None)
    trainable = freeze_backbone(backbone, unfreeze_from="mixed9")
    names = [layer.name for layer in backbone.layers]
    start = names.index("mixed9")
    assert trainable > 0
    for i, layer in enumerate(backbone.layers):
        if isinstance(layer, keras.layers.BatchNormalization) or i < start:
            assert not layer.trainable, layer.name
        elif isinstance(layer, keras.layers.Conv2D):
            assert layer.trainable, layer.name
    assert freeze_backbone(backbone) == 0 and not backbone.trainable_weights


def test_unknown_unfreeze_layer_names_the_choices():
    backbone = build_backbone(IMAGE_SIZE, weights=None)
    with pytest.raises(ModelError, match="no layer named 'mixed99'.*mixed10"):
        freeze_backbone(backbone, unfreeze_from="mixed99")


def test_missing_weights_file_is_a_model_error(tmp_path):
    with pytest.raises(ModelError, match="does not exist; pass weights=imagenet"):
        build_backbone(IMAGE_SIZE, weights=tmp_path / "nope.h5")


def test_too_small_image_is_a_model_error():
    with pytest.raises(ModelError, match="at least 75 px"):
        build_backbone(64, weights=None)


def test_feature_scaling_standardises_with_training_statistics_once():
    backbone = build_backbone(75, weights=None)
    raw = np.random.default_rng(0).normal(3e-4, 1e-4, (40, 2048)).astype(np.float32)  # random-init scale
    scaled = fit_feature_scaling(backbone, raw, fit_rows=np.arange(40) < 30)
    np.testing.assert_allclose(scaled[:30].mean(axis=0), 0, atol=1e-3)
    variance = raw[:30].astype(np.float64).var(axis=0)  # each feature's spread, shrunk toward the mean spread
    expected_std = np.sqrt(variance / (variance + VARIANCE_SHRINKAGE * variance.mean()))
    np.testing.assert_allclose(scaled[:30].std(axis=0), expected_std, atol=1e-3)
    assert 0.9 < expected_std.mean() < 0.97
    with pytest.raises(ModelError, match="already fitted"):
        fit_feature_scaling(backbone, raw)


def test_a_feature_constant_in_training_does_not_explode_when_it_fires():
    """Pretrained ReLU features can be exactly 0 on every training image; plain z-scores divide them by ~0."""
    backbone = build_backbone(75, weights=None)
    rng = np.random.default_rng(1)
    raw = np.abs(rng.normal(0.3, 0.1, (60, 2048))).astype(np.float32)
    raw[:50, 7] = 0.0  # dead on every training row
    raw[50:, 7] = 0.3  # fires on the held-out rows, at a typical feature's size
    scaled = fit_feature_scaling(backbone, raw, fit_rows=np.arange(60) < 50)
    assert np.all(scaled[:50, 7] == 0)
    # At most 1/sqrt(shrinkage) times a typical feature's z-score: 0.3 / sqrt(0.1 * 0.1**2) ~ 9.5, not 3e6.
    assert 5 < scaled[50:, 7].max() < 1.01 * 0.3 / np.sqrt(VARIANCE_SHRINKAGE * raw[:50].var(axis=0).mean())
