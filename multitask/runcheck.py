"""What a run folder holds, checked before use: ``config.json``'s fields and ``model.keras``'s archive.

Each problem becomes one :class:`multitask.errors.RunError` line that names the file and says what to do: a field
of the wrong type or value, an empty or truncated model, a model that Keras' safe mode refuses because it contains
code (never with advice to turn safe mode off). :mod:`multitask.rundir` calls these when it opens a run.
"""

from __future__ import annotations

import json
import math
import os
import zipfile
from pathlib import Path
from typing import Any

from multitask.errors import RunError, TaxonomyError
from multitask.taxonomy import TASKS, Taxonomy

CONFIG_FORMAT = 2  # 2: the heads are a nested sub-model (multitask.model.model_parts)

REPAIR_HINT = "Retrain the run, or restore model.keras from a backup"
ZIP_SIGNATURE = b"PK\x03\x04"
# What keras.models.load_model raises for a damaged archive: JSON and deserialisation errors (ValueError), h5py's
# OSError / RuntimeError / KeyError, zipfile.BadZipFile; a safe-mode refusal is a ValueError too.
MODEL_READ_ERRORS = (ValueError, OSError, KeyError, RuntimeError, TypeError, EOFError, zipfile.BadZipFile)


def _check_model_archive(path: Path) -> None:
    """RunError unless ``path`` looks like a whole ``.keras`` archive: a zip with its end-of-archive record."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(len(ZIP_SIGNATURE))
    problem = ("empty" if size == 0 else "not a zip archive" if head != ZIP_SIGNATURE
               else "cut short: no end-of-archive record" if not zipfile.is_zipfile(path) else None)
    if problem:
        raise RunError(f"{path} is damaged ({problem}; {size:,} bytes): expected a complete .keras archive, a zip "
                       f"holding config.json and model.weights.h5 (tens of MB for an InceptionV3 model). {REPAIR_HINT}")


def _refused_by_safe_mode(exc: Exception) -> bool:
    text = str(exc)  # keras says how to switch safe mode off; we never pass that advice on
    return "safe_mode" in text or "unsafe_deserialization" in text


def _short(exc: Exception, limit: int = 200) -> str:
    """The first line of an exception's message, cut to ``limit`` characters."""
    text = (str(exc).strip().splitlines() or [""])[0]
    return text[:limit] + ("..." if len(text) > limit else "")



REQUIRED_FIELDS = ("task", "tasks", "image_size", "labels", "taxonomy")
TASKS_OF = {"joint": TASKS, **{task: (task,) for task in TASKS}}


def check_config(config: dict[str, Any], *, source: str | os.PathLike) -> None:
    """RunError naming the field, its value and ``source`` unless every field a reader uses has the right type
    and value: format (a whole number, when present), task, tasks (those of task), image_size (a positive whole
    number), labels (exactly the taxonomy's, in order), taxonomy (a valid table), and the optional calibration
    (positive temperatures, a threshold in 0..1, per-organ thresholds in 0..1 keyed by the run's organs) and ood
    (a numeric threshold)."""

    def bad(field: str, expected: str) -> RunError:
        value = json.dumps(config[field])
        shown = value if len(value) <= 80 else value[:77] + "..."
        return RunError(f"{source}: field {field!r} is {shown}; expected {expected}. The file is damaged or was "
                        "edited: retrain the run, or restore config.json from a backup")

    if "format" in config and (isinstance(config["format"], bool) or not isinstance(config["format"], int)):
        raise bad("format", f"a whole number (this version writes {CONFIG_FORMAT})")
    task = config["task"]
    if not isinstance(task, str) or task not in TASKS_OF:
        raise bad("task", f"one of {', '.join(TASKS_OF)}")
    if not isinstance(config["tasks"], list) or tuple(config["tasks"]) != TASKS_OF[task]:
        raise bad("tasks", f"{json.dumps(list(TASKS_OF[task]))} for task {task!r}")
    size = config["image_size"]
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise bad("image_size", "a positive whole number of pixels, the model's input size")
    try:
        taxonomy = Taxonomy.from_records(config["taxonomy"], source=f"{source}, field 'taxonomy'")
    except (TaxonomyError, TypeError, ValueError, KeyError, AttributeError) as exc:
        raise RunError(f"{source}: field 'taxonomy' is not a valid subclass table ({_short(exc)}); retrain the run, "
                       "or restore config.json from a backup") from None
    labels = config["labels"]
    expected = {t: list(taxonomy.labels(t)) for t in TASKS_OF[task]}
    if labels != expected:
        raise bad("labels", f"{json.dumps(expected)} (the taxonomy's labels, in order)")
    calibration = config.get("calibration") or {}
    temperatures = (calibration.get("temperatures") or {}) if isinstance(calibration, dict) else None
    if (not isinstance(temperatures, dict) or not all(_is_number(t) and t > 0 for t in temperatures.values())
            or not _is_number(calibration.get("malignancy_threshold", 0.5), low=0.0, high=1.0)):
        raise bad("calibration", 'null, or {"temperatures": {task: a positive number}, "malignancy_threshold": a '
                                 "number from 0 to 1 or null}")
    organ_table = calibration.get("malignancy_thresholds") or {}
    if (not isinstance(organ_table, dict) or not set(organ_table) <= set(labels.get("organ", organ_table))
            or not all(isinstance(row, dict) and row.get("threshold") is not None
                       and _is_number(row["threshold"], low=0.0, high=1.0) for row in organ_table.values())):
        raise bad("calibration", '{"malignancy_thresholds": {organ label: {"threshold": a number from 0 to 1, ...}}} '
                                 "naming the run's organs")
    ood = config.get("ood") or {}
    if not isinstance(ood, dict) or not _is_number(ood.get("threshold", 0.0)):
        raise bad("ood", 'null, or {"threshold": a number or null}')
    sha = config.get("model_sha256")
    if sha is not None and not (isinstance(sha, str) and len(sha) == 64 and set(sha) <= set("0123456789abcdef")):
        raise bad("model_sha256", "the SHA-256 of model.keras, 64 lowercase hex digits")


def _is_number(value: Any, *, low: float = -math.inf, high: float = math.inf) -> bool:
    """A finite JSON number (not a boolean) within [low, high]; None counts (an optional value left out)."""
    if value is None:
        return True
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) \
        and low <= value <= high


def load_checked_model(path: Path, *, image_size: int, config_path: Path):
    """The Keras model at ``path``, loaded with safe_mode=True; RunError when the file is damaged, refused, or its
    input size is not ``image_size`` (what the run's ``config_path`` says)."""
    import keras

    _check_model_archive(path)
    try:
        model = keras.models.load_model(path, compile=False)
    except MODEL_READ_ERRORS as exc:
        if _refused_by_safe_mode(exc):
            raise RunError(
                f"{path} was refused for safety: the file contains code (e.g. a Lambda layer) that loading it "
                "would run. Models written by `multitask train` contain only built-in layers. Retrain the run, "
                "or restore model.keras from a copy you made yourself"
            ) from None
        raise RunError(f"{path} is damaged: keras cannot read it ({type(exc).__name__}: {_short(exc)}). "
                       f"{REPAIR_HINT}") from exc
    size = tuple(model.input_shape[1:3])
    if size != (image_size, image_size):
        raise RunError(f"{config_path}: field 'image_size' is {image_size} but {path} takes "
                       f"{size[0]}x{size[1]} px images, so the two files come from different runs; "
                       "retrain the run or restore the matching files")
    return model
