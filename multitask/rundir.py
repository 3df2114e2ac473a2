"""The run folder's whole life: create, lock, resume, finish (for ``train``), and open (for everyone else).

A finished run holds::

    model.keras          the end-to-end model (raw RGB 0..255 in, dict of logits out)
    config.json          every setting, label names, taxonomy, package versions, seed, wall time per phase, and
                         model_sha256 (model.keras's SHA-256, checked when the model is loaded)
    split.csv            the exact manifest and split the run used
    history.csv          per-epoch metrics (CSVLogger)
    history.png          loss and accuracy per head
    ood.json, ood.npz    the out-of-distribution detector (multitask.ood), fitted on the training images
    logs/                TensorBoard logs
    cache/               cached backbone features and keypoints (keyed, always safe to reuse or delete)
    .multitask-run.json  the marker that says this folder is a run of ours, and which files it owns

``config.json`` is written last with ``"status": "complete"``; a folder without it is an unfinished run, which
the same command resumes from its last finished epoch (``train-state/`` holds the backups until then).

What ``train`` will and will not touch: it writes only into an empty (or new) folder or into a run of its own
(recognised by the marker). ``overwrite`` replaces a run of ours, and then only the files the run owns (the
marker lists them, each checked to lie inside the folder before anything is deleted); anything else in the folder
stays. ``--out`` may not be the data folder, inside it, or contain it (nor lie inside the folders of a
``--split-file``'s images: :func:`multitask.guard.check_output`), and a ``--split-file`` may not sit among the files
an overwrite would replace. One process at a time: an exclusive lock on ``.lock`` stops a second ``train`` on the
same folder, which is told who holds it; readers (evaluate, export: :func:`reading_run`) hold it shared, so a
``train`` is refused while one of them reads the run, and they are refused while it writes.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import platform
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from multitask.errors import ConfigError, RunError
from multitask.files import (
    atomic_path,
    check_free_space,
    file_sha256,
    open_regular,
    remove_stale_temps,
    write_json,
)
from multitask.guard import LOCK_FILE, MARKER_FILE, check_output, data_roots, owned_paths, read_marker
from multitask.runcheck import CONFIG_FORMAT, REQUIRED_FIELDS, check_config, load_checked_model
from multitask.settings import TrainConfig
from multitask.taxonomy import Taxonomy

log = logging.getLogger(__name__)

MODEL_FILE = "model.keras"
CONFIG_FILE = "config.json"
SPLIT_FILE = "split.csv"
HISTORY_FILE = "history.csv"
HISTORY_PLOT = "history.png"
EXPORT_DIR = "export"  # checked exports of the model (multitask.export)
OOD_FILE = "ood.json"  # the out-of-distribution detector (multitask.ood) ...
OOD_ARRAYS_FILE = "ood.npz"  # ... and its arrays beside it
STATE_DIR = "train-state"  # backups and phase results of an unfinished run; removed when the run completes
CACHE_DIR = "cache"
TENSORBOARD_DIR = "logs"
# What train writes; overwrite removes these and whatever later steps recorded with claim_files.
TRAIN_FILES = (CONFIG_FILE, MODEL_FILE, SPLIT_FILE, HISTORY_FILE, HISTORY_PLOT, STATE_DIR, TENSORBOARD_DIR, OOD_FILE,
               OOD_ARRAYS_FILE)
# Settings that do not change what a run computes, so a run may be resumed with other values.
RESUMABLE_ANYWAY = ("verbose", "overwrite", "cache_dir", "strategy")
MODEL_BYTES = 100 * 2**20  # a joint model's weights in float32; checkpoints and backups hold a few copies
# Size bounds of the run files read through multitask.files.open_regular (far above what a run writes).
CONFIG_MAX_BYTES = 64 * 2**20
SPLIT_MAX_BYTES = 2**30
MODEL_MAX_BYTES = 16 * 2**30
OOD_MAX_BYTES = 2**30


def package_versions() -> dict[str, str]:
    """Versions of Python and the packages whose behaviour a run depends on."""
    versions = {"python": platform.python_version()}
    for name in ("multitask", "tensorflow", "keras", "keras-cv", "numpy", "pandas", "scikit-learn"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


# ----------------------------------------------------------------------------------------------- reading a run


@dataclass(frozen=True)
class RunInfo:
    """What a reader needs to know about a finished run."""

    path: Path
    config: dict[str, Any]

    @property
    def task(self) -> str:
        return self.config["task"]

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.config["tasks"])

    @property
    def image_size(self) -> int:
        return int(self.config["image_size"])

    @property
    def labels(self) -> dict[str, list[str]]:
        return self.config["labels"]

    @property
    def taxonomy(self) -> Taxonomy:
        return Taxonomy.from_records(self.config["taxonomy"], source=f"{self.path / CONFIG_FILE}")

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def split_path(self) -> Path:
        return self.path / SPLIT_FILE

    @property
    def calibration(self) -> dict[str, Any]:
        """What train fitted on the validation split (multitask.calibration): temperatures, threshold."""
        return self.config.get("calibration") or {}

    @property
    def temperatures(self) -> dict[str, float]:
        """Per-head temperatures (1 for a run that has none)."""
        fitted = self.calibration.get("temperatures") or {}
        return {task: float(fitted.get(task, 1.0)) for task in self.tasks}

    @property
    def malignancy_threshold(self) -> float | None:
        """The operating point on calibrated P(Malignant), or None for a run without one."""
        value = self.calibration.get("malignancy_threshold")
        return None if value is None else float(value)

    @property
    def organ_thresholds(self) -> dict[str, dict[str, Any]]:
        """Per organ, its operating point ``{"threshold", "source": "organ" | "global", "n_malignant", "n_benign",
        "val_sensitivity", ...}`` (applied by PREDICTED organ); empty for a run without them (older runs, a
        single-task run, no malignant validation images): those decide with :attr:`malignancy_threshold`."""
        table = self.calibration.get("malignancy_thresholds") or {}
        return {organ: dict(row) for organ, row in table.items()} if "organ" in self.tasks else {}

    @property
    def ood_path(self) -> Path:
        return self.path / OOD_FILE

    def load_ood(self):
        """The run's out-of-distribution detector (multitask.ood), or None for a run without one; RunError when
        one of its files is there but is not a regular file (a FIFO would block the reader forever) or too big."""
        if not os.path.lexists(self.ood_path):
            return None
        for path in (self.ood_path, self.path / OOD_ARRAYS_FILE):
            try:
                open_regular(path, max_bytes=OOD_MAX_BYTES).close()
            except OSError as exc:
                raise RunError(f"cannot read {path}: {exc.strerror}; retrain the run, or delete {OOD_FILE} and "
                               f"{OOD_ARRAYS_FILE} to predict without OOD scores") from None
        from multitask.ood import OodDetector

        return OodDetector.from_json(self.ood_path)

    @property
    def ood_threshold(self) -> float | None:
        return (self.config.get("ood") or {}).get("threshold")

    def load_model(self):
        """The run's Keras model, loaded with safe_mode=True; RunError when the file is damaged, refused, its input
        size is not the run's ``image_size``, or it is not the file the run saved (the SHA-256 in config.json)."""
        model = load_checked_model(self.model_path, image_size=self.image_size, config_path=self.path / CONFIG_FILE)
        self.check_model_hash()
        return model

    def check_model_hash(self) -> None:
        """RunError unless model.keras is the file this run saved (``model_sha256`` in config.json). A run from
        before the hash was recorded is accepted with a warning."""
        recorded = self.config.get("model_sha256")
        if recorded is None:
            log.warning("%s records no model hash (a run from an older multitask): cannot check that %s is the model "
                        "this run trained; retrain it to have the check", self.path / CONFIG_FILE, MODEL_FILE)
            return
        try:
            found = file_sha256(self.model_path, max_bytes=MODEL_MAX_BYTES)
        except OSError as exc:
            raise RunError(f"cannot read {self.model_path} ({exc.strerror}); restore it or retrain the run") from None
        if found != recorded:
            raise RunError(f"{self.model_path} is not the model this run saved (SHA-256 {found[:12]}... where "
                           f"{CONFIG_FILE} records {recorded[:12]}...): its threshold, calibration and labels would be "
                           f"applied to another model. Restore the run's own {MODEL_FILE}, or retrain the run")

    def data_roots(self) -> list[Path]:
        """The data folders of the images in the run's split (multitask.guard.data_roots): no output goes there."""
        images: list[str] = []
        if self.split_path.is_file():
            import pandas as pd

            try:
                with open_regular(self.split_path, max_bytes=SPLIT_MAX_BYTES) as stream:
                    images = pd.read_csv(stream, usecols=["path"], dtype=str)["path"].dropna().tolist()
            except (OSError, ValueError) as exc:
                log.warning("cannot read the image paths of %s (%s); outputs are checked without them",
                            self.split_path, exc)
        data = (self.config.get("settings") or {}).get("data")
        return data_roots(images, declared=[data] if data and os.path.isabs(data) else [], keep=[self.path])


