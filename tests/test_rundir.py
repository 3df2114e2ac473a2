"""The run folder's life: what train will and will not touch, locking, resuming, overwriting, damaged state."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections import namedtuple
from pathlib import Path

import keras
import numpy as np
import pytest

from multitask import cli
from multitask.callbacks import EpochBackup, save_weights
from multitask.errors import ConfigError, RunError, cli_message
from multitask.rundir import CONFIG_FILE, LOCK_FILE, MARKER_FILE, MODEL_FILE, STATE_DIR, RunDir, claim_files, open_run
from multitask.settings import TrainConfig
from multitask.taxonomy import load_taxonomy


def config_for(out: Path, split_file: Path, **changes) -> TrainConfig:
    return TrainConfig(out=str(out), split_file=str(split_file), weights="none", image_size=75, epochs=1, verbose=0,
                       **changes).validate()


def tiny_model() -> keras.Model:
    inputs = keras.Input((3,))
    return keras.Model(inputs, keras.layers.Dense(2)(inputs))


def finished_run(out: Path, split_file: Path) -> Path:
    """A finished run made through RunDir (what train does at the end), without training anything."""
    taxonomy = load_taxonomy()
    with RunDir.open(config_for(out, split_file)) as run:
        (run.path / "history.csv").write_text("epoch,loss\n0,1.0\n")
        run.finish(tiny_model(), {"task": "joint", "tasks": ["organ", "cancer"], "image_size": 75,
                                  "labels": {t: list(taxonomy.labels(t)) for t in ("organ", "cancer")},
                                  "taxonomy": taxonomy.to_records()})
    return out


# ----------------------------------------------------------------------------------------------- never data loss


def test_a_folder_that_is_not_a_run_is_refused_and_left_alone(demo_split_csv, tmp_path, capsys):
    out = tmp_path / "u"
    (out / "logs").mkdir(parents=True)
    (out / "logs" / "keep.log").write_text("x")
    (out / "split.csv").write_text("x")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    rc = cli.main(["train", "--split-file", str(demo_split_csv), "--out", str(out), "--weights", "none",
                   "--image-size", "75", "--epochs", "1", "--overwrite"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert f"--out {out} is not empty (logs, split.csv) and is not a multitask run" in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_a_split_file_inside_the_run_folder_is_never_replaced(demo_split_csv, tmp_path):
    out = tmp_path / "X"
    out.mkdir()
    split = out / "split.csv"
    split.write_bytes(demo_split_csv.read_bytes())
    with pytest.raises(ConfigError, match="split_file .*split.csv lies among the files that a run in"):
        RunDir.open(config_for(out, split))
    assert split.read_bytes() == demo_split_csv.read_bytes()


@pytest.mark.parametrize("where", ["same", "inside", "around"])
def test_out_may_not_be_the_data_folder_inside_it_or_around_it(where, demo_data, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    out = {"same": data, "inside": data / "runs" / "r1", "around": tmp_path}[where]
    config = TrainConfig(out=str(out), data=str(data), weights="none", image_size=75)
    with pytest.raises(ConfigError, match="must not be the data folder .* lie inside it, or contain it"):
        RunDir.open(config)
    assert not (data / "runs").exists() and not (tmp_path / MARKER_FILE).exists()


def test_overwrite_replaces_only_what_the_run_owns(demo_split_csv, tmp_path):
    out = finished_run(tmp_path / "run", demo_split_csv)
    (out / "notes.txt").write_text("mine")  # the user's
    (out / "metrics.json").write_text("{}")  # an evaluation of the old model, claimed by the run
    (out / "cache").mkdir()
    (out / "cache" / "features-x.npz").write_bytes(b"keyed, always safe to reuse")
    claim_files(out, ["metrics.json"])
    with pytest.raises(ConfigError, match="already holds a finished run; choose another out, or pass overwrite"):
        RunDir.open(config_for(out, demo_split_csv))
    with RunDir.open(config_for(out, demo_split_csv, overwrite=True)) as run:
        assert not run.resuming
        left = sorted(p.name for p in out.iterdir())
    assert left == sorted([".lock", MARKER_FILE, "cache", "notes.txt", STATE_DIR])
    assert (out / "notes.txt").read_text() == "mine" and (out / "cache" / "features-x.npz").is_file()


def test_overwrite_starts_over_even_with_the_same_settings(demo_split_csv, tmp_path):
    config = config_for(tmp_path / "run", demo_split_csv)
    with RunDir.open(config) as run:
        run.state("heads.json").write_text("{}")  # an earlier attempt got this far
    with RunDir.open(config) as run:
        assert run.resuming and run.state("heads.json").is_file()
    with RunDir.open(config_for(tmp_path / "run", demo_split_csv, overwrite=True)) as run:
        assert not run.resuming and not run.state("heads.json").exists()


# ----------------------------------------------------------------------------------------------- one process


def test_a_second_process_is_told_who_holds_the_lock_and_exits_2(demo_split_csv, tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from multitask.rundir import RunDir
        from multitask.settings import TrainConfig
        run = RunDir.open(TrainConfig(out={str(out)!r}, split_file={str(demo_split_csv)!r}, weights="none"))
        print("locked", flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        rc = cli.main(["train", "--split-file", str(demo_split_csv), "--out", str(out), "--weights", "none"])
        err = capsys.readouterr().err
        assert rc == 2 and f"is in use by multitask pid {holder.pid}" in err and "choose another --out" in err
    finally:
        holder.kill()
        holder.wait()
    with RunDir.open(config_for(out, demo_split_csv, overwrite=True)):  # released when its holder dies
        pass


def test_the_lock_is_exclusive_within_one_process_too(demo_split_csv, tmp_path):
    config = config_for(tmp_path / "run", demo_split_csv)
    with RunDir.open(config), pytest.raises(RunError, match="in use by multitask pid"):
        RunDir.open(config)
    assert (tmp_path / "run" / LOCK_FILE).read_text() == ""  # released: no stale holder named


# ----------------------------------------------------------------------------------------------- damaged state


def test_temporary_files_of_a_killed_write_are_removed(demo_split_csv, tmp_path):
    out = tmp_path / "run"
    with RunDir.open(config_for(out, demo_split_csv)) as run:
        pass
    stale = [out / ".model.tmp-k2j4xa9q.keras", run.state(".heads.tmp-abcd1234.weights.h5")]
    for path in stale:
        path.write_bytes(b"half a file")
    with RunDir.open(config_for(out, demo_split_csv)):
        assert not any(p.exists() for p in stale)


def test_too_little_disk_space_is_refused_before_any_work(demo_split_csv, tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("multitask.files.shutil.disk_usage", lambda path: usage(10**9, 10**9 - 5 * 2**20, 5 * 2**20))
    with pytest.raises(RunError, match=r"only 5 MB free under .* training .* needs about 400 MB"):
        RunDir.open(config_for(tmp_path / "run", demo_split_csv))


def test_a_checkpoint_is_complete_or_absent_even_when_the_disk_fills(tmp_path, monkeypatch):
    model = tiny_model()
    path = tmp_path / "best.weights.h5"
    save_weights(model, path)
    good = [w.copy() for w in model.get_weights()]
    model.set_weights([w + 1 for w in good])

    def disk_full(self, filepath, **kwargs):
        Path(filepath).write_bytes(b"\x89HDF\r\n\x1a\n truncated")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(keras.Model, "save_weights", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_weights(model, path)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.weights.h5"]  # no half-written temporary file
    model.load_weights(path)
    for before, after in zip(good, model.get_weights(), strict=True):
        np.testing.assert_array_equal(before, after)


def test_an_unreadable_backup_restarts_the_phase_with_a_warning(tmp_path, caplog):
    backup = EpochBackup(tmp_path / "backup")
    backup.dir.mkdir()
    backup.weights.write_bytes(b"\x89HDF\r\n\x1a\n truncated by a full disk")
    backup.meta.write_text(json.dumps({"epoch": 3}))
    trainer = tiny_model()
    trainer.compile(optimizer="adam", loss="mse")
    assert backup.restore(trainer) is None
    assert "cannot be read" in caplog.text and "starts over" in caplog.text and not backup.dir.exists()


def test_the_run_marker_records_claimed_files_only_in_runs(demo_split_csv, tmp_path):
    out = finished_run(tmp_path / "run", demo_split_csv)
    claim_files(out, ["report.md", "confusion_organ.png"])
    files = json.loads((out / MARKER_FILE).read_text())["files"]
    assert {"report.md", "confusion_organ.png", CONFIG_FILE, MODEL_FILE} <= set(files)
    elsewhere = tmp_path / "eval"
    elsewhere.mkdir()
    claim_files(elsewhere, ["metrics.json"])  # not a run: nothing is recorded, nothing will ever be removed
    assert os.listdir(elsewhere) == []


def test_open_run_explains_what_is_missing(demo_split_csv, tmp_path):
    with pytest.raises(RunError, match="does not exist; train one"):
        open_run(tmp_path / "nothing")
    config = config_for(tmp_path / "run", demo_split_csv)
    with RunDir.open(config):
        pass
    with pytest.raises(RunError, match="is not a finished run: config.json is missing"):
        open_run(tmp_path / "run")
    out = finished_run(tmp_path / "old", demo_split_csv)
    record = json.loads((out / CONFIG_FILE).read_text())
    (out / CONFIG_FILE).write_text(json.dumps({**record, "format": 1}))
    with pytest.raises(RunError, match="trained by an older multitask"):
        open_run(out)


def test_library_messages_name_parameters_and_the_cli_names_flags():
    error = ConfigError("choose another $out, or pass $overwrite; $fine_tune_learning_rate=0 is not allowed")
    assert str(error) == "choose another out, or pass overwrite; fine_tune_learning_rate=0 is not allowed"
    assert cli_message(error) == ("choose another --out, or pass --overwrite; "
                                                "--fine-tune-learning-rate=0 is not allowed")


def test_an_unwritable_out_is_a_one_line_error_before_any_work(demo_split_csv, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")  # a file where a folder would have to be: refused for root too
    rc = cli.main(["train", "--split-file", str(demo_split_csv), "--out", str(blocker / "run"), "--weights", "none"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "is a file, not a folder; choose another location with --out" in err[0]
