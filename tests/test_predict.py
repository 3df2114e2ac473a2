"""Predictor: files, folders and globs in; one row per file out; unreadable files reported, not fatal."""

from __future__ import annotations

import io
import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from multitask import cli
from multitask.data import load_image
from multitask.predict import Predictor, collect_images, probability_column, sample_predictions
from multitask.splits import load_split
from multitask.synthetic import BAD_FILE_NAMES, generate
from multitask.taxonomy import CANCER_LABELS, ORGAN_LABELS, load_taxonomy

JOINT_COLUMNS = (
    ["path", "organ", "organ_prob", "cancer", "malignant_prob", "malignancy_threshold", "threshold_source",
     "ood_score", "ood", "note"]
    + [f"p_organ_{label}" for label in ORGAN_LABELS]
    + ["p_cancer_Benign", "p_cancer_Malignant", "cancer_prob", "error"]
)


@pytest.fixture(scope="module")
def predictor(joint_run) -> Predictor:
    return Predictor.from_run(joint_run)


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory):
    """Two images per subclass plus the planted bad files (empty, truncated, text, PNG named .jpg, notes.txt)."""
    return generate(tmp_path_factory.mktemp("mixed"), per_class=2, size=96, seed=3, with_bad_files=True)


def by_name(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.set_index(frame["path"].map(os.path.basename))


def test_predict_cli_on_a_folder_with_bad_files(joint_run, mixed_folder, tmp_path, capsys):
    out = tmp_path / "predictions.csv"
    assert cli.main(["predict", str(joint_run), str(mixed_folder), "--out", str(out), "--batch-size", "8"]) == 0
    frame = pd.read_csv(out, keep_default_na=False, na_values=[""])
    assert list(frame.columns) == JOINT_COLUMNS
    assert len(frame) == 26 * 2 + 4  # notes.txt is not an image file
    rows = by_name(frame)
    for kind in ("empty", "truncated", "text"):
        bad = rows.loc[BAD_FILE_NAMES[kind]]
        assert isinstance(bad["error"], str) and pd.isna(bad["organ"]) and pd.isna(bad["p_cancer_Malignant"])
    assert rows.loc[BAD_FILE_NAMES["empty"], "error"] == "empty file (0 bytes)"
    good = frame[frame["error"].isna()]
    assert len(good) == 26 * 2 + 1  # the PNG named .jpg decodes by content
    assert set(good["organ"]) <= set(ORGAN_LABELS) and set(good["cancer"]) <= set(CANCER_LABELS)
    assert "predicted 53 of 56 file(s); 3 unreadable" in capsys.readouterr().out


def test_cli_table_shows_p_malignant_and_the_threshold_and_dashes_for_missing(joint_run, mixed_folder, tmp_path,
                                                                               capsys):
    """Issue 20: the table showed the decided class's probability ("Malignant 0.434" next to "Benign 0.432") and
    printed NaN for unreadable files. Now P(Malignant) beside the threshold that decided, and "-" said once why."""
    folder = tmp_path / "in"  # file names without spaces, so the printed columns split on whitespace
    folder.mkdir()
    for i, image in enumerate(sorted(mixed_folder.rglob("*_0001.jpg"))[:4]):
        shutil.copy(image, folder / f"image{i}.jpg")
    shutil.copy(next(mixed_folder.rglob(BAD_FILE_NAMES["empty"])), folder / BAD_FILE_NAMES["empty"])
    assert cli.main(["predict", str(joint_run), str(folder)]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines[0].split()
    assert header[:6] == ["path", "organ", "organ_prob", "cancer", "malignant_prob", "malignancy_threshold"]
    assert "cancer_prob" not in header and "NaN" not in "\n".join(lines) and "None" not in "\n".join(lines)
    empty = next(line for line in lines if BAD_FILE_NAMES["empty"] in line)
    assert empty.split()[1:5] == ["-"] * 4  # no organ, probability, answer, P(Malignant); the threshold stays
    assert sum(line.startswith("-: no value") for line in lines) == 1
    good = next(line.split() for line in lines[1:] if ".jpg" in line and "-" not in line.split()[1:6])
    assert good[3] == ("Malignant" if float(good[4]) >= float(good[5]) else "Benign")


def test_probabilities_sum_to_one_and_answer_at_the_operating_point(predictor, joint_run, mixed_folder):
    frame = predictor.predict([mixed_folder])
    good = frame[frame["error"].isna()]
    for task, labels in predictor.labels.items():
        columns = [probability_column(task, label) for label in labels]
        np.testing.assert_allclose(good[columns].to_numpy().sum(axis=1), 1.0, atol=1e-5)
    organ = good[[probability_column("organ", label) for label in ORGAN_LABELS]].to_numpy()
    assert (good["organ"] == np.asarray(ORGAN_LABELS)[organ.argmax(axis=1)]).all()
    np.testing.assert_allclose(good["organ_prob"], organ.max(axis=1))
    # cancer: Malignant when P(Malignant) reaches the run's threshold (chosen on validation), not at 0.5
    threshold = json.loads((joint_run / "config.json").read_text())["calibration"]["malignancy_threshold"]
    assert predictor.threshold == pytest.approx(threshold) and (good["malignancy_threshold"] == threshold).all()
    malignant = good["p_cancer_Malignant"].to_numpy()
    assert (good["cancer"] == np.where(malignant >= threshold, "Malignant", "Benign")).all()
    np.testing.assert_allclose(good["cancer_prob"], np.where(malignant >= threshold, malignant, 1 - malignant))
    np.testing.assert_allclose(good["malignant_prob"], malignant)  # P(Malignant) whatever the answer
    table = load_taxonomy().table.set_index("subclass")
    truth = good["path"].map(lambda p: table.loc[p.split(os.sep)[-2], "organ"])  # from the subclass folder
    assert np.mean(good["organ"] == truth) > 0.5  # the trained model is well above chance (0.11)


def test_predictions_do_not_depend_on_batching_around_failed_files(predictor, mixed_folder):
    """Dropped files shift the rest of a batch; every row must still get its own image's probabilities."""
    files = collect_images([mixed_folder])
    big = predictor.predict_files(files, batch_size=64)
    small = predictor.predict_files(files, batch_size=3)
    pd.testing.assert_frame_equal(big, small, atol=1e-4, check_exact=False)
    assert predictor.engine.forward.experimental_get_tracing_count() == 1  # no retracing for a new batch size
    good = big["error"].isna().to_numpy()
    images = np.stack([load_image(path, predictor.image_size).numpy() for path in np.asarray(files)[good]])
    direct = predictor.predict_arrays(images)
    np.testing.assert_allclose(direct["organ"], big.loc[good, [f"p_organ_{x}" for x in ORGAN_LABELS]], atol=1e-4)


def test_python_api(predictor, joint_run, mixed_folder):
    import keras

    assert isinstance(predictor.model, keras.Model) and predictor.tasks == ("organ", "cancer")
    assert predictor.image_size == 75
    one = next(mixed_folder.rglob("lung_aca_0001.jpg"))
    frame = predictor.predict([one, str(one.parent / "*_0002.jpg")])
    assert list(frame.columns) == JOINT_COLUMNS
    assert [os.path.basename(p) for p in frame["path"]] == ["lung_aca_0001.jpg", "lung_aca_0002.jpg"]
    with pytest.raises(ValueError, match="RGB"):
        predictor.predict_arrays(np.zeros((2, 75, 75)))
    resized = predictor.predict_arrays(np.full((1, 96, 96, 3), 128.0))  # any size: resized to the model's
    assert resized["cancer"].shape == (1, 2)


def test_single_task_run_has_only_its_columns(cancer_run, mixed_folder, tmp_path):
    out = tmp_path / "p.json"
    assert cli.main(["predict", str(cancer_run), str(next(mixed_folder.rglob("all_benign"))), "--out", str(out)]) == 0
    records = json.loads(out.read_text())
    assert list(records[0]) == ["path", "cancer", "malignant_prob", "malignancy_threshold", "threshold_source",
                                "ood_score", "ood", "note", "p_cancer_Benign", "p_cancer_Malignant", "cancer_prob",
                                "error"]
    assert records[0]["threshold_source"] == "global"  # no organ head: the run's global operating point
    empty = next(r for r in records if r["path"].endswith(BAD_FILE_NAMES["empty"]))
    assert empty["cancer"] is None and empty["cancer_prob"] is None and "empty" in empty["error"]
    assert "\\/" not in out.read_text()


def test_truncated_jpegs_are_rejected_by_the_pipeline(predictor, tmp_path):
    """The design relies on TensorFlow failing on truncated JPEGs (no separate PIL pass): check it, cut anywhere."""
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=90)
    data = buffer.getvalue()
    cuts = {"half": len(data) // 2, "most": int(len(data) * 0.95), "no_eoi": len(data) - 2}
    for name, cut in cuts.items():
        (tmp_path / f"{name}.jpg").write_bytes(data[:cut])
    (tmp_path / "whole.jpg").write_bytes(data)
    rows = by_name(predictor.predict([tmp_path]))
    assert pd.isna(rows.loc["whole.jpg", "error"])
    for name in cuts:
        assert "truncated" in rows.loc[f"{name}.jpg", "error"], name


def test_collect_images(tmp_path, caplog):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("a/1.jpg", "a/b/2.PNG", "a/b/.hidden.jpg", "a/notes.txt", "top.jpeg", "scan.tif"):
        (tmp_path / name).write_bytes(b"x")
    found = collect_images([tmp_path / "a", str(tmp_path / "*.jpeg"), tmp_path / "scan.tif", tmp_path / "gone.jpg",
                            str(tmp_path / "*.bmp")])
    names = [os.path.relpath(p, tmp_path) for p in found]
    assert names == ["a/1.jpg", "a/b/2.PNG", "top.jpeg", "scan.tif", "gone.jpg"]  # named files kept as given
    assert "no image files match" in caplog.text


def test_predict_sample_shows_true_vs_predicted_test_images_only(joint_run, predictor, capsys):
    assert cli.main(["predict", str(joint_run), "--sample", "5", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    split = load_split(joint_run / "split.csv")
    shown = [line.split()[0] for line in out.splitlines() if line.endswith(".jpg") or ".jpg " in line]
    assert len(shown) == 5
    test_names = set(split.loc[split["split"] == "test", "path"].map(os.path.basename))
    assert set(shown) <= test_names
    assert "true_organ" in out and "true_cancer" in out
    assert "organ" in out and "/5 correct" in out
    header = next(line for line in out.splitlines() if "true_organ" in line).split()
    assert {"malignant_prob", "malignancy_threshold", "ood"} <= set(header) and "cancer_prob" not in header

    frame = sample_predictions(joint_run, 1000, split="val", seed=0, predictor=predictor)
    val = split[split["split"] == "val"]
    assert sorted(frame["path"]) == sorted(val["path"])  # capped at the split's size, never other images
    truth = val.set_index("path").loc[frame["path"]]
    assert (frame["true_organ"].to_numpy() == truth["organ"].to_numpy()).all()
    assert (frame["organ_hit"] == (frame["organ"] == frame["true_organ"])).all()
    assert frame["organ_hit"].mean() > 0.5


def test_predict_sample_refuses_train_images(joint_run, capsys):
    assert cli.main(["predict", str(joint_run), "--sample", "3", "--split", "train"]) == 2
    assert "trained on" in capsys.readouterr().err


def test_nothing_predictable_exits_2(joint_run, mixed_folder, tmp_path, capsys):
    bad = [str(next(mixed_folder.rglob(BAD_FILE_NAMES[k]))) for k in ("empty", "text")]
    assert cli.main(["predict", str(joint_run), *bad]) == 2
    err = capsys.readouterr().err
    assert "none of the 2 file(s)" in err and BAD_FILE_NAMES["empty"] in err and "empty file" in err
    (tmp_path / "empty").mkdir()
    assert cli.main(["predict", str(joint_run), str(tmp_path / "empty")]) == 2
    assert "no image files found" in capsys.readouterr().err


def test_invalid_run_dir_exits_2_naming_what_is_missing(tmp_path, mixed_folder, capsys):
    image = str(next(mixed_folder.rglob("*.jpg")))
    assert cli.main(["predict", str(tmp_path / "nope"), image]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["predict", str(tmp_path), image]) == 2
    assert "config.json is missing" in capsys.readouterr().err


def test_predict_usage_errors(joint_run, capsys):
    assert cli.main(["predict", str(joint_run)]) == 2
    assert "--sample" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["predict", str(joint_run), "x.jpg", "--out", "predictions.txt"])
    assert exit_info.value.code == 2 and ".csv or .json" in capsys.readouterr().err


def test_threshold_override_and_uncalibrated_probabilities(joint_run, predictor, mixed_folder, capsys):
    """--threshold moves only the cancer decision; --uncalibrated shows the raw softmax of the model's logits."""
    import keras

    files = collect_images([next(mixed_folder.rglob("lung_aca"))])
    calibrated = predictor.predict_files(files)
    lenient = Predictor.from_run(joint_run, threshold=0.0).predict_files(files)
    assert (lenient["cancer"] == "Malignant").all() and (lenient["malignancy_threshold"] == 0.0).all()
    assert (lenient["threshold_source"] == "given").all()
    pd.testing.assert_frame_equal(lenient.filter(like="p_"), calibrated.filter(like="p_"))
    raw = Predictor.from_run(joint_run, calibrated=False).predict_files(files)
    assert (raw["malignancy_threshold"] == 0.5).all() and (raw["threshold_source"] == "default").all()
    model = keras.models.load_model(joint_run / "model.keras")
    logits = model.predict(np.stack([load_image(f, 75).numpy() for f in files]), verbose=0)
    expected = keras.ops.convert_to_numpy(keras.ops.softmax(logits["organ"]))
    np.testing.assert_allclose(raw.filter(like="p_organ_").to_numpy(), expected, atol=1e-5)
    temperatures = json.loads((joint_run / "config.json").read_text())["calibration"]["temperatures"]
    scaled = keras.ops.convert_to_numpy(keras.ops.softmax(logits["organ"] / temperatures["organ"]))
    np.testing.assert_allclose(calibrated.filter(like="p_organ_").to_numpy(), scaled, atol=1e-5)
    assert cli.main(["predict", str(joint_run), files[0], "--threshold", "1.5"]) == 2
    assert "--threshold must be a probability between 0 and 1" in capsys.readouterr().err