def open_run(run_dir: str | os.PathLike) -> RunInfo:
    """Check that ``run_dir`` is a finished run and return its info; RunError says what is missing or wrong."""
    path = Path(run_dir).expanduser()
    if not path.is_dir():
        raise RunError(f"run directory {path} does not exist; train one with `multitask train --out {path}`")
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise RunError(
            f"{path} is not a finished run: {CONFIG_FILE} is missing (training never finished, or this is not a "
            "run directory); rerun the same `multitask train` command to resume it"
        )
    try:
        with open_regular(config_path, max_bytes=CONFIG_MAX_BYTES) as stream:
            config = json.loads(stream.read().decode("utf-8"))
    except OSError as exc:
        raise RunError(f"cannot read {config_path}: {exc.strerror}; restore it or retrain the run") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunError(f"{config_path} is not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise RunError(f"{config_path} holds a JSON {type(config).__name__}, not an object; retrain the run")
    missing = [k for k in REQUIRED_FIELDS if k not in config]
    if missing or config.get("status") != "complete":
        raise RunError(f"{config_path} is incomplete (missing {missing or 'status=complete'}); retrain the run")
    check_config(config, source=config_path)
    if config.get("format", 1) < CONFIG_FORMAT:
        raise RunError(f"{path} was trained by an older multitask (run format {config.get('format', 1)}, this "
                       f"version reads {CONFIG_FORMAT}); retrain it")
    if not (path / MODEL_FILE).is_file():
        raise RunError(f"{path} has {CONFIG_FILE} but no {MODEL_FILE}; retrain the run")
    return RunInfo(path=path, config=config)


def claim_files(run_dir: str | os.PathLike, names: list[str]) -> None:
    """Record that ``names`` (relative to the run folder) belong to the run, so an overwrite removes them too.

    Evaluation, calibration and export outputs written into a run describe its model: stale once it is replaced.
    """
    marker = Path(run_dir) / MARKER_FILE
    if not marker.is_file():
        return  # not a run folder (e.g. evaluate --out elsewhere): nothing owns these files but the user
    record = read_marker(marker)
    record["files"] = sorted(set(record.get("files", [])) | set(names))
    write_json(record, marker)


# ----------------------------------------------------------------------------------------------- writing a run


class RunLock:
    """A non-blocking lock on ``folder/.lock``, held until :meth:`release` (or the process ends): exclusive for
    ``train``, which writes the run; ``shared`` for evaluate and export, which read it (several at once), so that
    a ``train --overwrite`` cannot replace the model under them, nor they read a run being written."""

    def __init__(self, folder: Path, *, shared: bool = False):
        self.path, self.shared = folder / LOCK_FILE, shared
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            if not shared:
                raise
            try:  # a run on read-only media can still be read; a lock needs only a readable file
                self._fd = os.open(self.path, os.O_RDONLY)
            except OSError:
                log.debug("cannot open %s: reading %s without a lock", self.path, folder)
                self._fd = None
                return
        try:
            fcntl.flock(self._fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 4096, 0).decode("utf-8", "replace").strip() or (
                "another multitask process (an evaluate or export reading the run)")
            os.close(self._fd)
            raise RunError(f"{folder} is in use by {holder}; wait for it to finish, or choose another $out") from None
        if not shared:  # who holds it, for the message of the one refused
            holder = (f"multitask pid {os.getpid()} on {socket.gethostname()} since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')} ({' '.join(sys.argv[:2])})")
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, holder.encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            if not self.shared:
                os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


@contextmanager
def reading_run(run: str | os.PathLike | RunInfo) -> Iterator[RunInfo]:
    """The finished run (:func:`open_run`), read under a shared :class:`RunLock`: a ``train`` writing it is
    refused meanwhile, and one already writing it makes this a RunError."""
    path = run.path if isinstance(run, RunInfo) else open_run(run).path
    lock = RunLock(path, shared=True)
    try:
        yield open_run(path)  # again, under the lock: what it says now cannot change until the block ends
    finally:
        lock.release()


class RunDir:
    """A run folder being written by ``train``: opened (created, resumed or replaced) under an exclusive lock.

    Use as a context manager; the lock is released on exit. ``resuming`` says whether an unfinished run with the
    same settings is being continued.
    """

    def __init__(self, path: Path, lock: RunLock, resuming: bool):
        self.path, self._lock, self.resuming = path, lock, resuming

    @classmethod
    def open(cls, config: TrainConfig, *, needed_bytes: int = 4 * MODEL_BYTES) -> RunDir:
        """Create or reopen ``config.out`` for training; ConfigError/RunError say why it cannot be used."""
        out = Path(config.out).expanduser().absolute()
        _check_inputs_outside(out, config)
        _check_ours_or_empty(out)
        check_output(out, flag="$out", folder=True, data=_split_file_roots(config), run=out)
        out.mkdir(parents=True, exist_ok=True)
        lock = RunLock(out)
        try:
            run = cls(out, lock, resuming=False)
            run._prepare(config, needed_bytes)
        except BaseException:
            lock.release()
            raise
        return run

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc) -> None:
        self._lock.release()

    def _prepare(self, config: TrainConfig, needed_bytes: int) -> None:
        for folder in (self.path, self.state_dir):
            if folder.is_dir():
                remove_stale_temps(folder)
        if (self.path / CONFIG_FILE).is_file() and not config.overwrite:
            raise ConfigError(f"{self.path} already holds a finished run; choose another $out, or pass $overwrite "
                              "to replace it")
        settings_path = self.state_dir / "settings.json"
        if not config.overwrite and settings_path.is_file():
            before = _as_saved_now(json.loads(settings_path.read_text(encoding="utf-8")))
            now = config.to_dict()
            changed = [k for k in now if k not in RESUMABLE_ANYWAY and before.get(k) != now[k]]
            if changed:
                diff = "; ".join(f"{k}: {before.get(k)!r} -> {now[k]!r}" for k in changed)
                raise ConfigError(f"{self.path} holds an unfinished run with other settings ({diff}); rerun the "
                                  "original command to resume it, choose another $out, or pass $overwrite to start "
                                  "over")
            log.info("resuming the unfinished run in %s", self.path)
            self.resuming = True
            return
        try:
            check_free_space(self.path, needed_bytes, what="training (checkpoints and the model)")
        except OSError as exc:
            raise RunError(str(exc.strerror)) from None
        self._remove_owned()
        write_json({"format": 1, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": list(TRAIN_FILES)},
                   self.path / MARKER_FILE)
        write_json(config.to_dict(), settings_path)

    def _remove_owned(self) -> None:
        """Delete what an earlier run of ours left (train's files and the files it claimed), nothing else: every
        name the marker lists is checked to lie inside the run folder before anything is deleted."""
        root = self.path.resolve()
        owned = {root / name for name in TRAIN_FILES}
        if (self.path / MARKER_FILE).is_file():
            owned |= set(owned_paths(self.path))  # RunError for "../x", "/x" or "link/x": nothing deleted then
        for target in sorted(owned):
            if target.parent.resolve() != target.parent or root not in target.parents:
                log.warning("not removing %s: it lies outside the run folder %s", target, self.path)
            elif target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()

    @property
    def state_dir(self) -> Path:
        return self.path / STATE_DIR

    def state(self, name: str) -> Path:
        """Path of a file of the unfinished run's state (backups, phase results)."""
        return self.state_dir / name

    def finish(self, model, record: dict[str, Any]) -> RunInfo:
        """Save the model, write config.json last (``record`` plus status, format and the model file's SHA-256, which
        opening the run checks), drop the training state."""
        save_model(model, self.path / MODEL_FILE)
        record = {**record, "model_sha256": file_sha256(self.path / MODEL_FILE)}
        write_json({"status": "complete", "format": CONFIG_FORMAT, **record}, self.path / CONFIG_FILE)
        shutil.rmtree(self.state_dir, ignore_errors=True)
        return open_run(self.path)


def save_model(model, path: str | os.PathLike) -> Path:
    """Save a Keras model as ``.keras`` atomically: a crash never leaves half a model file behind."""
    try:
        with atomic_path(path) as tmp:
            model.save(tmp)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise RunError(f"no space left to save the model in {Path(path).parent}: free some space and rerun "
                           "the same command (the run resumes)") from exc
        raise
    return Path(path)


def _as_saved_now(settings: dict[str, Any]) -> dict[str, Any]:
    """Settings an older version saved, as this one saves them (balance true/false -> "classes"/"none", a setting
    added since at its default), so that resuming an unfinished run compares like with like; as given if they do not
    load."""
    try:
        return TrainConfig.from_dict(settings).to_dict()
    except (ConfigError, TypeError):
        return settings


def _split_file_roots(config: TrainConfig) -> list[Path]:
    """The data folders of a ``split_file``'s images (multitask.guard.data_roots); none when it cannot be read
    (load_split says why, later)."""
    if not config.split_file:
        return []
    import pandas as pd

    try:
        with open_regular(Path(config.split_file).expanduser(), max_bytes=SPLIT_MAX_BYTES) as stream:
            images = pd.read_csv(stream, usecols=["path"], dtype=str)["path"].dropna().tolist()
    except (OSError, ValueError):
        return []
    return data_roots(images)  # as with --data: a run never lies inside the dataset's folders


def _check_inputs_outside(out: Path, config: TrainConfig) -> None:
    """The data folder and the split file must not be among what the run writes or replaces."""
    if config.data:
        data = Path(config.data).expanduser().resolve()
        resolved = out.resolve()
        if resolved == data or data in resolved.parents or resolved in data.parents:
            raise ConfigError(f"$out {out} must not be the data folder {data}, lie inside it, or contain it: "
                              "choose an $out outside the data")
    if config.split_file:
        split = Path(config.split_file).expanduser().resolve()
        for name in TRAIN_FILES:
            owned = (out / name).resolve()
            if split == owned or owned in split.parents:
                raise ConfigError(f"$split_file {split} lies among the files that a run in {out} writes; copy it "
                                  "elsewhere first, or choose another $out")


def _check_ours_or_empty(out: Path) -> None:
    """Refuse a folder that holds something and is not a run of ours (no marker)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"$out {out} exists and is not a folder; choose another $out")
    if (out / MARKER_FILE).is_file():
        return
    visible = [p.name for p in out.iterdir() if p.name not in (LOCK_FILE, CACHE_DIR)]
    if visible:
        shown = ", ".join(sorted(visible)[:5]) + (", ..." if len(visible) > 5 else "")
        raise ConfigError(f"$out {out} is not empty ({shown}) and is not a multitask run; train never writes into "
                          "a folder of yours: choose a new or empty $out")
