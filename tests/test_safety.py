"""No data loss, round 2 (issue 21): outputs never land on runs, data or user files; damaged or hostile run files,
caches and histories give one-line errors or are recomputed; a full disk stops cleanly. One test (or more) per
reproduction of the issue, named after the behaviour it pins down."""

from __future__ import annotations

import copy
import errno
import json
import os
import shutil
import signal
import struct
import subprocess
import zlib
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
from conftest import IMAGE_SIZE

from multitask import cli
from multitask.errors import ConfigError, DataError, ExportError, RunError, TrainingError
from multitask.files import TEMP_TAG
from multitask.rundir import CONFIG_FILE, MARKER_FILE, MODEL_FILE, OOD_ARRAYS_FILE, OOD_FILE, RunDir, RunLock, open_run
from multitask.settings import TrainConfig

SUBCLASS = Path("Multi Cancer") / "Multi Cancer" / "Brain Cancer" / "brain_glioma"


def copy_run(run: Path, to: Path) -> Path:
    """A private copy of a session run, for a test that changes it (its exports and lock left out)."""
    return Path(shutil.copytree(run, to, ignore=shutil.ignore_patterns("export", ".lock", "cache")))


def files_of(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def tiny_config(out: Path, split_file: Path, cache: Path, **changes) -> TrainConfig:
    return TrainConfig(out=str(out), split_file=str(split_file), weights="none", image_size=IMAGE_SIZE,
                       cache_dir=str(cache), verbose=0, **changes)


@pytest.fixture(scope="module")
def sandbox(demo_data, joint_run, tmp_path_factory) -> dict[str, Path]:
    """A copy of the demo data and of the joint run whose split points at that copy: tests may try to write into
    this data without any risk to the session's."""
    root = tmp_path_factory.mktemp("sandbox")
    data = Path(shutil.copytree(demo_data, root / "data"))
    run = copy_run(joint_run, root / "run")
    split = pd.read_csv(run / "split.csv")
    split["path"] = split["path"].str.replace(str(demo_data), str(data), regex=False)
    split.to_csv(run / "split.csv", index=False)
    return {"data": data, "run": run, "split": run / "split.csv", "image": next((data / SUBCLASS).glob("*.jpg"))}


# ----------------------------------------------------------------------------------------------- 1: the marker


@pytest.mark.parametrize("entry", ["../precious", "/ABSOLUTE/precious", "link/f"])
def test_an_overwrite_deletes_nothing_outside_the_run_whatever_its_marker_says(entry, demo_split_csv, tmp_path):
    precious, elsewhere = tmp_path / "precious", tmp_path / "elsewhere"
    for folder in (precious, elsewhere):
        folder.mkdir()
        (folder / "f").write_text("keep me")
    run = tmp_path / "run"
    run.mkdir()
    (run / "link").symlink_to(elsewhere)
    entry = entry.replace("/ABSOLUTE", str(tmp_path))
    (run / MARKER_FILE).write_text(json.dumps({"format": 1, "files": ["config.json", entry]}))
    (run / "config.json").write_text("{}")
    with pytest.raises(RunError, match="the marker was edited or damaged, so nothing was deleted"):
        RunDir.open(TrainConfig(out=str(run), split_file=str(demo_split_csv), weights="none", overwrite=True))
    assert (precious / "f").read_text() == (elsewhere / "f").read_text() == "keep me"
    assert (run / "config.json").is_file()  # refused before any deletion, its own files included


# ----------------------------------------------------------------------------------------------- 2-5: the output guard


@pytest.mark.parametrize("name", [CONFIG_FILE, "split.csv"])
def test_predict_out_never_replaces_a_file_of_a_run(name, sandbox, capsys):
    run = sandbox["run"]
    before = (run / name).read_bytes()
    assert cli.main(["predict", str(run), str(sandbox["image"]), "--out", str(run / name)]) == 2
    assert f"which belongs to the run {run.resolve()}" in one_line_error(capsys)
    assert (run / name).read_bytes() == before
    open_run(run)


def test_evaluate_out_never_replaces_the_users_report(joint_run, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.md").write_text("my report")
    (mine / "metrics.json").write_text('{"mine": 1}')
    assert cli.main(["evaluate", str(joint_run), "--out", str(mine)]) == 2
    assert "is not empty (metrics.json, report.md) and is not an earlier output" in one_line_error(capsys)
    assert files_of(mine) == {mine / "metrics.json": b'{"mine": 1}', mine / "report.md": b"my report"}


def test_scan_out_never_replaces_a_runs_split(sandbox, capsys):
    split = sandbox["split"]
    before = split.read_bytes()
    assert cli.main(["scan", str(sandbox["data"]), "--seed", "7", "--split", "random", "--out", str(split)]) == 2
    assert "belongs to the run" in one_line_error(capsys)
    assert split.read_bytes() == before


def test_no_output_goes_into_the_data(sandbox, demo_split_csv, capsys):
    data, run, subclass = sandbox["data"], sandbox["run"], sandbox["data"] / SUBCLASS
    before = files_of(data)
    assert cli.main(["evaluate", str(run), "--out", str(subclass)]) == 2
    assert "lies inside the data folder" in one_line_error(capsys)
    assert cli.main(["predict", str(run), str(sandbox["image"]), "--out", str(subclass / "p.csv")]) == 2
    assert "lies inside the data folder" in one_line_error(capsys)
    assert cli.main(["scan", str(data), "--out", str(data / "split.csv")]) == 2
    assert "lies inside the data folder" in one_line_error(capsys)
    with pytest.raises(ConfigError, match="lies inside the data folder"):  # train --split-file S --out <subclass>
        RunDir.open(TrainConfig(out=str(subclass / "run"), split_file=str(sandbox["split"]), weights="none"))
    assert files_of(data) == before


# ----------------------------------------------------------------------------------------------- 6: the shared lock


def test_evaluate_and_export_read_a_run_under_a_shared_lock(joint_run, demo_split_csv, tmp_path, monkeypatch):
    from multitask import evaluate
    from multitask.export import export_run

    run = copy_run(joint_run, tmp_path / "run")
    seen = []

    def while_evaluating(info, stage, **options):  # what a concurrent `train --out RUN --overwrite` meets
        with pytest.raises(RunError, match="is in use by another multitask process"):
            RunDir.open(TrainConfig(out=str(run), split_file=str(demo_split_csv), weights="none", overwrite=True))
        RunLock(run, shared=True).release()  # another reader is welcome
        seen.append(True)
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate, "_evaluate", while_evaluating)
    with pytest.raises(KeyboardInterrupt):
        evaluate.evaluate_run(run, out=tmp_path / "eval")
    assert seen and open_run(run).config["status"] == "complete"
    writer = RunLock(run)  # a train writing the run: readers are refused, not given half a run
    try:
        with pytest.raises(RunError, match="is in use by multitask pid"):
            evaluate.evaluate_run(run, out=tmp_path / "eval")
        with pytest.raises(RunError, match="is in use by multitask pid"):
            export_run(run, format="onnx")
    finally:
        writer.release()


# ----------------------------------------------------------------------------------------------- 7: one unit


def test_an_interrupted_evaluation_never_leaves_new_figures_beside_old_metrics(joint_run, tmp_path, monkeypatch):
    from multitask import evaluate

    out = tmp_path / "eval"
    evaluate.evaluate_run(joint_run, out=out, resamples=10)
    assert json.loads((out / evaluate.EVALUATION_MARK).read_text())["run"] == str(joint_run)
    (out / "notes.txt").write_text("mine")  # beside our outputs: never touched
    before = files_of(out)
    with monkeypatch.context() as patch:  # killed while rendering: the earlier evaluation stays whole
        patch.setattr(evaluate, "render_report", lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
        with pytest.raises(KeyboardInterrupt):
            evaluate.evaluate_run(joint_run, out=out, resamples=10)
    assert files_of(out) == before
    moves = []
    real_replace = os.replace

    def replace_then_die(src, dst):  # killed while moving the new files from the temporary folder into place
        if TEMP_TAG in Path(src).parent.name and Path(dst).parent == out:
            if len(moves) == 3:
                raise KeyboardInterrupt
            moves.append(Path(dst).name)
        real_replace(src, dst)

    with monkeypatch.context() as patch:
        patch.setattr(evaluate.os, "replace", replace_then_die)
        with pytest.raises(KeyboardInterrupt):
            evaluate.evaluate_run(joint_run, out=out, resamples=10)
    assert len(moves) == 3 and evaluate.METRICS_FILE not in moves
    assert not (out / evaluate.METRICS_FILE).exists()  # no metrics vouch for a mixed set
    stale = out / f".{evaluate.EVALUATION_TEMP}{TEMP_TAG}{dead_pid()}-x"  # a kill -9's leftover
    stale.mkdir()
    evaluate.evaluate_run(joint_run, out=out, resamples=10)  # still ours (marked): redone whole
    metrics = json.loads((out / evaluate.METRICS_FILE).read_text())
    assert all((out / name).is_file() for task in metrics["tasks"] for name in metrics[task]["figures"].values())
    assert not [p for p in out.iterdir() if TEMP_TAG in p.name] and (out / "notes.txt").read_text() == "mine"


# ----------------------------------------------------------------------------------------------- 8: the history


class StopInFirstEpoch(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        raise KeyboardInterrupt  # Ctrl-C (or kill -9) before the first epoch ends


class FillTheDisk(keras.callbacks.Callback):
    """From the second epoch on, the disk has 1 MB free (what shutil.disk_usage says)."""

    def __init__(self, state: dict):
        super().__init__()
        self.state = state

    def on_epoch_begin(self, epoch, logs=None):
        self.state["full"] = epoch >= 1


class HeadsTrained(Exception):
    """Raised where training would calibrate: the phase of interest is over (the rest of a run is not needed)."""


def test_a_killed_first_epoch_and_a_disk_filling_mid_train_leave_a_run_the_same_command_resumes(
        demo_split_csv, feature_cache, tmp_path, monkeypatch):
    from multitask.train import Trainer, train

    def heads_trained(self, *_, **__):
        raise HeadsTrained

    monkeypatch.setattr(Trainer, "calibrate", heads_trained)
    config = tiny_config(tmp_path / "run", demo_split_csv, feature_cache, epochs=3)
    history = tmp_path / "run" / "history.csv"
    with pytest.raises(KeyboardInterrupt):  # item 8: killed in the first epoch
        train(config, callbacks=[StopInFirstEpoch()])
    assert history.stat().st_size == 0  # what CSVLogger leaves: the repro
    state, real_usage = {"full": False}, shutil.disk_usage

    def usage(path):
        found = real_usage(path)
        return found._replace(free=2**20) if state["full"] else found

    with monkeypatch.context() as patch:  # item 20: the rerun goes on, and the disk fills in its second epoch
        patch.setattr(shutil, "disk_usage", usage)
        with pytest.raises(TrainingError, match="stopped at the end of epoch 2, before writing its checkpoints.*"
                                                "The run is resumable"):
            train(config, callbacks=[FillTheDisk(state)])
    assert pd.read_csv(history)["epoch"].tolist() == [1]  # epochs are counted from 1 in history.csv
    with pytest.raises(HeadsTrained):  # the same command again: resumes from epoch 2 and finishes the phase
        train(config)
    assert pd.read_csv(history)["epoch"].tolist() == [1, 2, 3]


@pytest.mark.parametrize("text", ["", "epoch,loss\n", "\x00\xff garbage, \"\n\"x", "epoch,loss\n0,1.5\n1,0.9\n2,0."])
def test_an_empty_or_damaged_history_never_stops_a_rerun(text, tmp_path):
    from multitask.history import read_history
    from multitask.train import _drop_epochs_from

    path = tmp_path / "history.csv"
    path.write_text(text)
    epochs = read_history(path)["epoch"].tolist()
    assert epochs == ([0, 1, 2] if text.startswith("epoch,loss\n0") else [])
    _drop_epochs_from(path, 2)
    assert (pd.read_csv(path)["epoch"].tolist() == [0, 1]) if epochs else not path.exists()


# ----------------------------------------------------------------------------------------------- 9: caches


def damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncated":
        path.write_bytes(bytes(data[:1000]))
    else:  # one bit, inside the feature values themselves (found by their bytes: the zip stores them as they are)
        with np.load(path) as stored:
            values = np.asarray(stored["values"]).tobytes()
        at = bytes(data).find(values)
        assert at >= 0, "the values' bytes were not found in the file"
        data[at + len(values) // 2] ^= 0x10
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncated", "bit-flipped"])
def test_a_damaged_feature_cache_is_recomputed(how, demo_split_csv, tmp_path, caplog):
    from multitask.features import cached_features

    backbone = keras.Sequential([keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3)), keras.layers.Conv2D(8, 3, name="conv"),
                                 keras.layers.GlobalAveragePooling2D()])
    paths = pd.read_csv(demo_split_csv)["path"].head(64).tolist()
    options = {"image_size": IMAGE_SIZE, "batch_size": 16, "cache_dir": tmp_path, "verbose": 0}
    first = cached_features(backbone, paths, **options)
    damage(first.path, how)
    again = cached_features(backbone, paths, **options)
    assert not again.reused and "ignoring unreadable feature cache" in caplog.text
    np.testing.assert_allclose(again.values, first.values, rtol=1e-6)
    assert cached_features(backbone, paths, **options).reused  # the recomputed cache is whole again


def test_a_damaged_keypoint_cache_is_recomputed(demo_split_csv, tmp_path):
    from multitask.grouping import load_keypoints
    from multitask.settings import GroupingParams

    paths, params = pd.read_csv(demo_split_csv)["path"].head(3).tolist(), GroupingParams()
    first = load_keypoints(paths, params=params, cache_dir=tmp_path)
    for file in tmp_path.rglob("*.npz"):
        damage(file, "truncated")
    again = load_keypoints(paths, params=params, cache_dir=tmp_path)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a.descriptors[0], b.descriptors[0])


# ----------------------------------------------------------------------------------------------- 10: export temps


def test_a_killed_exports_temporary_folders_are_removed_by_the_next_export(joint_run, tmp_path, monkeypatch):
    from multitask import export

    run = copy_run(joint_run, tmp_path / "run")
    pid = dead_pid()
    stale = [run / "export" / f".onnx{TEMP_TAG}{pid}-k2j4", run / "export" / f".onnx{TEMP_TAG}{pid}-old"]
    live = run / "export" / f".onnx{TEMP_TAG}{os.getpid()}-mine"  # this process's: still being written
    for folder in (*stale, live):
        folder.mkdir(parents=True)
        (folder / "model.onnx").write_bytes(b"x" * 1000)

    def stop(*_, **__):
        raise ExportError("stopped before writing")

    monkeypatch.setattr(export, "run_inference_model", stop)
    with pytest.raises(ExportError, match="stopped"):
        export.export_run(run, format="onnx")
    assert not any(folder.exists() for folder in stale) and live.is_dir()


# ----------------------------------------------------------------------------------------------- 11: merge identity


@pytest.fixture(scope="module")
def shard_inputs(demo_split_csv) -> list[str]:
    return pd.read_csv(demo_split_csv)["path"].head(12).tolist()


@pytest.mark.parametrize("differs", ["model_sha256", "threshold", "inputs_sha256"])
def test_merge_joins_only_parts_of_one_job(differs, joint_predictor, shard_inputs, demo_split_csv):
    from multitask.shards import Shard, merge_parts, predict_shard

    other, inputs = copy.copy(joint_predictor), shard_inputs
    if differs == "model_sha256":
        other.model_sha256 = "0" * 64
    elif differs == "threshold":
        other.threshold = 0.25
    else:  # another list of the same length: the counts and positions alone would match
        inputs = pd.read_csv(demo_split_csv)["path"].tail(12).tolist()
    first = predict_shard(joint_predictor, shard_inputs, Shard(1, 2))
    second = predict_shard(other, inputs, Shard(2, 2))
    with pytest.raises(DataError, match=f"has {differs} .* the parts come from different runs, thresholds or input"):
        merge_parts_from({"a": first, "b": second}, merge_parts)
    same_job = predict_shard(joint_predictor, shard_inputs, Shard(2, 2))
    assert len(merge_parts_from({"a": first, "b": same_job}, merge_parts)) == len(shard_inputs)


def merge_parts_from(frames: dict[str, pd.DataFrame], merge_parts) -> pd.DataFrame:
    """merge_parts of in-memory parts, through the CSV files that predict --shard writes."""
    import tempfile

    from multitask.predict import write_predictions

    with tempfile.TemporaryDirectory() as folder:
        paths = [write_predictions(frame, Path(folder) / f"{name}.csv") for name, frame in frames.items()]
        return merge_parts(paths)


# ----------------------------------------------------------------------------------------------- 12: the model hash


def test_a_model_file_from_another_run_is_refused(joint_run, cancer_run, tmp_path, capsys):
    from multitask.predict import Predictor

    run = copy_run(joint_run, tmp_path / "run")
    assert open_run(run).config["model_sha256"]
    shutil.copy(cancer_run / MODEL_FILE, run / MODEL_FILE)  # same image size: only the hash tells
    with pytest.raises(RunError, match="is not the model this run saved"):
        Predictor.from_run(run)


def test_a_run_without_a_recorded_hash_opens_with_a_warning(joint_run, tmp_path, caplog):
    run = copy_run(joint_run, tmp_path / "run")
    config = json.loads((run / CONFIG_FILE).read_text())
    del config["model_sha256"]
    (run / CONFIG_FILE).write_text(json.dumps(config))
    open_run(run).check_model_hash()
    assert "records no model hash" in caplog.text


# ----------------------------------------------------------------------------------------------- 13, 14


def test_reject_ood_without_a_detector_is_an_error(joint_run, joint_predictor, sandbox, tmp_path, capsys):
    without = copy.copy(joint_predictor)
    without.ood_threshold = None  # e.g. the int8 engine, which has no ood_score
    with pytest.raises(ConfigError, match="needs the run's out-of-distribution detector"):
        without.predict_files([str(sandbox["image"])], reject_ood=True)
    run = copy_run(joint_run, tmp_path / "run")
    (run / OOD_FILE).unlink()
    (run / OOD_ARRAYS_FILE).unlink()
    assert cli.main(["predict", str(run), str(sandbox["image"]), "--reject-ood"]) == 2
    assert "--reject-ood needs the run's out-of-distribution detector" in one_line_error(capsys)


def test_a_dataset_of_one_subclass_is_refused(demo_split_csv, tmp_path):
    from multitask.train import train

    split = pd.read_csv(demo_split_csv)
    split[split["subclass"] == "brain_glioma"].to_csv(tmp_path / "one.csv", index=False)
    with pytest.raises(DataError, match="only 1 organ class .* needs images of at least two classes"):
        train(tiny_config(tmp_path / "run", tmp_path / "one.csv", tmp_path / "cache", epochs=1))
    assert not (tmp_path / "run" / CONFIG_FILE).exists()


# ----------------------------------------------------------------------------------------------- 17, 18: hangs


def test_an_image_size_too_large_is_refused_at_once(tmp_path, capsys):
    assert cli.main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "r"), "--image-size", "100000"]) == 2
    assert "--image-size 100000 is above the largest supported, 1024 px" in one_line_error(capsys)


