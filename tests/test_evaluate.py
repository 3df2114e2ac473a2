"""Metrics against hand-computed values, figures, and evaluate on a run's test split and on other folders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from multitask import cli
from multitask.evaluate import (
    cancer_metrics,
    confusion_figure,
    evaluate_run,
    per_organ_accuracy,
    roc_figure,
    summary_table,
    task_metrics,
)
from multitask.settings import FINE_TUNE_LR_FACTOR
from multitask.taxonomy import ORGAN_LABELS

MAX_PNG_BYTES = 150_000


def one_hot_probs(pred: list[int], n: int) -> np.ndarray:
    """Probabilities whose argmax is ``pred`` (0.7 on the predicted class, the rest spread)."""
    probs = np.full((len(pred), n), 0.3 / (n - 1))
    probs[np.arange(len(pred)), pred] = 0.7
    return probs


# ----------------------------------------------------------------------------------------------- metrics


def test_task_metrics_match_hand_computed_values():
    # true A A B B C C, predicted A B B B C A; class D never occurs.
    m = task_metrics([0, 0, 1, 1, 2, 2], one_hot_probs([0, 1, 1, 1, 2, 0], 4), ["A", "B", "C", "D"])
    assert m["n"] == 6
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["balanced_accuracy"] == pytest.approx((1 / 2 + 2 / 2 + 1 / 2) / 3)  # recall over A, B, C
    # F1: A = 0.5 (P 1/2, R 1/2), B = 0.8 (P 2/3, R 1), C = 2/3 (P 1, R 1/2); D is in neither, so not averaged.
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert m["per_class"]["B"] == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2})
    assert m["per_class"]["C"]["precision"] == 1.0 and m["per_class"]["C"]["recall"] == 0.5
    assert m["per_class"]["D"] == {"precision": None, "recall": None, "f1": None, "support": 0}
    assert m["confusion_matrix"] == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    json.dumps(m)  # JSON-ready: no numpy scalars, no NaN


def test_cancer_metrics_match_hand_computed_values():
    # Malignant = 1. p(Malignant) 0.9 0.8 0.7 0.3 | 0.6 0.2 -> predicted M M M B | M B: TP 3, FN 1, FP 1, TN 1.
    y_true = [1, 1, 1, 1, 0, 0]
    p_malignant = np.array([0.9, 0.8, 0.7, 0.3, 0.6, 0.2])
    m = cancer_metrics(y_true, np.stack([1 - p_malignant, p_malignant], axis=1), ["Benign", "Malignant"])
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["sensitivity"] == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(1 / 2)
    assert m["balanced_accuracy"] == pytest.approx((3 / 4 + 1 / 2) / 2)
    assert m["macro_f1"] == pytest.approx((3 / 4 + 1 / 2) / 2)  # F1 Malignant 0.75, Benign 0.5
    # AUC: of the 4 x 2 (malignant, benign) pairs, only (0.3, 0.6) is ranked the wrong way round.
    assert m["roc_auc"] == pytest.approx(7 / 8)
    assert m["confusion_matrix"] == [[1, 1], [1, 3]]
    assert m["positive_label"] == "Malignant" and m["notes"] == []


def test_cancer_metrics_with_one_class_only_give_null_auc_and_a_note():
    m = cancer_metrics([1, 1, 1], one_hot_probs([1, 0, 1], 2), ["Benign", "Malignant"])
    assert m["roc_auc"] is None and m["specificity"] is None
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert any("no Benign images" in note for note in m["notes"])
    assert m["confusion_matrix"] == [[0, 0], [1, 2]]
    m = cancer_metrics([0, 0], one_hot_probs([0, 0], 2), ["Benign", "Malignant"])
    assert m["roc_auc"] is None and m["sensitivity"] is None and m["specificity"] == 1.0
    assert any("no Malignant images" in note for note in m["notes"])


def test_per_organ_accuracy_uses_the_true_organ():
    table = per_organ_accuracy(organ_true=[0, 0, 1, 1, 1], cancer_true=[1, 0, 1, 1, 0],
                               cancer_pred=[1, 1, 1, 0, 0], organ_labels=["Blood", "Brain", "Lung"])
    assert list(table) == ["Blood", "Brain"]  # absent organs are not listed
    assert table["Blood"] == {"n": 2, "n_malignant": 1, "accuracy": 0.5, "sensitivity": 1.0, "specificity": 0.0}
    assert table["Brain"]["accuracy"] == pytest.approx(2 / 3)
    assert table["Brain"]["sensitivity"] == 0.5 and table["Brain"]["specificity"] == 1.0


def test_metric_functions_reject_mismatched_inputs():
    with pytest.raises(ValueError, match="shape"):
        task_metrics([0, 1], np.zeros((3, 2)), ["a", "b"])
    with pytest.raises(ValueError, match="label ids"):
        task_metrics([0, 2], np.zeros((2, 2)), ["a", "b"])
    with pytest.raises(ValueError, match="Malignant"):
        cancer_metrics([0, 1], np.zeros((2, 2)), ["no", "yes"])


def test_figures_are_small_labelled_pngs(tmp_path):
    matrix = task_metrics([0, 1, 2, 3], one_hot_probs([0, 1, 1, 3], 9), ORGAN_LABELS)["confusion_matrix"]
    path = confusion_figure(matrix, ORGAN_LABELS, tmp_path / "cm.png", title="organ")  # 5 empty rows: no crash
    roc = roc_figure([1, 0, 1, 0], [0.9, 0.1, 0.4, 0.6], tmp_path / "roc.png", title="roc", auc=0.75)
    for png in (path, roc):
        assert 0 < png.stat().st_size < MAX_PNG_BYTES
        with Image.open(png) as im:
            assert im.format == "PNG" and im.width >= 300
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cm.png", "roc.png"]  # no temporary files left


# ----------------------------------------------------------------------------------------------- a run


@pytest.mark.filterwarnings("ignore:Your input ran out of data")  # Keras' note at the end of a finite dataset
def test_evaluate_run_on_its_test_split(joint_run, demo_split_csv, tmp_path):
    import keras
    from conftest import IMAGE_SIZE

    from multitask.data import make_dataset
    from multitask.splits import load_split

    metrics = evaluate_run(joint_run, out=tmp_path)
    test = load_split(demo_split_csv).query("split == 'test'").reset_index(drop=True)
    assert metrics["n_images"] == len(test) and metrics["source"]["split"] == "test"
    assert metrics["organ"]["accuracy"] > 0.5 and metrics["cancer"]["balanced_accuracy"] > 0.6  # chance: 0.11, 0.5

    # The same numbers from the model run independently through the training input pipeline: organ by argmax,
    # cancer at the run's operating point on the temperature-scaled P(Malignant).
    model = keras.models.load_model(joint_run / "model.keras")
    logits = model.predict(make_dataset(test, image_size=IMAGE_SIZE, batch_size=16, with_labels=False), verbose=0)
    expected = np.mean(logits["organ"].argmax(axis=1) == test["organ_id"].to_numpy())
    assert metrics["organ"]["accuracy"] == pytest.approx(expected)
    calibration = json.loads((joint_run / "config.json").read_text())["calibration"]
    scaled = logits["cancer"] / calibration["temperatures"]["cancer"]
    p_malignant = np.exp(scaled[:, 1]) / np.exp(scaled).sum(axis=1)
    threshold = calibration["malignancy_threshold"]
    assert metrics["cancer"]["threshold"] == pytest.approx(threshold)
    decided = (p_malignant >= threshold).astype(int)
    assert metrics["cancer"]["accuracy"] == pytest.approx(np.mean(decided == test["cancer_id"].to_numpy()))
    malignant = test["cancer_id"].to_numpy() == 1
    assert metrics["cancer"]["sensitivity"] == pytest.approx(decided[malignant].mean())
    assert metrics["cancer"]["at_0.5"]["sensitivity"] == pytest.approx((p_malignant[malignant] >= 0.5).mean())
    # every headline number has its interval, and the interval holds the number
    for task in ("organ", "cancer"):
        for key in ("accuracy", "balanced_accuracy", "macro_f1", "ece", "ece_uncalibrated", "brier"):
            lo, hi = metrics[task]["ci95"][key]
            assert lo <= metrics[task][key] + 1e-9 and metrics[task][key] <= hi + 1e-9, (task, key)
    assert sum(map(sum, metrics["organ"]["confusion_matrix"])) == len(test)
    assert sum(v["n"] for v in metrics["cancer"]["per_organ"].values()) == len(test)
    # the OOD rate: the share of evaluated images above the run's threshold, with its interval
    ood = metrics["ood"]
    assert ood["threshold"] == pytest.approx(json.loads((joint_run / "config.json").read_text())["ood"]["threshold"])
    assert ood["fraction"] == pytest.approx(ood["n_flagged"] / len(test))
    assert ood["ci95"]["fraction"][0] <= ood["fraction"] <= ood["ci95"]["fraction"][1]

    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["cancer"]["roc_auc"] == pytest.approx(metrics["cancer"]["roc_auc"])
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc", "sensitivity", "specificity"):
        assert isinstance(on_disk["cancer"][key], float)
    report = (tmp_path / "report.md").read_text()
    for png in ("confusion_organ.png", "confusion_cancer.png", "roc_cancer.png", "reliability_organ.png",
                "reliability_cancer.png"):
        assert f"]({png})" in report
        assert (tmp_path / png).stat().st_size < MAX_PNG_BYTES
    assert "| Mouth |" in report and "sensitivity" in report
    lo, hi = metrics["organ"]["ci95"]["accuracy"]
    assert f"| accuracy | {metrics['organ']['accuracy']:.3f} ({lo:.3f}-{hi:.3f}) |" in report
    card = (tmp_path / "MODEL_CARD.md").read_text()
    for section in ("## Model details", "## Intended use", "## Training data", "## Labels", "## Metrics",
                    "## Known limitations"):
        assert section in card
    assert "not for clinical decisions" in card.lower() or "clinical decisions without" in card
    assert f"{threshold:.3f}" in card and "brain_menin" in card
    rows = pd.read_csv(tmp_path / "eval_predictions.csv")
    assert len(rows) == len(test) and (rows["true_organ"] == test["organ"]).all()
    assert not (joint_run / "metrics.json").exists()  # --out was honoured


def test_evaluate_cli_on_an_external_folder_with_bad_files(joint_run, tmp_path, capsys):
    from multitask.synthetic import BAD_FILE_NAMES, generate

    data = generate(tmp_path / "external", per_class=2, size=96, seed=7, with_bad_files=True)
    stray = data / "Multi Cancer" / "Multi Cancer" / "Other" / "not_a_subclass"
    stray.mkdir(parents=True)
    Image.new("RGB", (96, 96)).save(stray / "x.jpg")

    assert cli.main(["evaluate", str(joint_run), "--data", str(data), "--out", str(tmp_path / "ext")]) == 0
    metrics = json.loads((tmp_path / "ext" / "metrics.json").read_text())
    assert metrics["source"]["kind"] == "folder"
    assert metrics["n_images"] == 26 * 2 + 1  # the PNG named .jpg is readable and counted
    unreadable = {path.rsplit("/", 1)[-1]: why for path, why in metrics["unreadable"].items()}
    assert sorted(unreadable) == sorted(BAD_FILE_NAMES[k] for k in ("empty", "text", "truncated"))
    assert unreadable[BAD_FILE_NAMES["empty"]] == "empty file (0 bytes)"
    assert "truncated" in unreadable[BAD_FILE_NAMES["truncated"]]
    assert list(metrics["source"]["skipped_folders"].values()) == [1]
    assert metrics["organ"]["n"] == metrics["cancer"]["n"] == 53
    out = capsys.readouterr().out
    assert "evaluated 53 images" in out and BAD_FILE_NAMES["empty"] in out and "roc_auc" in out


def test_evaluate_a_single_class_folder_and_a_single_task_run(joint_run, cancer_run, demo_data, tmp_path):
    only = tmp_path / "benign_blood" / "all_benign"
    shutil.copytree(next(demo_data.rglob("all_benign")), only)
    metrics = evaluate_run(joint_run, data=only.parent, out=tmp_path / "one")
    assert metrics["cancer"]["roc_auc"] is None and metrics["cancer"]["sensitivity"] is None
    assert any("Malignant" in note for note in metrics["cancer"]["notes"])
    assert "roc_curve" not in metrics["cancer"]["figures"] and not (tmp_path / "one" / "roc_cancer.png").exists()
    assert np.shape(metrics["organ"]["confusion_matrix"]) == (9, 9)  # absent organs keep their row and column
    assert "> note: no Malignant images" in (tmp_path / "one" / "report.md").read_text()

    single = evaluate_run(cancer_run, out=tmp_path / "single")
    assert single["tasks"] == ["cancer"] and "organ" not in single and "per_organ" in single["cancer"]
    assert list(summary_table(single).index) == ["cancer"]


def test_evaluate_refuses_an_unfinished_run(tmp_path, capsys):
    (tmp_path / "model.keras").write_bytes(b"")
    assert cli.main(["evaluate", str(tmp_path)]) == 2
    assert "config.json is missing" in capsys.readouterr().err


def test_report_and_model_card_say_what_was_done(joint_run, demo_data, tmp_path, capsys):
    """Issue 20, on a copy of the session's joint run whose cancer head kept T = 1 (item 7): the report says which
    head is calibrated and why the other is not; small groups get exact binomial intervals, never a collapsed
    "1.000 (1.000-1.000)" (item 8); the card's Root is the data, not the split CSV (item 6), and it does not call
    an audit that never ran "none found" (item 4); the printed table has "-" and one reason, no NaN (item 10)."""
    import re

    from multitask.bootstrap import proportion_interval

    run = shutil.copytree(joint_run, tmp_path / "run")
    config = json.loads((run / "config.json").read_text())
    note = ("not calibrated (T = 1): the fitted temperature 1.3 did not lower the validation ECE (0.071 -> 0.102), "
            "so the raw probabilities are kept")
    config["calibration"]["temperatures"]["cancer"] = 1.0
    config["calibration"]["notes"] = {"cancer": note}
    heads_rate = config["settings"]["learning_rate"]
    assert config["settings"]["fine_tune_learning_rate"] == heads_rate * FINE_TUNE_LR_FACTOR  # resolved when trained
    config["settings"]["fine_tune_learning_rate"] = None  # as a config.json from before: it meant a tenth
    (run / "config.json").write_text(json.dumps(config))

    assert cli.main(["evaluate", str(run), "--out", str(tmp_path / "eval")]) == 0
    printed = capsys.readouterr().out
    assert "NaN" not in printed and printed.count("-: not defined for this head") == 1
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "Probabilities are calibrated (temperature-scaled) for the organ head." in report
    assert f"The cancer head is {note}." in report and "per head)" not in report
    assert metrics["cancer"]["temperature"] == 1.0 and metrics["cancer"]["calibration_note"] == note

    assert "exact (Clopper-Pearson)" in report and not re.search(r"\((\d\.\d{3})-\1\)", report)
    matrix = np.asarray(metrics["organ"]["confusion_matrix"])
    for k, label in enumerate(metrics["organ"]["labels"]):
        if 0 < matrix[k].sum() < 20:  # a small class: its recall's interval is the exact one
            assert metrics["organ"]["per_class"][label]["ci95"]["recall"] == pytest.approx(
                proportion_interval(int(matrix[k, k]), int(matrix[k].sum())))

    card = (tmp_path / "eval" / "MODEL_CARD.md").read_text()
    assert "none found" not in card and "**Leakage audit:** not run" in card
    root = re.search(r"\*\*Root:\*\* `([^`]*)`", card).group(1)
    assert not root.endswith(".csv") and Path(root).is_dir() and Path(root).is_relative_to(demo_data)
    assert f"The cancer head is {note}." in card
    assert f"from `mixed7` at learning rate {heads_rate / 10:g};" in card
