"""Predictor: load a finished run, stream image files through tf.data, one forward pass answers everything.

The output is a DataFrame with one row per input file, in input order::

    path, organ, organ_prob, cancer, malignant_prob, malignancy_threshold, threshold_source, ood_score, ood, note,
    p_organ_<Label>..., p_cancer_<Label>..., cancer_prob, error

``organ`` is the most probable organ and ``organ_prob`` its probability. ``cancer`` is Malignant when
P(Malignant) >= ``malignancy_threshold``, the operating point that applied to that row, chosen on validation
for a target sensitivity; ``threshold_source`` says which: ``organ`` (the PREDICTED organ's own threshold),
``global`` (the run's threshold over all organs: a single-task run, an organ with too few validation images, a
run older than per-organ thresholds), ``given`` (``threshold=``, i.e. ``--threshold``, overrides all) or
``default`` (0.5: a run without an operating point, or uncalibrated probabilities). ``malignant_prob`` is
P(Malignant), whatever the answer, to read against that threshold (the probability of the decided class put
"Malignant 0.434" beside "Benign 0.432"); ``cancer_prob``, near the end, is still the decided class's probability,
for API clients. ``p_<task>_<Label>``
are every class's probabilities (each task's sum to 1). Probabilities are calibrated (temperature-scaled per head)
unless the predictor was made with ``calibrated=False``. ``ood_score`` says how unlike the training images the
input is, and ``ood`` whether it exceeds the run's threshold; with ``reject_ood`` such rows get no ``organ`` or
``cancer`` answer and a ``note`` that says why. A single-task run has only its own task's columns; a run without
an out-of-distribution detector has no ``ood`` columns. ``error`` is missing (``frame["error"].isna()``) for a
predicted file and says why otherwise (missing, empty, truncated, not an image); such rows have no prediction.

With flip test-time augmentation (``tta=True``, ``--tta``) a ``tta`` column (True) comes before ``error``: each
image's calibrated probabilities are the mean of the image's and its horizontal mirror's
(:class:`multitask.engines.FlipAveraged`), so ``organ`` is the argmax of the averaged organ probabilities and picks
the per-organ threshold, which P(Malignant), averaged the same way, is read against. The thresholds and
temperatures were chosen on single-view probabilities, so the sensitivity promised at the operating point holds
only approximately: ``multitask evaluate --tta`` measures it. ``ood_score`` is the original image's alone (why: see
FlipAveraged). Grad-CAM (``--explain``) explains the original image.

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
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from multitask.data import IMAGE_EXTENSIONS, image_problem, indexed_images, is_image_file
from multitask.engines import Engine, FlipAveraged
from multitask.errors import ConfigError, DataError, RunError
from multitask.files import file_sha256, write_csv, write_json
from multitask.filesystem import WalkReport, is_regular_file, log_walk_report, walk_files
from multitask.inference import OOD_SCORE
from multitask.rundir import RunInfo, open_run
from multitask.settings import BATCH_SIZE
from multitask.splits import load_split
from multitask.taxonomy import MALIGNANT

log = logging.getLogger(__name__)

OUTPUT_FORMATS = (".csv", ".json")
TF_ONLY_PROBLEM = "TensorFlow cannot decode it (damaged, or an image format it does not read)"
GLOB_CHARS = frozenset("*?[")
DEFAULT_THRESHOLD = 0.5  # the malignancy threshold of a run that has none (e.g. trained without validation images)


def probability_column(task: str, label: str) -> str:
    """Name of the column holding the probability of class ``label`` of ``task``, e.g. ``p_cancer_Malignant``."""
    return f"p_{task}_{label}"


def collect_images(inputs: Iterable[str | os.PathLike]) -> list[str]:
    """Files to predict: files as given, image files under folders (recursive, sorted) and matches of globs.

    A named file is kept whatever its extension, existence or kind (a missing file or a FIFO gets an error row,
    not silence); folders and globs contribute regular image files only (:func:`multitask.filesystem.walk_files`:
    folder links that loop are not followed, a file reached twice is listed once).
    """
    files: list[str] = []
    for item in map(str, inputs):
        path = os.path.expanduser(item)
        if os.path.isdir(path):
            found = _images_under(path)
            if not found:
                log.warning("no image files under %s", path)
            files.extend(found)
        elif os.path.lexists(path) or not GLOB_CHARS.intersection(path):
            files.append(path)
        else:
            matches = sorted(glob.glob(path, recursive=True))
            found = [m for m in matches if is_regular_file(m) and is_image_file(m)]
            for folder in (m for m in matches if os.path.isdir(m)):
                found.extend(_images_under(folder))
            if not found:
                log.warning("no image files match %s", path)
            files.extend(found)
    return files


def _images_under(folder: str) -> list[str]:
    report = WalkReport()
    found = [path for _, images in walk_files(folder, keep=is_image_file, report=report) for path in images]
    log_walk_report(report, folder)
    return found


class Predictor:
    """A run's inference engine plus its labels, operating point and input size: image files in, a table out."""

    model_sha256: str | None = None  # the run's model file (from_run sets it): what a --shard part records

    def __init__(self, engine: Engine, *, labels: dict[str, Sequence[str]], threshold: float | None = None,
                 ood_threshold: float | None = None, model=None, organ_thresholds: Mapping[str, float] | None = None,
                 threshold_source: str | None = None, tta: bool = False):
        self.tta = bool(tta)  # flip test-time augmentation: every forward pass goes through FlipAveraged
        self.engine = FlipAveraged(engine) if self.tta else engine
        self.tasks = engine.tasks
        missing = [t for t in self.tasks if t not in labels]
        if not self.tasks or missing:
            raise RunError(f"engine outputs {list(engine.output_names)} do not match the run's labels {list(labels)}")
        self.labels = {task: tuple(labels[task]) for task in self.tasks}
        self.image_size = engine.image_size
        self.threshold = DEFAULT_THRESHOLD if threshold is None else float(threshold)
        if not 0 <= self.threshold <= 1:
            raise ConfigError(f"$threshold must be a probability between 0 and 1, got {threshold}")
        # Where self.threshold comes from; organ_thresholds (predicted organ -> threshold) take precedence over it.
        self.threshold_source = threshold_source or ("default" if threshold is None else "global")
        self.organ_thresholds = ({organ: float(t) for organ, t in (organ_thresholds or {}).items()}
                                 if "organ" in self.tasks else {})
        if not all(0 <= t <= 1 for t in self.organ_thresholds.values()):
            raise RunError(f"per-organ malignancy thresholds must lie in 0..1, got {self.organ_thresholds}")
        self.ood_threshold = ood_threshold if OOD_SCORE in engine.output_names else None
        self.model = model  # the run's Keras model, for Grad-CAM
        self._gradcam = None  # built on first use: most predictions need no gradients

    @classmethod
    def from_run(cls, run: str | os.PathLike | RunInfo, *, engine: str = "keras", calibrated: bool = True,
                 threshold: float | None = None, tta: bool = False) -> Predictor:
        """Load a finished run (``rundir.open_run`` says what is missing if it is not one) with its ``engine``
        (keras, onnx, int8: the latter two are exported on first use) and its own operating point, unless
        ``threshold`` overrides it (and the per-organ ones). ``calibrated=False`` shows the raw softmax (keras engine
        only), judged at 0.5 unless ``threshold`` is given: the run's threshold was chosen on calibrated
        probabilities. ``tta=True`` averages each image's probabilities with its horizontal mirror's (see the
        module docstring), at twice the forward pass's cost."""
        from multitask.export import load_engine, require_engine_extras

        info = run if isinstance(run, RunInfo) else open_run(run)
        if not calibrated and engine != "keras":
            raise ConfigError(f"$uncalibrated needs the keras engine: the {engine} export holds the calibrated graph")
        require_engine_extras(info, engine)  # a missing package is named before the model loads
        model = info.load_model()
        runtime = load_engine(info, engine, model=model, calibrated=calibrated)
        if set(runtime.tasks) != set(info.tasks):
            raise RunError(f"{info.model_path} predicts {runtime.tasks} but {info.path} says {info.tasks}")
        source, organ_thresholds = "given" if threshold is not None else "default", {}
        if threshold is None and calibrated and info.malignancy_threshold is not None:
            threshold, source = info.malignancy_threshold, "global"
            organ_thresholds = {organ: row["threshold"] for organ, row in info.organ_thresholds.items()
                                if row.get("source") == "organ"}
        predictor = cls(runtime, labels=info.labels, threshold=threshold, ood_threshold=info.ood_threshold,
                        model=model, organ_thresholds=organ_thresholds, threshold_source=source, tta=tta)
        predictor.model_sha256 = info.config.get("model_sha256") or file_sha256(info.model_path)
        return predictor

    def thresholds_for(self, organs: Sequence[str | None]) -> tuple[np.ndarray, np.ndarray]:
        """Per image, the malignancy threshold to decide with and its ``threshold_source``: the predicted organ's
        own threshold ("organ") where it has one, else :attr:`threshold` (its source: global, given or default)."""
        own = [self.organ_thresholds.get(organ) if isinstance(organ, str) else None for organ in organs]
        threshold = np.array([self.threshold if t is None else t for t in own], np.float64)
        source = np.array([self.threshold_source if t is None else "organ" for t in own], object)
        return threshold, source

    def predict_arrays(self, images, *, batch_size: int = BATCH_SIZE) -> dict[str, np.ndarray]:
        """The engine's outputs (probabilities per task, ``ood_score``) for in-memory RGB images (N, H, W, 3) in
        0..255, resized as :func:`multitask.data.load_image` does if needed."""
        import tensorflow as tf

        images = tf.convert_to_tensor(images, tf.float32)
        if images.shape.rank != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected RGB images of shape (N, H, W, 3), got {tuple(images.shape)}")
        if tuple(images.shape[1:3]) != (self.image_size, self.image_size):  # as data.load_image does
            images = tf.clip_by_value(tf.image.resize(images, (self.image_size, self.image_size), antialias=True),
                                      0.0, 255.0)
        parts = [self.engine(images[i: i + batch_size].numpy()) for i in range(0, int(images.shape[0]), batch_size)]
        return {name: np.concatenate([p[name] for p in parts]) for name in self.engine.output_names}

    def predict(self, inputs: Iterable[str | os.PathLike], *, batch_size: int = BATCH_SIZE,
                progress: bool | None = None, reject_ood: bool = False) -> pd.DataFrame:
        """Predictions for files, folders and globs (see :func:`collect_images`); one row per file."""
        files = collect_images(inputs)
        if not files:
            raise DataError("no image files found in the given paths; pass image files, folders or globs "
                            f"(image extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
        return self.predict_files(files, batch_size=batch_size, progress=progress, reject_ood=reject_ood)

    def predict_files(self, files: Sequence[str], *, batch_size: int = BATCH_SIZE, progress: bool | None = None,
                      reject_ood: bool = False) -> pd.DataFrame:
        """Predictions for exactly ``files``, in order; DataError when none of them can be read."""
        files = [str(f) for f in files]
        if not files:
            raise DataError("no files to predict")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"$batch_size must be a whole number of at least 1, got {batch_size!r}")
        self.check_reject_ood(reject_ood)
        outputs = {name: None for name in self.engine.output_names}
        done = np.zeros(len(files), bool)
        show = progress if progress is not None else len(files) > 10 * batch_size
        bar = _progress_bar(len(files)) if show else None
        for index, images in indexed_images(files, image_size=self.image_size, batch_size=batch_size):
            index = index.numpy()
            for name, value in self.engine(images).items():
                if outputs[name] is None:
                    outputs[name] = np.full((len(files), *value.shape[1:]), np.nan, np.float32)
                outputs[name][index] = value
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
        return self.table(files, outputs, errors, reject_ood=reject_ood)

    def check_reject_ood(self, reject_ood: bool) -> None:
        """ConfigError when ``reject_ood`` is asked of a predictor without an OOD detector: it would answer every
        image, unknown ones included, while the caller believes they are withheld."""
        if reject_ood and self.ood_threshold is None:
            raise ConfigError("$reject_ood needs the run's out-of-distribution detector, and this predictor has none "
                              "(a run without ood.json, or an engine without ood_score such as int8), so every image "
                              "would be answered: drop $reject_ood, or use a run and engine that have the detector")

    def predict_images(self, images: Sequence[np.ndarray], names: Sequence[str], *,
                       reject_ood: bool = False) -> pd.DataFrame:
        """The :meth:`predict_files` table for decoded images (any size, RGB 0..255), one row per name."""
        self.check_reject_ood(reject_ood)
        resized = [self._resize(image) for image in images]
        outputs = self.predict_arrays(np.stack(resized)) if resized else {}
        return self.table(list(names), outputs, [None] * len(names), reject_ood=reject_ood)

    def _resize(self, image) -> np.ndarray:
        import tensorflow as tf

        image = tf.convert_to_tensor(image, tf.float32)
        if tuple(image.shape[:2]) != (self.image_size, self.image_size):
            image = tf.clip_by_value(tf.image.resize(image, (self.image_size, self.image_size), antialias=True),
                                     0.0, 255.0)
        return image.numpy()

    def table(self, names: Sequence[str], outputs: dict[str, np.ndarray | None], errors: Sequence[str | None], *,
              reject_ood: bool = False) -> pd.DataFrame:
        """The predictions table (see the module docstring) from the engine's outputs, one row per name."""
        n = len(names)
        done = np.array([e is None for e in errors], bool)
        probs = {t: outputs[t] if outputs.get(t) is not None else np.full((n, len(self.labels[t])), np.nan)
                 for t in self.tasks}
        columns: dict[str, object] = {"path": list(names)}
        if "organ" in self.tasks:
            labels = np.asarray(self.labels["organ"], object)
            best = np.nan_to_num(probs["organ"], nan=-1.0).argmax(axis=1)
            columns["organ"] = np.where(done, labels[best], None)
            columns["organ_prob"] = probs["organ"].max(axis=1)
        if "cancer" in self.tasks:
            malignant = self.labels["cancer"].index(MALIGNANT)
            p_malignant = probs["cancer"][:, malignant]
            threshold, source = self.thresholds_for(columns.get("organ", [None] * n))  # the PREDICTED organ's
            decision = np.where(p_malignant >= threshold, malignant, 1 - malignant)
            columns["cancer"] = np.where(done, np.asarray(self.labels["cancer"], object)[decision], None)
            columns["malignant_prob"] = p_malignant
            decided_prob = np.where(decision == malignant, p_malignant, 1 - p_malignant)
            columns["malignancy_threshold"], columns["threshold_source"] = threshold, source
        note = np.full(n, None, object)
        if self.ood_threshold is not None:
            score = outputs[OOD_SCORE] if outputs.get(OOD_SCORE) is not None else np.full(n, np.nan)
            flagged = done & (score > self.ood_threshold)
            columns["ood_score"], columns["ood"] = score, flagged
            why = f"unlike the training images (ood_score above {self.ood_threshold:.3g})"
            note[flagged] = f"{why}: answers withheld" if reject_ood else f"{why}: treat the answers with caution"
            if reject_ood:
                for task in self.tasks:
                    columns[task] = np.where(flagged, None, columns[task])
        columns["note"] = note
        for task in self.tasks:
            for j, label in enumerate(self.labels[task]):
                columns[probability_column(task, label)] = probs[task][:, j]
        if "cancer" in self.tasks:
            columns["cancer_prob"] = decided_prob
        if self.tta:
            columns["tta"] = np.full(n, True)
        columns["error"] = list(errors)
        return pd.DataFrame(columns)

    @property
    def gradcam(self):
        """The run's :class:`multitask.explain.GradCam`, built on first use (most predictions need no gradients)."""
        from multitask.explain import GradCam

        if self._gradcam is None:
            if self.model is None:
                raise RunError("Grad-CAM needs the run's Keras model: make the predictor with Predictor.from_run")
            self._gradcam = GradCam(self.model)
        return self._gradcam

    def heatmaps(self, files: Sequence[str], *, batch_size: int = 16, classes: dict[str, np.ndarray] | None = None):
        """Grad-CAM batches ``(indices, images, {task: (n, h, w) heatmaps}, {task: explained ids})`` of ``files``.

        ``classes[task]`` (one id per file, -1 for the predicted class) says which class to explain, e.g. the
        decisions of :meth:`decided_classes`. Unreadable files are skipped (their index is absent); see
        :mod:`multitask.explain` for the method.
        """
        for index, images in indexed_images([str(f) for f in files], image_size=self.image_size,
                                            batch_size=batch_size):
            rows = index.numpy()
            chosen = {t: np.asarray(ids)[rows] for t, ids in (classes or {}).items()}
            cams, explained = self.gradcam(images, chosen)
            yield rows, images.numpy(), cams, explained

    def decided_classes(self, frame: pd.DataFrame) -> dict[str, np.ndarray]:
        """The class id each head answered per row of a predictions table (-1 where it gave none): what Grad-CAM
        should explain, since the cancer answer follows the run's threshold rather than the larger probability."""
        return {task: np.array([self.labels[task].index(v) if v in self.labels[task] else -1 for v in frame[task]],
                               np.int32) for task in self.tasks}

    def explain(self, path: str | os.PathLike, head: str = "organ") -> np.ndarray:
        """Grad-CAM heatmap of ``head``'s predicted class for one image file: a 2-D array in [0, 1] at the
        resolution of the explained block's feature map (mixed10: 8x8 for 299 px inputs; see multitask.explain)."""
        if head not in self.tasks:
            raise DataError(f"this run has no {head!r} head; its heads are {', '.join(self.tasks)}")
        for _, _, cams, _ in self.heatmaps([path], batch_size=1):
            return cams[head][0]
        raise DataError(f"cannot explain {path}: {image_problem(str(path)) or TF_ONLY_PROBLEM}")

    def write_explanations(self, frame: pd.DataFrame, out_dir: str | os.PathLike, *,
                           batch_size: int = 16) -> pd.DataFrame:
        """Write one overlay PNG per head for every predicted row of ``frame``; add ``explain_<task>`` columns and
        ``explain_<task>_flat`` (the map is flat, all dark: it shows no location; see multitask.explain.is_flat)."""
        from multitask.explain import is_flat, save_overlay

        out_dir = Path(out_dir)
        frame = frame.copy()
        readable = frame.index[frame["error"].isna()]
        for task in self.tasks:
            frame[f"explain_{task}"], frame[f"explain_{task}_flat"] = None, None
        files = frame.loc[readable, "path"].tolist()
        decided = self.decided_classes(frame.loc[readable])
        for index, images, cams, _ in self.heatmaps(files, batch_size=batch_size, classes=decided):
            for i, image in zip(index, images, strict=True):
                row = readable[i]
                stem = f"{row:05d}_{Path(files[i]).stem}"
                for task in self.tasks:
                    probability = frame.at[row, "malignant_prob" if task == "cancer" else f"{task}_prob"]
                    flat = is_flat(cams[task][i])
                    title = (f"{task}: {frame.at[row, task]} (" + ("P(Malignant) " if task == "cancer" else "")
                             + f"{probability:.2f})" + (" - flat map, no location" if flat else ""))
                    path = save_overlay(image, {task: cams[task][i]}, {task: title}, out_dir / f"{stem}_{task}.png")
                    frame.at[row, f"explain_{task}"], frame.at[row, f"explain_{task}_flat"] = str(path), flat
        return frame


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
