"""Predictor: load a finished run, stream image files through tf.data, one forward pass for both heads.

The output is a DataFrame with one row per input file, in input order::

    path, organ, organ_prob, cancer, cancer_prob, p_organ_<Label>..., p_cancer_<Label>..., error

``organ`` / ``cancer`` are the predicted class names (argmax), ``*_prob`` their probabilities, and
``p_<task>_<Label>`` the softmax of each head's logits over every class (so each task's ``p_`` columns sum to 1).
A single-task run has only its own task's columns. ``error`` is missing (``frame["error"].isna()``) for a
predicted file and says why otherwise (missing, empty, truncated, not an image); such rows have no prediction.

Unreadable files are found by TensorFlow's own decoder, the one the model is fed with: the pipeline decodes
(index, image) pairs with ``ignore_errors()``, so a failed index is simply absent from the output, and only those
few files are opened again with PIL (:func:`multitask.data.image_problem`) to say *why*. No per-file PIL check is
needed in the hot path (it would cost ~0.4 ms per 96-px file on one core): TensorFlow 2.21's decoders do not
decode truncated files silently. Checked for JPEG (baseline and progressive, cut at 50/80/95/99% or just before
the end-of-image marker), PNG, BMP and GIF (cut at 50/90/99%): all raise, and TensorFlow is even stricter than
PIL for a PNG missing its last byte. ``tests/test_predict.py`` keeps the JPEG part of this checked.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from multitask.data import IMAGE_EXTENSIONS, image_problem, indexed_images, is_image_file, load_split
from multitask.errors import DataError, RunError
from multitask.files import write_csv, write_json
from multitask.rundir import RunInfo, open_run
from multitask.settings import BATCH_SIZE

log = logging.getLogger(__name__)

OUTPUT_FORMATS = (".csv", ".json")
TF_ONLY_PROBLEM = "TensorFlow cannot decode it (damaged, or an image format it does not read)"
GLOB_CHARS = frozenset("*?[")


def probability_column(task: str, label: str) -> str:
    """Name of the column holding the probability of class ``label`` of ``task``, e.g. ``p_cancer_Malignant``."""
    return f"p_{task}_{label}"


def collect_images(inputs: Iterable[str | os.PathLike]) -> list[str]:
    """Files to predict: files as given, image files under folders (recursive, sorted) and matches of globs.

    A named file is kept whatever its extension or existence (a missing one gets an error row, not silence);
    folders and globs contribute image files only (:func:`multitask.data.is_image_file`).
    """
    files: list[str] = []
    for item in map(str, inputs):
        path = os.path.expanduser(item)
        if os.path.isdir(path):
            found = _images_under(path)
            if not found:
                log.warning("no image files under %s", path)
            files.extend(found)
        elif os.path.exists(path) or not GLOB_CHARS.intersection(path):
            files.append(path)
        else:
            matches = sorted(glob.glob(path, recursive=True))
            found = [m for m in matches if os.path.isfile(m) and is_image_file(m)]
            for folder in (m for m in matches if os.path.isdir(m)):
                found.extend(_images_under(folder))
            if not found:
                log.warning("no image files match %s", path)
            files.extend(found)
    return files


def _images_under(folder: str) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        found.extend(os.path.join(dirpath, f) for f in sorted(filenames) if is_image_file(f))
    return found


class Predictor:
    """A run's Keras model plus its label names and input size; turns image files into a predictions table."""

    def __init__(self, model, *, labels: dict[str, Sequence[str]], image_size: int):
        import tensorflow as tf

        from multitask.model import model_tasks

        self.model = model
        self.tasks = model_tasks(model)
        missing = [t for t in self.tasks if t not in labels]
        if not self.tasks or missing:
            raise RunError(f"model outputs {list(model.output_names)} do not match the run's labels {list(labels)}")
        self.labels = {task: tuple(labels[task]) for task in self.tasks}
        self.image_size = int(image_size)
        # One trace for every batch size (the last batch is smaller): the batch dimension is left open.
        spec = tf.TensorSpec((None, self.image_size, self.image_size, 3), tf.float32)
        self._probabilities = tf.function(self._softmax, input_signature=[spec])
        self._gradcam = None  # built on first use: most predictions need no gradients

    @classmethod
    def from_run(cls, run: str | os.PathLike | RunInfo) -> Predictor:
        """Load a finished run's model (``run.open_run`` explains what is missing if it is not one)."""
        info = run if isinstance(run, RunInfo) else open_run(run)
        predictor = cls(info.load_model(), labels=info.labels, image_size=info.image_size)
        if set(predictor.tasks) != set(info.tasks):
            raise RunError(f"{info.model_path} predicts {predictor.tasks} but {info.path} says {info.tasks}")
        return predictor

    def _softmax(self, images):
        import tensorflow as tf

        logits = self.model(images, training=False)
        return {task: tf.nn.softmax(logits[task], axis=-1) for task in self.tasks}

    def predict_arrays(self, images, *, batch_size: int = BATCH_SIZE) -> dict[str, np.ndarray]:
        """Class probabilities per task for in-memory RGB images (N, H, W, 3) in 0..255, resized if needed."""
        import tensorflow as tf

        images = tf.convert_to_tensor(images, tf.float32)
        if images.shape.rank != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected RGB images of shape (N, H, W, 3), got {tuple(images.shape)}")
        if tuple(images.shape[1:3]) != (self.image_size, self.image_size):  # as data.load_image does
            images = tf.image.resize(images, (self.image_size, self.image_size), antialias=True)
            images = tf.clip_by_value(images, 0.0, 255.0)
        parts = [self._probabilities(images[i: i + batch_size]) for i in range(0, int(images.shape[0]), batch_size)]
        return {task: np.concatenate([p[task].numpy() for p in parts]).reshape(-1, len(self.labels[task]))
                for task in self.tasks}

    def predict(self, inputs: Iterable[str | os.PathLike], *, batch_size: int = BATCH_SIZE,
                progress: bool | None = None) -> pd.DataFrame:
        """Predictions for files, folders and globs (see :func:`collect_images`); one row per file."""
        files = collect_images(inputs)
        if not files:
            raise DataError("no image files found in the given paths; pass image files, folders or globs "
                            f"(image extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
        return self.predict_files(files, batch_size=batch_size, progress=progress)

    def predict_files(self, files: Sequence[str], *, batch_size: int = BATCH_SIZE,
                      progress: bool | None = None) -> pd.DataFrame:
        """Predictions for exactly ``files``, in order; DataError when none of them can be read."""
        files = [str(f) for f in files]
        if not files:
            raise DataError("no files to predict")
        probs = {task: np.full((len(files), len(self.labels[task])), np.nan, np.float32) for task in self.tasks}
        done = np.zeros(len(files), bool)
        show = progress if progress is not None else len(files) > 10 * batch_size
        bar = _progress_bar(len(files)) if show else None
        for index, images in self._batches(files, batch_size):
            index = index.numpy()
            for task, p in self._probabilities(images).items():
                probs[task][index] = p.numpy()
            done[index] = True
            if bar is not None:
                bar.update(int(index[-1]) + 1)
        if bar is not None and not done[-1]:  # the last files failed: the bar has not reached its end yet
            bar.update(len(files))
        # Only the files TensorFlow rejected are opened again, to say why.
        problems = {files[i]: image_problem(files[i]) or TF_ONLY_PROBLEM for i in np.flatnonzero(~done)}
        if not done.any():
            shown = "; ".join(f"{path}: {why}" for path, why in list(problems.items())[:5])
            raise DataError(f"none of the {len(files)} file(s) could be read as an image ({shown})")
        for path, why in problems.items():
            log.warning("cannot predict %s: %s", path, why)
        errors = [None if ok else problems[path] for path, ok in zip(files, done, strict=True)]
        return self._table(files, probs, done, errors)

    @property
    def gradcam(self):
        """The run's :class:`multitask.explain.GradCam`, built on first use (most predictions need no gradients)."""
        from multitask.explain import GradCam

        if self._gradcam is None:
            self._gradcam = GradCam(self.model)
        return self._gradcam

    def heatmaps(self, files: Sequence[str], *, batch_size: int = 16):
        """Grad-CAM batches ``(indices, images, {task: (n, h, w) heatmaps}, {task: predicted ids})`` of ``files``.

        Unreadable files are skipped (their index is absent); see :mod:`multitask.explain` for the method.
        """
        for index, images in self._batches([str(f) for f in files], batch_size):
            cams, predicted = self.gradcam(images)
            yield index.numpy(), images.numpy(), cams, predicted

    def explain(self, path: str | os.PathLike, head: str = "organ") -> np.ndarray:
        """Grad-CAM heatmap of ``head``'s predicted class for one image file: a 2-D array in [0, 1] at the
        resolution of the explained block's feature map (mixed10: 6x6 for 256 px inputs; see multitask.explain)."""
        if head not in self.tasks:
            raise DataError(f"this run has no {head!r} head; its heads are {', '.join(self.tasks)}")
        for _, _, cams, _ in self.heatmaps([path], batch_size=1):
            return cams[head][0]
        raise DataError(f"cannot explain {path}: {image_problem(str(path)) or TF_ONLY_PROBLEM}")

    def write_explanations(self, frame: pd.DataFrame, out_dir: str | os.PathLike, *,
                           batch_size: int = 16) -> pd.DataFrame:
        """Write one overlay PNG per head for every predicted row of ``frame``; add ``explain_<task>`` columns."""
        from multitask.explain import save_overlay

        out_dir = Path(out_dir)
        frame = frame.copy()
        readable = frame.index[frame["error"].isna()]
        for task in self.tasks:
            frame[f"explain_{task}"] = None
        files = frame.loc[readable, "path"].tolist()
        for index, images, cams, _ in self.heatmaps(files, batch_size=batch_size):
            for i, image in zip(index, images, strict=True):
                row = readable[i]
                stem = f"{row:05d}_{Path(files[i]).stem}"
                for task in self.tasks:
                    title = f"{task}: {frame.at[row, task]} ({frame.at[row, f'{task}_prob']:.2f})"
                    path = save_overlay(image, {task: cams[task][i]}, {task: title}, out_dir / f"{stem}_{task}.png")
                    frame.at[row, f"explain_{task}"] = str(path)
        return frame

    def _batches(self, files: Sequence[str], batch_size: int):
        return indexed_images(files, image_size=self.image_size, batch_size=batch_size)

    def _table(self, files, probs, done, errors) -> pd.DataFrame:
        columns: dict[str, object] = {"path": files}
        for task in self.tasks:
            labels = np.asarray(self.labels[task], object)
            best = np.nan_to_num(probs[task], nan=-1.0).argmax(axis=1)
            columns[task] = np.where(done, labels[best], None)
            columns[f"{task}_prob"] = probs[task].max(axis=1)  # NaN where the file could not be read
        for task in self.tasks:
            for j, label in enumerate(self.labels[task]):
                columns[probability_column(task, label)] = probs[task][:, j]
        columns["error"] = errors
        return pd.DataFrame(columns)


def _progress_bar(total: int):
    import keras

    return keras.utils.Progbar(total, unit_name="image")


def write_predictions(frame: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Save a predictions table as CSV or JSON records (by extension), atomically."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in OUTPUT_FORMATS:
        raise DataError(f"cannot write predictions to {path}: use a .csv or .json file name")
    if suffix == ".json":  # via pandas' encoder (NaN -> null, numpy scalars), without its escaped slashes
        return write_json(json.loads(frame.to_json(orient="records")), path)
    return write_csv(frame, path, float_format="%.6g")


def sample_predictions(run: str | os.PathLike | RunInfo, n: int, *, split: str = "test", seed: int | None = None,
                       batch_size: int = BATCH_SIZE, predictor: Predictor | None = None) -> pd.DataFrame:
    """Predictions for ``n`` random images of the run's own ``split`` beside their true labels (never train).

    Adds ``true_<task>`` before each predicted ``<task>`` column and a boolean ``<task>_hit`` column per task.
    """
    if split == "train":
        raise DataError("$split train would show images the model was trained on, which says nothing about how "
                        "it generalises; use $split test (default) or $split val")
    if n < 1:
        raise DataError(f"--sample needs a positive number of images, got {n}")
    info = run if isinstance(run, RunInfo) else open_run(run)
    manifest = load_split(info.split_path, taxonomy=info.taxonomy)
    pool = manifest[manifest["split"] == split]
    if pool.empty:
        raise DataError(f"{info.split_path} has no {split} images; try $split test or $split val")
    chosen = pool.sample(n=min(n, len(pool)), random_state=np.random.default_rng(seed)).reset_index(drop=True)
    predictor = predictor or Predictor.from_run(info)
    frame = predictor.predict_files(chosen["path"].tolist(), batch_size=batch_size, progress=False)
    for task in predictor.tasks:
        frame.insert(frame.columns.get_loc(task), f"true_{task}", chosen[task])
        frame[f"{task}_hit"] = frame[task] == frame[f"true_{task}"]
    return frame