@pytest.fixture()
def no_hang():
    """Fail instead of hanging when a FIFO is opened after all."""
    def hung(*_):
        raise TimeoutError("hung: a FIFO was opened")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("name", [OOD_ARRAYS_FILE, OOD_FILE, CONFIG_FILE])
def test_a_fifo_in_place_of_a_run_file_is_refused_not_opened(name, joint_run, sandbox, tmp_path, no_hang, capsys):
    run = copy_run(joint_run, tmp_path / "run")
    (run / name).unlink()
    os.mkfifo(run / name)
    assert cli.main(["predict", str(run), str(sandbox["image"])]) == 2
    err = one_line_error(capsys)
    assert name in err and ("FIFO" in err or "missing" in err)


# ----------------------------------------------------------------------------------------------- 19: one-line errors


def png_header(width: int, height: int) -> bytes:
    """A small PNG file that declares ``width`` x ``height`` pixels (its pixel data is cut short)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + \
        chunk(b"IEND", b"")


def test_an_empty_or_header_only_split_file_is_a_one_line_error(tmp_path, capsys):
    from multitask.splits import load_split

    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "header.csv").write_text("path,subclass,split\n")
    assert cli.main(["audit-split", str(tmp_path / "empty.csv")]) == 2
    assert "cannot be read as a CSV table" in one_line_error(capsys)
    with pytest.raises(DataError, match="lists no images"):
        load_split(tmp_path / "header.csv")


def test_a_batch_size_of_zero_and_a_synthetic_size_of_zero_are_one_line_errors(joint_run, sandbox, tmp_path, capsys):
    assert cli.main(["evaluate", str(joint_run), "--batch-size", "0", "--out", str(tmp_path / "e")]) == 2
    assert "--batch-size must be at least 1" in one_line_error(capsys)
    assert cli.main(["predict", str(joint_run), str(sandbox["image"]), "--batch-size", "0"]) == 2
    assert "--batch-size must be a whole number of at least 1" in one_line_error(capsys)
    assert cli.main(["demo-data", str(tmp_path / "d"), "--size", "0"]) == 2
    assert "--size must be a whole number of at least" in one_line_error(capsys)


def test_a_port_out_of_range_is_a_one_line_error(joint_run, capsys):
    assert cli.main(["serve", str(joint_run), "--port", "70000"]) == 2
    assert "70000" in one_line_error(capsys)


def test_a_link_loop_and_images_too_large_get_error_rows_and_the_rest_goes_on(joint_predictor, sandbox, tmp_path):
    from multitask.data import scan_tree

    data = Path(shutil.copytree(sandbox["data"] / SUBCLASS, tmp_path / "Brain Cancer" / "brain_glioma"))
    (data / "loop.jpg").symlink_to("loop.jpg")  # ln -s loop.jpg loop.jpg: ELOOP
    for side in (9000, 20000, 50000):
        (data / f"big{side}.png").write_bytes(png_header(side, side))
    scanned = scan_tree(tmp_path, verify=True, allow_unknown=True)
    assert str(data / "loop.jpg") in scanned.report.not_regular
    assert {Path(p).name for p in scanned.report.unreadable} == {"big9000.png", "big20000.png", "big50000.png"}
    assert all("too large to decode" in why for why in scanned.report.unreadable.values())
    files = [str(data / name) for name in ("loop.jpg", "big9000.png", "big50000.png")] + [str(sandbox["image"])]
    frame = joint_predictor.predict_files(files)
    errors = frame.set_index(frame["path"].map(lambda p: Path(p).name))["error"]
    assert "Too many levels of symbolic links" in errors["loop.jpg"]
    assert "9000x9000 px (81 megapixels; the limit is 64)" in errors["big9000.png"]
    assert "too large to decode" in errors["big50000.png"] and pd.isna(errors[sandbox["image"].name])


def disk_full(*_, **__):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_disk_that_fills_while_writing_is_a_one_line_error(joint_run, sandbox, tmp_path, monkeypatch, capsys):
    from multitask import evaluate, export

    with monkeypatch.context() as patch:
        patch.setattr(pd.DataFrame, "to_csv", disk_full)
        assert cli.main(["predict", str(joint_run), str(sandbox["image"]), "--out", str(tmp_path / "p.csv")]) == 2
        assert "No space left on device while writing" in one_line_error(capsys)
        assert cli.main(["scan", str(sandbox["data"]), "--split", "random", "--out", str(tmp_path / "s.csv")]) == 2
        assert f"while writing {tmp_path / 's.csv'}" in one_line_error(capsys)
    with monkeypatch.context() as patch:
        patch.setattr(evaluate, "write_csv", disk_full)
        assert cli.main(["evaluate", str(joint_run), "--out", str(tmp_path / "e"), "--explain", "0"]) == 2
        assert "No space left on device" in one_line_error(capsys)
    run = copy_run(joint_run, tmp_path / "run")
    with monkeypatch.context() as patch:
        patch.setattr(export, "run_inference_model", lambda *_, **__: None)
        patch.setattr(export, "_write_onnx", disk_full)
        assert cli.main(["export", str(run), "--format", "onnx", "--out", str(tmp_path / "x")]) == 2
        assert "No space left on device" in one_line_error(capsys)
    leftovers = [p for p in [*tmp_path.rglob("*"), *(tmp_path / "e").glob(".*")] if TEMP_TAG in p.name]
    assert not leftovers and not (tmp_path / "p.csv").exists() and not (tmp_path / "x").exists()
