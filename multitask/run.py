"""The run directory: what a training run leaves behind, written atomically, and read back with checks.

A finished run holds::

    model.keras    the end-to-end model (raw RGB 0..255 in, dict of logits out)
    config.json    every setting, label names, taxonomy, package versions, seed, wall time per phase
    split.csv      the exact manifest and split the run used
    history.csv    per-epoch metrics (CSVLogger)
    history.png    loss and accuracy per head

``config.json`` is written last with ``"status": "complete"``; a folder without it is an unfinished run.
Train writes this folder; evaluate and predict only read it.
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from multitask.errors import RunError
from multitask.files import atomic_path, write_json  # noqa: F401  (re-exported: readers and writers of runs)
from multitask.taxonomy import TASKS, Taxonomy

MODEL_FILE = "model.keras"
CONFIG_FILE = "config.json"
SPLIT_FILE = "split.csv"
HISTORY_FILE = "history.csv"
HISTORY_PLOT = "history.png"
CONFIG_FORMAT = 1


def save_model(model, path: str | os.PathLike) -> Path:
    """Save a Keras model as ``.keras`` atomically: a crash never leaves half a model file behind."""
    with atomic_path(path) as tmp:
        model.save(tmp)
    return Path(path)


def package_versions() -> dict[str, str]:
    """Versions of Python and the packages whose behaviour a run depends on."""
    versions = {"python": platform.python_version()}
    for name in ("multitask", "tensorflow", "keras", "keras-cv", "numpy", "pandas", "scikit-learn"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


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

    def load_model(self):
        """The run's Keras model, loaded with safe_mode=True."""
        import keras

        return keras.models.load_model(self.model_path, compile=False)


def open_run(run_dir: str | os.PathLike) -> RunInfo:
    """Check that ``run_dir`` is a finished run and return its info; RunError says what is missing."""
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
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunError(f"{config_path} is not valid JSON ({exc})") from exc
    missing = [k for k in ("task", "tasks", "image_size", "labels", "taxonomy") if k not in config]
    if missing or config.get("status") != "complete":
        raise RunError(f"{config_path} is incomplete (missing {missing or 'status=complete'}); retrain the run")
    if any(t not in TASKS for t in config["tasks"]):
        raise RunError(f"{config_path}: unknown task(s) {config['tasks']}")
    if not (path / MODEL_FILE).is_file():
        raise RunError(f"{path} has {CONFIG_FILE} but no {MODEL_FILE}; retrain the run")
    return RunInfo(path=path, config=config)
