"""Real-world misuse (issue 13, items 6-10): link loops, duplicated split rows, evaluating on training images,
FIFOs, and one-line errors for unwritable outputs, damaged models and configs, and files that are not weights."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from multitask import cli
from multitask.audit import read_split_table
from multitask.data import image_problem, scan_tree
from multitask.errors import ConfigError, DataError, ModelError
from multitask.evaluate import overlap_counts, training_rows
from multitask.files import check_writable
from multitask.filesystem import resolved_paths
from multitask.predict import Predictor, collect_images
from multitask.rundir import open_run
from multitask.splits import load_split
from multitask.synthetic import DEMO_ROOT, generate

GUARD_SECONDS = 90  # far above what each guarded call needs (seconds, tracing included): only a hang reaches it


def finishes_within(fn, *, fifos=(), seconds: float = GUARD_SECONDS):
    """``fn()``'s result, or a test failure (never a hung test) when it is still running after ``seconds``."""
    outcome = {}

    def target():
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # re-raised in the test's thread below
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        for fifo in fifos:  # a writer that opens and closes gives the blocked reader an end of file
            with contextlib.suppress(OSError):  # ENXIO: nobody reads it, so nothing was blocked on it
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail(f"still running after {seconds} s: it blocked (on a FIFO, or in a loop)")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def one_error_line(capsys) -> str:
    """The CLI's stderr, which must be exactly one line."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture()
def tree(tmp_path) -> Path:
    """A fresh tiny dataset (26 subclasses x 2 images) that a test may add links and FIFOs to."""
    return generate(tmp_path / "data", per_class=2, size=80)


def subclass_folder(root: Path, name: str) -> Path:
    return next(root.rglob(name))


# ----------------------------------------------------------------------------------------------- 6: link loops


def test_scan_walks_each_folder_once_despite_link_loops(tree):
    glioma = subclass_folder(tree, "brain_glioma")
    (glioma / "loop").symlink_to("..")  # the repro: 41 copies of each file
    (subclass_folder(tree, "lung_aca") / "up").symlink_to("../..")  # a second loop made the scan hang
    result = finishes_within(lambda: scan_tree(tree))
    assert len(result.manifest) == 26 * 2
    assert result.manifest["path"].is_unique and len(set(resolved_paths(result.manifest["path"]))) == 52
    assert sorted(Path(p).name for p in result.report.skipped_links) == ["loop", "up"]


def test_scan_follows_a_subclass_linked_from_outside_and_drops_duplicate_files(tree, tmp_path, caplog):
    outside = tmp_path / "elsewhere" / "kidney_tumor"
    shutil.move(subclass_folder(tree, "kidney_tumor"), outside)
    (tree / DEMO_ROOT / "Kidney Cancer" / "kidney_tumor").symlink_to(outside)  # users keep a class on another disk
    glioma = subclass_folder(tree, "brain_glioma")
    (glioma / "same.jpg").symlink_to(glioma / "brain_glioma_0001.jpg")  # one file under two names
    result = scan_tree(tree)
    manifest = result.manifest
    assert (manifest["subclass"] == "kidney_tumor").sum() == 2 and not result.report.skipped_links
    assert len(manifest) == 26 * 2 and result.report.duplicates == 1
    assert not manifest["path"].str.endswith("same.jpg").any()  # the first name in walk order is kept
    assert "dropped 1 duplicate file(s)" in caplog.text


def test_predict_folder_walk_lists_each_image_once_despite_link_loops(tree):
    glioma = subclass_folder(tree, "brain_glioma")
    (glioma / "loop").symlink_to("..")
    (glioma / "loop2").symlink_to("../../..")
    files = finishes_within(lambda: collect_images([tree]))
    assert len(files) == 26 * 2 == len(set(resolved_paths(files)))


# ----------------------------------------------------------------------------------------------- 7: split CSVs


def write_leaky_split(split_csv: Path, out: Path, *, rows: int = 3, spelled=lambda p: p) -> list[str]:
    """A copy of ``split_csv`` with its first ``rows`` test rows repeated as train rows; returns their paths."""
    frame = pd.read_csv(split_csv)
    copied = frame[frame["split"] == "test"].head(rows).assign(split="train")
    copied["path"] = copied["path"].map(spelled)
    pd.concat([frame, copied]).to_csv(out, index=False)
    return frame[frame["split"] == "test"].head(rows)["path"].tolist()


def test_a_file_in_two_splits_is_refused_by_both_readers(demo_split_csv, tmp_path, capsys):
    leaky = tmp_path / "leaky.csv"
    # The copies are spelled differently (an extra "/./"): only resolved paths show they are the same files.
    leaked = write_leaky_split(demo_split_csv, leaky, spelled=lambda p: p.replace("/Multi", "/./Multi", 1))
    for read in (load_split, read_split_table):
        with pytest.raises(DataError, match=r"leaky.csv: 3 file\(s\) are listed in more than one split") as caught:
            read(leaky)
        assert Path(leaked[0]).name in str(caught.value) and "(test, train)" in str(caught.value)
        assert "Keep one row per file" in str(caught.value)
    assert cli.main(["audit-split", str(leaky)]) == 2
    assert "more than one split" in one_error_line(capsys)


def test_a_file_listed_twice_in_one_split_is_refused(demo_split_csv, tmp_path):
    frame = pd.read_csv(demo_split_csv)
    repeated = tmp_path / "repeated.csv"
    pd.concat([frame, frame.head(1)]).to_csv(repeated, index=False)
    for read in (load_split, read_split_table):
        with pytest.raises(DataError, match=r"1 file\(s\) are listed more than once within one split") as caught:
            read(repeated)
        assert Path(frame["path"].iloc[0]).name in str(caught.value)


# ----------------------------------------------------------------------------------------------- 8: evaluate overlap


def test_evaluate_on_the_training_folder_warns_and_records_the_overlap(joint_run, demo_data, tmp_path, capsys):
    folder = subclass_folder(demo_data, "colon_aca")  # 12 images, in the run's train, val and test splits
    split = pd.read_csv(joint_run / "split.csv")
    rows = split[split["subclass"] == "colon_aca"]
    expected = {s: int((rows["split"] == s).sum()) for s in ("train", "val")}
    assert cli.main(["evaluate", str(joint_run), "--data", str(folder), "--out", str(tmp_path / "eval")]) == 0
    overlap = json.loads((tmp_path / "eval" / "metrics.json").read_text())["overlap"]
    assert overlap == {**expected, "fraction": pytest.approx(sum(expected.values()) / len(rows))}
    assert 0 < overlap["fraction"] < 1
    printed = capsys.readouterr().out
    assert f"warning: {sum(expected.values())} of the evaluated images" in printed and "optimistic" in printed
    assert "**Warning**" in (tmp_path / "eval" / "report.md").read_text()


def test_the_train_split_overlaps_fully_and_the_test_split_not_at_all(joint_run):
    run = open_run(joint_run)
    split = load_split(run.split_path)
    for name, expected in (("train", {"train": 1, "val": 0}), ("test", {"train": 0, "val": 0})):
        paths = split.loc[split["split"] == name, "path"]
        n = len(paths)
        overlap = overlap_counts(training_rows(run, paths))
        assert overlap == {k: v * n for k, v in expected.items()} | {"fraction": float(expected["train"])}


# ----------------------------------------------------------------------------------------------- 9: FIFOs


@pytest.fixture(scope="module")
def predictor(joint_run) -> Predictor:
    return Predictor.from_run(joint_run)


def test_a_fifo_in_the_tree_is_skipped_by_scan_and_predict_folders(tree, predictor):
    fifo = subclass_folder(tree, "brain_glioma") / "f.jpg"
    os.mkfifo(fifo)
    result = finishes_within(lambda: scan_tree(tree, verify=True), fifos=[fifo])
    assert len(result.manifest) == 26 * 2 and result.report.not_regular == [str(fifo)]
    assert str(fifo) not in finishes_within(lambda: collect_images([tree]), fifos=[fifo])


def test_a_fifo_named_explicitly_gets_an_error_row_without_being_opened(tree, predictor):
    fifo = tree / "f.jpg"
    os.mkfifo(fifo)
    good = str(next(subclass_folder(tree, "lung_aca").glob("*.jpg")))
    frame = finishes_within(lambda: predictor.predict([str(fifo), good]), fifos=[fifo])
    assert frame["error"].tolist()[0] == "not a regular file (a FIFO)" and pd.isna(frame["error"].iloc[1])
    assert finishes_within(lambda: image_problem(str(fifo)), fifos=[fifo]) == "not a regular file (a FIFO)"


# ----------------------------------------------------------------------------------------------- 10: writability


def test_check_writable_refuses_a_file_as_folder_and_creates_nothing(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    with pytest.raises(ConfigError, match=r"blocker is a file, not a folder; choose another location with out$"):
        check_writable(blocker / "sub" / "split.csv", flag="$out")  # fails for root too
    with pytest.raises(ConfigError, match="is not writable"):
        check_writable("/proc/multitask-test/split.csv", flag="$out")  # a pseudo file system refuses root
    before = sorted(tmp_path.rglob("*"))
    assert check_writable(tmp_path / "new" / "deeper" / "split.csv", flag="$out") == tmp_path / "new" / "deeper"
    assert sorted(tmp_path.rglob("*")) == before  # no probe, no folders left behind


def test_scan_checks_out_before_scanning(demo_data, tmp_path, capsys, monkeypatch):
    (tmp_path / "blocker").write_text("")

    def must_not_scan(*args, **kwargs):
        raise AssertionError("scanned before checking --out")

    monkeypatch.setattr("multitask.data.scan_tree", must_not_scan)
    assert cli.main(["scan", str(demo_data), "--out", str(tmp_path / "blocker" / "split.csv")]) == 2
    line = one_error_line(capsys)
    assert "blocker is a file, not a folder" in line and "--out" in line
    assert cli.main(["scan", str(demo_data), "--out", "/proc/multitask-test/split.csv"]) == 2
    assert "/proc is not writable" in one_error_line(capsys)


def test_predict_and_evaluate_check_their_outputs_first(joint_run, demo_data, tmp_path, capsys, monkeypatch):
    (tmp_path / "blocker").write_text("")
    image = str(next(demo_data.rglob("*.jpg")))
    monkeypatch.setattr(Predictor, "from_run", classmethod(lambda cls, run: pytest.fail("loaded the model first")))
    assert cli.main(["predict", str(joint_run), image, "--out", str(tmp_path / "blocker" / "p.csv")]) == 2
    assert "blocker is a file, not a folder" in one_error_line(capsys)
    # Root may write anywhere that permission bits protect, so a read-only run directory is simulated here.
    real_access = os.access
    monkeypatch.setattr("multitask.files.os.access",
                        lambda path, mode: False if Path(path) == joint_run else real_access(path, mode))
    assert cli.main(["evaluate", str(joint_run)]) == 2
    line = one_error_line(capsys)
    assert f"{joint_run} is not writable (permission denied)" in line and "--out" in line


# ----------------------------------------------------------------------------------------------- 10: damaged runs


def copy_run(joint_run: Path, to: Path, *, model: bytes | None = None, **config_edits) -> Path:
    """A copy of ``joint_run`` (the model linked, not copied, unless ``model`` bytes are given) with edits to
    its config.json: a value of ``...`` deletes the key."""
    to.mkdir()
    shutil.copy(joint_run / "split.csv", to / "split.csv")
    if model is None:
        (to / "model.keras").symlink_to(joint_run / "model.keras")
    else:
        (to / "model.keras").write_bytes(model)
    config = json.loads((joint_run / "config.json").read_text())
    config.update(config_edits)
    config = {k: v for k, v in config.items() if v is not ...}
    (to / "config.json").write_text(json.dumps(config))
    return to


@pytest.mark.parametrize("cut", ["empty", "half", "weights"])
def test_a_damaged_model_file_is_a_one_line_error(joint_run, demo_data, tmp_path, capsys, cut):
    import keras

    whole = (joint_run / "model.keras").read_bytes()
    if cut == "weights":  # a valid zip whose weights file is cut short (a tiny model: it fails the same way)
        image = keras.Input((75, 75, 3))
        keras.Model(image, keras.layers.Dense(2)(image)).save(tmp_path / "tiny.keras")
        damaged = tmp_path / "inner.keras"
        with zipfile.ZipFile(tmp_path / "tiny.keras") as src, zipfile.ZipFile(damaged, "w") as dst:
            for name in src.namelist():
                data = src.read(name)
                dst.writestr(name, data[: len(data) // 2] if name.endswith(".h5") else data)
        model = damaged.read_bytes()
    else:
        model = b"" if cut == "empty" else whole[: len(whole) // 2]
    run = copy_run(joint_run, tmp_path / "run", model=model)
    assert cli.main(["predict", str(run), str(next(demo_data.rglob("*.jpg")))]) == 2
    line = one_error_line(capsys)
    assert f"{run / 'model.keras'} is damaged" in line and "Retrain the run" in line
    assert "File not found" not in line
    if cut != "weights":
        assert f"{len(model):,} bytes" in line and "expected a complete .keras archive" in line


def test_a_model_with_code_is_refused_for_safety(joint_run, demo_data, tmp_path, capsys):
    import keras

    run = copy_run(joint_run, tmp_path / "run", model=b"")
    image = keras.Input((75, 75, 3))
    keras.Model(image, keras.layers.Lambda(lambda x: x * 2.0)(image)).save(run / "model.keras")
    assert cli.main(["predict", str(run), str(next(demo_data.rglob("*.jpg")))]) == 2
    line = one_error_line(capsys)
    assert "refused for safety" in line and "contains code" in line and "Lambda" in line
    assert "safe_mode" not in line and "unsafe" not in line  # never advise turning safe mode off


@pytest.mark.parametrize(("edits", "field"), [
    ({"image_size": "abc"}, "image_size"),
    ({"image_size": -5}, "image_size"),
    ({"tasks": ["organ", "cancer", "organ", "cancer", "organ", "cancer", "organ"]}, "tasks"),
    ({"task": "lesion"}, "task"),
    ({"tasks": ["organ", "lesion"]}, "tasks"),
    ({"labels": {"organ": ["Blood"], "cancer": ["Benign", "Malignant"]}}, "labels"),
    ({"taxonomy": [{"subclass": "x"}]}, "taxonomy"),
    ({"calibration": {"temperatures": {"organ": -1.0}}}, "calibration"),
    ({"ood": {"threshold": "high"}}, "ood"),
])
def test_a_bad_config_field_is_named(joint_run, tmp_path, capsys, edits, field):
    run = copy_run(joint_run, tmp_path / "run", **edits)
    assert cli.main(["evaluate", str(run), "--out", str(tmp_path / "eval")]) == 2
    line = one_error_line(capsys)
    assert f"{run / 'config.json'}: field {field!r}" in line
    assert json.dumps(edits[field])[:20] in line or field == "taxonomy"


def test_a_missing_config_key_and_an_image_size_other_than_the_models(joint_run, tmp_path, capsys):
    run = copy_run(joint_run, tmp_path / "missing", labels=...)
    assert cli.main(["evaluate", str(run)]) == 2
    assert "missing ['labels']" in one_error_line(capsys)
    run = copy_run(joint_run, tmp_path / "other_size", image_size=96)  # the model takes 75 px
    assert cli.main(["evaluate", str(run), "--out", str(tmp_path / "eval")]) == 2
    line = one_error_line(capsys)
    assert "field 'image_size' is 96" in line and "75x75" in line and not (tmp_path / "eval").exists()


# ----------------------------------------------------------------------------------------------- 10: weights files


def test_a_file_that_is_not_weights_is_refused_before_training(demo_split_csv, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--split-file", str(demo_split_csv), "--out", str(out), "--weights", "/etc/passwd",
                     "--image-size", "75", "--epochs", "1"]) == 2
    line = one_error_line(capsys)
    assert "/etc/passwd is not InceptionV3 weights" in line and "--weights=none" in line
    assert not out.exists()


@pytest.mark.filterwarnings("ignore:Skipping nested container:UserWarning")  # keras, on the wrong file
def test_hdf5_weights_of_another_model_are_a_model_error(tmp_path):
    import h5py

    from multitask.model import build_backbone

    other = tmp_path / "other.weights.h5"
    with h5py.File(other, "w") as fh:
        fh.create_dataset("dense/kernel", data=np.zeros((3, 3), np.float32))
    with pytest.raises(ModelError, match=r"other.weights.h5 is not InceptionV3 'notop' weights: keras could not"):
        build_backbone(75, weights=other)
    renamed = tmp_path / "weights.bin"
    shutil.copy(other, renamed)
    with pytest.raises(ModelError, match=r"expected an HDF5 file named \*.h5, found an HDF5 file named weights.bin"):
        build_backbone(75, weights=renamed)
