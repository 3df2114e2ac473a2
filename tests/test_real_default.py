"""The default recipe for pretrained weights on the real sample (issues 19, 22): 299 px, the heads on cached features,
then 3 fine-tuning epochs (``real_default_run``, the session's longest fixture). What it must do: learn the real
images, beat frozen 160 px on validation (the choice was made there), and keep int8 within its bars at 299 px. The
bars' provenance is in test_real_sample.py's docstring.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from multitask.evaluate import METRICS_FILE, PREDICTIONS_FILE, evaluate_run
from multitask.export import ARTIFACTS, EXPORT_FILE, TOLERANCE, export_dir, export_run
from multitask.files import read_json
from multitask.predict import Predictor
from multitask.rundir import HISTORY_FILE, open_run
from multitask.splits import load_split


@pytest.fixture(scope="module")
def default_eval(real_default_run, tmp_path_factory) -> Path:
    """`multitask evaluate` of the default run on its test split: the folder (metrics and per-image predictions)."""
    out = tmp_path_factory.mktemp("default-eval")
    evaluate_run(real_default_run, split="test", out=out, resamples=200)
    return out


@pytest.fixture(scope="module")
def default(default_eval) -> dict:
    return read_json(default_eval / METRICS_FILE)


def validation(run, tmp_path) -> dict:
    return evaluate_run(run, split="val", out=tmp_path / open_run(run).path.parent.name, resamples=50)


def test_default_recipe_learns_real_images_and_its_config_describes_the_saved_model(real_default_run, default):
    info = open_run(real_default_run)
    saved = info.config["saved"]
    history = pd.read_csv(real_default_run / HISTORY_FILE)
    # "final" is the epoch whose weights were saved, whichever phase that was (epochs number on across phases).
    row = history[history["epoch"] == saved["epoch"]]
    assert len(row) == 1 and info.config["final"]["val_loss"] == pytest.approx(float(row["val_loss"].iloc[0]))
    # A fine-tuning phase is kept only when it beats the frozen one on validation (like with like).
    best = info.config["best"]
    if best.get("fine_tune") is not None and saved["phase"] == "fine_tune":
        assert best["fine_tune"] <= best["heads"]
    # Measured on the test split (scripts/sweep_defaults.py, tuned-299-mixed7-e3-lr1e-4), seeds 42 / 7 / 1234: organ
    # accuracy 0.975 / 0.991 / 0.934, balanced 0.973 / 0.993 / 0.884, cancer ROC-AUC 0.942 / 0.972 / 0.965 (the
    # reproducible rerun; before it, seed 42 read 0.966 / 0.917 / 0.945, its balanced accuracy one of its 2 Colon
    # images, 0.056). This suite runs seed 42, whose own runs read 0.958-0.975 / 0.909-0.973 / 0.943-0.958; the bars
    # sit below every one, and the balanced one leaves room for a missed Colon image and two more misses.
    assert default["organ"]["accuracy"] >= 0.93
    assert default["organ"]["balanced_accuracy"] >= 0.88
    assert default["cancer"]["roc_auc"] >= 0.90


def test_int8_passes_its_self_check_at_the_default_size_and_predicts_like_keras(real_default_run, default_eval):
    """int8 where the product promises it: a pretrained real-sample run at the default 299 px. Measured on its 32
    check images (seed 42): max |difference| 0.092 (organ) / 0.023 (cancer) under XNNPACK, with oneDNN at full ISA or
    AVX2, and 0.094 / 0.023 under LiteRT's reference kernels, against the product's bar of 0.25; no answer flipped
    (the earlier default's runs flipped 0-1 of 32 at near ties; bar 93%). multitask.export.TOLERANCE says how the
    bars were set."""
    info = open_run(real_default_run)
    assert info.image_size == 299
    result = export_run(real_default_run, format="int8")  # the product's own bars (TOLERANCE["int8"])
    record = read_json(export_dir(info, "int8") / EXPORT_FILE)
    assert record["artifact"] == ARTIFACTS["int8"] and record["max_abs_diff"] == result.max_abs_diff
    assert max(result.max_abs_diff.values()) <= TOLERANCE["int8"]["max_abs_diff"] == 0.25
    assert min(result.argmax_agreement.values()) >= TOLERANCE["int8"]["argmax_agreement"] == 0.93

    # Keras' answers on the test split are the evaluation's (one forward pass of the same Predictor, saved per image).
    split = load_split(info.split_path)
    files = split.loc[split["split"] == "test", "path"].tolist()
    int8_frame = Predictor.from_run(real_default_run, engine="int8").predict(files)
    keras_frame = pd.read_csv(default_eval / PREDICTIONS_FILE).set_index("path").loc[int8_frame["path"]].reset_index()
    assert len(int8_frame) == len(files) == len(keras_frame)
    assert list(int8_frame.columns) == [c for c in keras_frame.columns if c in int8_frame.columns]
    assert {"organ", "cancer", "malignancy_threshold"} <= set(int8_frame.columns)
    assert not {"ood_score", "ood"} & set(int8_frame.columns)  # no OOD detector in the int8 file
    assert (int8_frame["organ"] == keras_frame["organ"]).mean() >= 0.95
    assert (int8_frame["cancer"] == keras_frame["cancer"]).mean() >= 0.95
    probabilities = [c for c in int8_frame.columns if c.startswith("p_")]
    moved = np.abs(int8_frame[probabilities].to_numpy(float) - keras_frame[probabilities].to_numpy(float)).max(axis=1)
    assert np.median(moved) <= 0.02


def test_default_recipe_beats_frozen_160_on_validation(real_run, real_default_run, tmp_path):
    """Issue 22: the default recipe was chosen on validation; on this split it must beat frozen 160 px there. Each
    run's config.json records its saved model's validation scores (computed at calibration); they are what
    `evaluate --split val` measures, checked here on the cheaper run. (Last in the module, so this worker builds
    real_default_run first, while the other builds real_run.)"""
    baseline, chosen = (open_run(run).config["calibration"]["validation"] for run in (real_run, real_default_run))
    evaluated = validation(real_run, tmp_path)
    assert baseline["organ_balanced_accuracy"] == pytest.approx(evaluated["organ"]["balanced_accuracy"], abs=0.02)
    assert baseline["cancer_roc_auc"] == pytest.approx(evaluated["cancer"]["roc_auc"], abs=0.01)
    # Measured, seeds 42 / 7 / 1234: 0.939 / 0.984 / 1.000 against 0.814 / 0.833 / 0.910.
    assert chosen["organ_balanced_accuracy"] > baseline["organ_balanced_accuracy"]
