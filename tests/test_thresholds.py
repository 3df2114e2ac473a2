"""Per-organ operating points (issue 22): chosen on validation by the stated rule, stored in config.json, and used by
the PREDICTED organ in predict, serve, evaluate and the ONNX export's labels.json; evaluate flags weak organs.

The end-to-end tests plant distinct thresholds in a copy of the session's joint run (0.0 for some organs, so every
image predicted as one of them is Malignant; 1.0 for others, so none is; the global one for the rest), so the
decision provably follows the predicted organ's threshold.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from multitask import cli
from multitask.calibration import (
    MIN_ORGAN_CLASS_IMAGES,
    ORGAN_THRESHOLD_RULE,
    choose_threshold,
    fit_calibration,
    organ_thresholds,
    softmax,
)
from multitask.engines import Engine
from multitask.errors import RunError
from multitask.predict import Predictor
from multitask.rundir import open_run
from multitask.splits import load_split
from multitask.taxonomy import ORGAN_LABELS

ALWAYS = ("Blood", "Brain", "Breast", "Cervix")  # planted threshold 0.0: every image predicted so is Malignant
NEVER = ("Colon", "Kidney", "Lung")  # planted threshold 1.0: (practically) none is
FALLBACK = ("Lymph", "Mouth")  # the global threshold, as for an organ with too few validation images


# ----------------------------------------------------------------------------------------------- the rule


def test_each_organ_gets_its_own_threshold_or_the_global_one_by_the_rule():
    step = np.arange(10) * 0.05
    lung_malignant, lung_benign = 0.50 + step, step  # 10 and 10: exactly enough
    brain_malignant = 0.30 + np.arange(12) * 0.05  # 12 malignant, 10 benign: its own threshold too
    kidney_malignant = np.array([0.1, 0.2, 0.3, 0.45, 0.5, 0.6, 0.7, 0.8, 0.9])  # 9 malignant: too few
    blood_malignant = np.linspace(0.2, 0.9, 15)  # one class only
    scores = np.concatenate([lung_malignant, lung_benign, brain_malignant, step, kidney_malignant, step * 0.5,
                             step * 0.5, step * 0.5, blood_malignant])
    truth = np.concatenate([np.ones(10), np.zeros(10), np.ones(12), np.zeros(10), np.ones(9), np.zeros(30),
                            np.ones(15)]).astype(bool)
    organs = ["Lung"] * 20 + ["Brain"] * 22 + ["Kidney"] * 39 + ["Blood"] * 15
    table = organ_thresholds(scores, truth, organs, target_sensitivity=0.9, global_threshold=0.42,
                             labels=ORGAN_LABELS)

    assert list(table) == list(ORGAN_LABELS)  # every organ of the run, present or not
    # 9 of 10 malignant at >= t: the second-lowest malignant score; 11 of 12 (0.9 * 12 = 10.8): the second-lowest
    assert table["Lung"] == {"threshold": lung_malignant[1], "source": "organ", "n_malignant": 10, "n_benign": 10,
                             "val_sensitivity": 0.9, "val_specificity": 1.0}
    assert table["Brain"]["threshold"] == brain_malignant[1] and table["Brain"]["source"] == "organ"
    # too few malignant, one class only, no images at all: the global threshold, exactly as given
    assert table["Kidney"] == {"threshold": 0.42, "source": "global", "n_malignant": 9, "n_benign": 30,
                               "val_sensitivity": 6 / 9, "val_specificity": 1.0}
    assert table["Blood"]["source"] == "global" and table["Blood"]["val_specificity"] is None
    assert table["Blood"]["val_sensitivity"] == pytest.approx(np.mean(blood_malignant >= 0.42))
    assert table["Mouth"] == {"threshold": 0.42, "source": "global", "n_malignant": 0, "n_benign": 0,
                              "val_sensitivity": None, "val_specificity": None}
    # one malignant image fewer and Lung falls back too: the rule's boundary is >= 10 of each class
    fewer = organ_thresholds(scores[1:], truth[1:], organs[1:], target_sensitivity=0.9, global_threshold=0.42)
    assert fewer["Lung"]["source"] == "global" and fewer["Lung"]["n_malignant"] == MIN_ORGAN_CLASS_IMAGES - 1
    assert "at least 10 malignant and 10 benign" in ORGAN_THRESHOLD_RULE


def test_fit_calibration_stores_the_per_organ_table_beside_the_global_threshold():
    rng = np.random.default_rng(0)
    organ_ids = np.repeat([0, 6], [40, 24])  # Blood 20/20 (its own threshold), Lung 12/12 (too)
    cancer_ids = np.tile([0, 1], 32)
    cancer_logits = np.stack([np.zeros(64), 2.0 * cancer_ids - 1 + rng.normal(0, 1.0, 64)], axis=1)
    cancer_logits[organ_ids == 6, 1] += 1.5  # Lung's malignancy scores run higher: its own threshold is higher
    organ_logits = np.eye(9)[organ_ids] * 4 + rng.normal(0, 0.1, (64, 9))
    record = fit_calibration({"organ": organ_logits, "cancer": cancer_logits},
                             {"organ": organ_ids, "cancer": cancer_ids}, tasks=("organ", "cancer"),
                             target_sensitivity=0.9, organ_labels=ORGAN_LABELS)
    table = record["malignancy_thresholds"]
    assert record["organ_threshold_rule"] == ORGAN_THRESHOLD_RULE and list(table) == list(ORGAN_LABELS)
    p_malignant = softmax(cancer_logits, record["temperatures"]["cancer"])[:, 1]
    assert record["malignancy_threshold"] == choose_threshold(p_malignant, cancer_ids == 1, target_sensitivity=0.9)
    lung = organ_ids == 6
    assert table["Lung"]["source"] == "organ"
    assert table["Lung"]["threshold"] == choose_threshold(p_malignant[lung], cancer_ids[lung] == 1,
                                                          target_sensitivity=0.9)
    assert table["Lung"]["threshold"] > record["malignancy_threshold"]
    assert table["Kidney"] == {"threshold": record["malignancy_threshold"], "source": "global", "n_malignant": 0,
                               "n_benign": 0, "val_sensitivity": None, "val_specificity": None}
    json.dumps(record)  # config.json-ready
    # a single-task cancer run has no organ head: the global threshold only
    single = fit_calibration({"cancer": cancer_logits}, {"cancer": cancer_ids}, tasks=("cancer",),
                             target_sensitivity=0.9)
    assert "malignancy_thresholds" not in single and single["malignancy_threshold"] is not None


# ----------------------------------------------------------------------------------------------- the predictor


class FixedEngine(Engine):
    """An engine that is never called: Predictor.table is fed outputs directly."""

    name, image_size = "fixed", 75

    def __init__(self, output_names):
        self.output_names = tuple(output_names)


def test_the_predicted_organs_threshold_decides_each_row():
    organ = np.eye(9)[[5, 6, 5, 0]] * 0.9 + 0.1 / 9  # Kidney, Lung, Kidney, (unreadable)
    p_malignant = np.array([0.3, 0.3, 0.1, np.nan])
    outputs = {"organ": organ, "cancer": np.stack([1 - p_malignant, p_malignant], axis=1)}
    labels = {"organ": ORGAN_LABELS, "cancer": ("Benign", "Malignant")}
    predictor = Predictor(FixedEngine(["organ", "cancer"]), labels=labels, threshold=0.5,
                          organ_thresholds={"Kidney": 0.2}, threshold_source="global")
    frame = predictor.table(["a", "b", "c", "d"], outputs, [None, None, None, "broken"])
    assert frame["malignancy_threshold"].tolist() == [0.2, 0.5, 0.2, 0.5]
    assert frame["threshold_source"].tolist() == ["organ", "global", "organ", "global"]
    assert frame["cancer"].tolist()[:3] == ["Malignant", "Benign", "Benign"]
    # a single-task cancer run has no organ head: its own table, if any, is ignored
    single = Predictor(FixedEngine(["cancer"]), labels=labels, threshold=0.5, organ_thresholds={"Kidney": 0.2})
    assert single.organ_thresholds == {}
    answer = single.table(["a"], {"cancer": outputs["cancer"][:1]}, [None])
    assert answer[["malignancy_threshold", "threshold_source", "cancer"]].values.tolist() == [[0.5, "global",
                                                                                              "Benign"]]


# ----------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def planted_run(joint_run, tmp_path_factory):
    """A copy of joint_run whose config holds distinct per-organ thresholds (see the module docstring)."""
    run = shutil.copytree(joint_run, tmp_path_factory.mktemp("thresholds") / "run")
    shutil.rmtree(run / "export", ignore_errors=True)  # an export made before would carry the old table
    config = json.loads((run / "config.json").read_text())
    calibration = config["calibration"]
    table = {}
    for organ in ORGAN_LABELS:
        threshold = 0.0 if organ in ALWAYS else 1.0 if organ in NEVER else calibration["malignancy_threshold"]
        table[organ] = {"threshold": threshold, "source": "global" if organ in FALLBACK else "organ",
                        "n_malignant": 12, "n_benign": 12, "val_sensitivity": 1.0, "val_specificity": 0.5}
    calibration["malignancy_thresholds"] = table
    (run / "config.json").write_text(json.dumps(config))
    return run


def planted_threshold(run, organ: str) -> float:
    return open_run(run).organ_thresholds[organ]["threshold"]


def assert_decided_by_predicted_organ(frame: pd.DataFrame, run) -> None:
    info = open_run(run)
    expected = frame["organ"].map(lambda organ: info.organ_thresholds[organ]["threshold"])
    sources = frame["organ"].map(lambda organ: "global" if organ in FALLBACK else "organ")
    assert np.allclose(frame["malignancy_threshold"], expected) and (frame["threshold_source"] == sources).all()
    malignant = frame["p_cancer_Malignant"] >= frame["malignancy_threshold"]
    assert (frame["cancer"] == np.where(malignant, "Malignant", "Benign")).all()
    assert (frame.loc[frame["organ"].isin(ALWAYS), "cancer"] == "Malignant").all()
    assert set(frame["threshold_source"]) == {"organ", "global"} or not frame["organ"].isin(FALLBACK).any()


def test_predict_decides_with_the_predicted_organs_threshold(planted_run, tmp_path, capsys):
    test = load_split(planted_run / "split.csv").query("split == 'test'")
    out = tmp_path / "predictions.csv"
    assert cli.main(["predict", str(planted_run), *test["path"], "--out", str(out)]) == 0
    frame = pd.read_csv(out)
    assert frame["organ"].isin(ALWAYS).any() and frame["organ"].isin(NEVER).any()  # distinct thresholds exercised
    assert_decided_by_predicted_organ(frame, planted_run)
    assert "except where the predicted organ has its own threshold" in capsys.readouterr().out

    given = Predictor.from_run(planted_run, threshold=0.5).predict_files(test["path"].tolist()[:6])
    assert (given["malignancy_threshold"] == 0.5).all() and (given["threshold_source"] == "given").all()

    config = json.loads((planted_run / "config.json").read_text())
    del config["calibration"]["malignancy_thresholds"]  # a run trained before per-organ thresholds
    old = shutil.copytree(planted_run, tmp_path / "old")
    (old / "config.json").write_text(json.dumps(config))
    assert open_run(old).organ_thresholds == {}
    before = Predictor.from_run(old).predict_files(test["path"].tolist()[:6])
    assert (before["malignancy_threshold"] == config["calibration"]["malignancy_threshold"]).all()
    assert (before["threshold_source"] == "global").all()


def test_a_damaged_per_organ_table_is_refused(planted_run, tmp_path):
    for bad in ({"Kidney": {"threshold": 1.5}}, {"Pancreas": {"threshold": 0.3}}, {"Kidney": 0.3}):
        run = shutil.copytree(planted_run, tmp_path / f"bad{len(list(tmp_path.iterdir()))}",
                              ignore=shutil.ignore_patterns("model.keras", "cache", "logs"))
        config = json.loads((run / "config.json").read_text())
        config["calibration"]["malignancy_thresholds"] = bad
        (run / "config.json").write_text(json.dumps(config))
        with pytest.raises(RunError, match="malignancy_thresholds"):
            open_run(run)


def test_serve_answers_with_the_predicted_organs_threshold(planted_run, demo_data):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from multitask.serve.app import create_app

    files = sorted(demo_data.rglob("*.jpg"))
    chosen = [next(f for f in files if f.parent.name == s) for s in ("all_benign", "lung_aca", "oral_normal")]
    with TestClient(create_app(planted_run), base_url="http://127.0.0.1") as client:
        response = client.post("/predict", files=[("files", (f.name, f.read_bytes(), "image/jpeg")) for f in chosen])
    assert response.status_code == 200
    for answer in response.json()["results"]:
        assert answer["malignancy_threshold"] == pytest.approx(planted_threshold(planted_run, answer["organ"]))
        assert answer["threshold_source"] == ("global" if answer["organ"] in FALLBACK else "organ")
        assert answer["cancer"] == ("Malignant" if answer["malignant_prob"] >= answer["malignancy_threshold"]
                                    else "Benign")


def test_evaluate_uses_the_per_organ_thresholds_and_flags_the_weak_organs(planted_run, tmp_path, capsys):
    out = tmp_path / "eval"
    assert cli.main(["evaluate", str(planted_run), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    cancer = metrics["cancer"]
    rows = pd.read_csv(out / "eval_predictions.csv")
    assert_decided_by_predicted_organ(rows, planted_run)
    truth = rows["true_cancer"] == "Malignant"
    called = rows["cancer"] == "Malignant"
    assert cancer["sensitivity"] == pytest.approx(called[truth].mean())
    global_threshold = open_run(planted_run).malignancy_threshold
    at_global = rows["p_cancer_Malignant"] >= global_threshold
    assert cancer["at_global"]["sensitivity"] == pytest.approx(at_global[truth].mean())
    assert {o: r["threshold"] for o, r in cancer["organ_thresholds"].items()} == {
        o: planted_threshold(planted_run, o) for o in ORGAN_LABELS}

    target = cancer["target_sensitivity"]
    expected_weak = []
    for organ, row in cancer["per_organ"].items():  # per TRUE organ, at the operating point and the global one
        mine = rows["true_organ"] == organ
        if not (mine & truth).any():
            assert row["sensitivity"] is None and row["at_global"]["sensitivity"] is None and not row["below_target"]
            continue
        sensitivity = called[mine & truth].mean()
        assert row["sensitivity"] == pytest.approx(sensitivity)
        assert row["at_global"]["sensitivity"] == pytest.approx(at_global[mine & truth].mean())
        assert row["threshold"] == planted_threshold(planted_run, organ)
        lo, hi = row["ci95"]["sensitivity"]
        assert 0 <= lo <= sensitivity <= hi <= 1 and hi - lo > 0.1  # a handful of images: a wide exact interval
        if sensitivity < target:
            expected_weak.append(organ)
        assert row["below_target"] == (sensitivity < target)
    assert cancer["organs_below_target"] == expected_weak
    assert set(expected_weak) & set(NEVER)  # the planted weak organs are caught ...
    assert not set(expected_weak) & set(ALWAYS)  # ... and the ones that call everything Malignant are not

    report = (out / "report.md").read_text()
    card = (out / "MODEL_CARD.md").read_text()
    for organ in expected_weak:
        assert any(line.startswith(f"| {organ} |") and line.endswith("**below target** |")
                   for line in report.splitlines())
        assert organ in report.split("**Below target**")[1] and organ in card.split("Below the target sensitivity")[1]
        assert organ in printed.split("sensitivity below the target")[1]
    assert "sensitivity at global" in report and "Per-organ thresholds, applied by the PREDICTED organ" in card


def test_the_exports_labels_json_lets_a_client_decide_per_organ(planted_run):
    """labels.json (written beside every export, ONNX included) carries the per-organ table; a client that has only
    the exported probabilities and labels.json decides as `multitask predict` does. (The ONNX file's probabilities
    equal the Keras model's within 1e-4: test_export checks that, so no second ONNX conversion here.)"""
    from multitask.export import labels_record, run_inference_model

    info = open_run(planted_run)
    labels = json.loads(json.dumps(labels_record(info, run_inference_model(info))))  # as written to labels.json
    assert labels["malignancy_thresholds"] == {
        organ: {"threshold": planted_threshold(planted_run, organ), "source": "global" if organ in FALLBACK
                else "organ"} for organ in ORGAN_LABELS}
    assert "malignancy_thresholds[predicted organ]" in labels["outputs"]
    test = load_split(planted_run / "split.csv").query("split == 'test'")["path"].tolist()
    frame = Predictor.from_run(info).predict_files(test)
    probs = frame[[f"p_organ_{o}" for o in labels["organ_labels"]]].to_numpy()
    organ = np.asarray(labels["organ_labels"])[probs.argmax(axis=1)]
    client_threshold = [labels["malignancy_thresholds"][o]["threshold"] for o in organ]
    client = np.where(frame["p_cancer_Malignant"] >= client_threshold, "Malignant", "Benign")
    assert (client == frame["cancer"]).all() and np.allclose(frame["malignancy_threshold"], client_threshold)


# ----------------------------------------------------------------------------------------------- the real sample


def test_every_organ_of_the_real_run_has_its_threshold_or_falls_back_by_the_rule(real_run):
    info = open_run(real_run)
    table, target = info.organ_thresholds, info.calibration["target_sensitivity"]
    assert list(table) == list(info.labels["organ"])
    val = load_split(info.split_path).query("split == 'val'")
    for organ, row in table.items():
        mine = val[val["organ"] == organ]
        n_malignant, n_benign = int((mine["cancer"] == "Malignant").sum()), int((mine["cancer"] == "Benign").sum())
        assert (row["n_malignant"], row["n_benign"]) == (n_malignant, n_benign), organ
        own = min(n_malignant, n_benign) >= MIN_ORGAN_CLASS_IMAGES
        assert row["source"] == ("organ" if own else "global"), organ
        assert 0.0 <= row["threshold"] <= 1.0
        if own:  # chosen on the organ's own validation images: it reaches the target there
            assert row["val_sensitivity"] >= target, organ
        else:
            assert row["threshold"] == info.malignancy_threshold, organ
    print({organ: (round(row["threshold"], 4), row["source"], row["n_malignant"], row["n_benign"],
                   row["val_sensitivity"]) for organ, row in table.items()})
