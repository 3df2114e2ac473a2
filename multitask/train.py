"""Training: the settings, the two phases, the callbacks, and the run directory.

Phase 1 (``epochs``): the backbone is frozen, so its pooled features are computed once per image and cached on
disk; the heads then train on the cached features, which costs a few milliseconds per epoch instead of a full
InceptionV3 pass over every image. Phase 2 (``fine_tune_epochs``, optional): the backbone is unfrozen from
``unfreeze_from`` upward (BatchNorm stays frozen), and the whole model trains on augmented images at a lower
learning rate.

Each phase keeps a Keras ``BackupAndRestore`` backup, so a run that is interrupted (Ctrl-C, a killed process)
resumes from its last finished epoch when the same command is run again. The run directory is described in
:mod:`multitask.run`; ``config.json`` is written last.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from multitask import run as rundir
from multitask.data import (
    DEFAULT_FRACTIONS,
    DEFAULT_SPLIT_METHOD,
    SPLIT_METHODS,
    load_image,
    load_split,
    make_dataset,
    save_split,
    scan_tree,
    split_manifest,
    write_csv_atomic,
)
from multitask.errors import ConfigError, DataError
from multitask.taxonomy import TASKS, Taxonomy, load_taxonomy

# Keras and TensorFlow are imported inside the functions that need them, so the CLI can read TrainConfig's
# defaults without paying for their import.

log = logging.getLogger(__name__)

TASK_CHOICES = ("joint", *TASKS)
STRATEGIES = ("default", "mirrored", "multiworker")
STATE_DIR = "train-state"  # backups and phase markers of an unfinished run; removed when the run completes
CACHE_DIR = "cache"
TENSORBOARD_DIR = "logs"
FEATURE_CACHE_FORMAT = 1
# Settings that do not change what a run computes, so a run may be resumed with other values.
RESUMABLE_ANYWAY = ("verbose", "overwrite", "cache_dir", "strategy")


# ----------------------------------------------------------------------------------------------- settings


@dataclass
class TrainConfig:
    """Every training setting, with its default; ``config.json`` stores it under "settings"."""

    out: str = "run"
    data: str | None = None
    task: str = "joint"
    weights: str | None = "imagenet"
    image_size: int = 256
    batch_size: int = 32
    epochs: int = 10
    fine_tune_epochs: int = 0
    unfreeze_from: str = "mixed9"
    learning_rate: float = 1e-3
    fine_tune_learning_rate: float | None = None  # None: learning_rate / 10
    loss_weights: dict[str, float] = field(default_factory=lambda: {t: 1.0 for t in TASKS})
    weighting: str = "static"
    balance: bool = False
    split_file: str | None = None
    split: str = DEFAULT_SPLIT_METHOD
    min_inliers: int | None = None  # grouped split: None = multitask.grouping's default
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS
    seed: int = 42
    strategy: str = "default"
    taxonomy: str | None = None
    allow_unknown: bool = False
    cache_dir: str | None = None  # None: <out>/cache
    patience: int = 3  # early stopping, in epochs without a better validation loss
    overwrite: bool = False
    verbose: int = 1

    @property
    def tasks(self) -> tuple[str, ...]:
        return TASKS if self.task == "joint" else (self.task,)

    @property
    def fine_tune_lr(self) -> float:
        return self.fine_tune_learning_rate or self.learning_rate / 10

    def validate(self) -> TrainConfig:
        """Return self, or raise ConfigError naming the bad setting."""
        from multitask.model import MIN_IMAGE_SIZE
        from multitask.weighting import WEIGHTINGS, check_loss_weights

        checks = [
            (self.task in TASK_CHOICES, f"task must be one of {', '.join(TASK_CHOICES)}, got {self.task!r}"),
            (self.weighting in WEIGHTINGS, f"weighting must be one of {', '.join(WEIGHTINGS)}, got {self.weighting!r}"),
            (self.strategy in STRATEGIES, f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}"),
            (self.split in SPLIT_METHODS, f"split must be one of {', '.join(SPLIT_METHODS)}, got {self.split!r}"),
            (self.image_size >= MIN_IMAGE_SIZE, f"image size {self.image_size} is below InceptionV3's minimum of "
                                                f"{MIN_IMAGE_SIZE} px"),
            (self.batch_size >= 1, f"batch size must be at least 1, got {self.batch_size}"),
            (self.epochs >= 1, f"epochs must be at least 1 (the heads train first), got {self.epochs}"),
            (self.fine_tune_epochs >= 0, f"fine-tune epochs must be 0 or more, got {self.fine_tune_epochs}"),
            (self.learning_rate > 0, f"learning rate must be positive, got {self.learning_rate}"),
            (self.fine_tune_lr > 0, f"fine-tune learning rate must be positive, got {self.fine_tune_learning_rate}"),
            (self.patience >= 0, f"patience must be 0 or more, got {self.patience}"),
            (bool(self.data or self.split_file), "give the dataset folder (--data) or a saved split (--split-file)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        self.loss_weights = check_loss_weights(self.loss_weights, tasks=self.tasks)
        return self

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings (paths as strings, tuples as lists), as config.json stores them."""
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))

    @classmethod
    def from_dict(cls, settings: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict` (e.g. ``config.json["settings"]``); unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(settings) - names)
        if unknown:
            raise ConfigError(f"unknown training setting(s) {', '.join(unknown)}")
        settings = dict(settings)
        if "fractions" in settings:
            settings["fractions"] = tuple(settings["fractions"])
        return cls(**settings)


# ----------------------------------------------------------------------------------------------- strategy


def make_strategy(name: str = "default"):
    """The tf.distribute strategy for ``name``: default (one device), mirrored (all local devices), multiworker."""
    import tensorflow as tf

    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        # MirroredStrategy() alone uses only CPU:0 when there is no GPU; name every logical CPU instead.
        devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy(devices=[d.name for d in devices])
    if name == "multiworker":
        return tf.distribute.MultiWorkerMirroredStrategy()  # cluster from the TF_CONFIG environment variable
    raise ConfigError(f"strategy must be one of {', '.join(STRATEGIES)}, got {name!r}")


def worker_role() -> tuple[str, bool]:
    """This process's name in a TF_CONFIG cluster (e.g. "worker-1") and whether it is the chief, which alone
    writes the run directory. Without TF_CONFIG the process is the chief."""
    tf_config = json.loads(os.environ.get("TF_CONFIG") or "{}")
    task = tf_config.get("task", {})
    kind, index = task.get("type", "chief"), int(task.get("index", 0))
    chief = kind == "chief" or (kind == "worker" and index == 0 and "chief" not in tf_config.get("cluster", {}))
    return f"{kind}-{index}", chief


# ----------------------------------------------------------------------------------------------- data


def prepare_split(config: TrainConfig, taxonomy: Taxonomy) -> pd.DataFrame:
    """The manifest with a ``split`` column: ``config.split_file`` as is, else a new split of ``config.data``."""
    if config.split_file:
        return load_split(config.split_file, taxonomy=taxonomy)
    manifest = scan_tree(config.data, taxonomy=taxonomy, allow_unknown=config.allow_unknown).manifest
    keypoints = Path(config.cache_dir or Path(config.out) / CACHE_DIR) / "keypoints"
    return split_manifest(manifest, fractions=config.fractions, seed=config.seed, method=config.split,
                          min_inliers=config.min_inliers, cache_dir=keypoints)


def class_weights(train: pd.DataFrame, tasks: Sequence[str]) -> dict[str, dict[int, float]]:
    """Per task, sklearn's 'balanced' class weights of the training rows: every class counts equally."""
    from sklearn.utils.class_weight import compute_class_weight

    out = {}
    for task in tasks:
        labels = train[f"{task}_id"].to_numpy()
        classes = np.unique(labels)
        weights = compute_class_weight("balanced", classes=classes, y=labels)
        out[task] = {int(c): float(w) for c, w in zip(classes, weights, strict=True)}
    return out


def sample_weights(frame: pd.DataFrame, weights: dict[str, dict[int, float]]) -> dict[str, np.ndarray]:
    """Per-row weights of ``frame`` from :func:`class_weights` (classes unseen in training weigh 1)."""
    return {
        task: frame[f"{task}_id"].map(lambda c, w=per_class: w.get(int(c), 1.0)).to_numpy(np.float32)
        for task, per_class in weights.items()
    }


def _for_task(values: dict[str, np.ndarray], task: str):
    """make_dataset's label structure: the dict for the joint task, the one array for a single task."""
    return values if task == "joint" else values[task]


# ----------------------------------------------------------------------------------------------- feature cache


@dataclass
class Features:
    """Pooled backbone features of the rows of a manifest that decoded; ``rows`` are their positions."""

    values: np.ndarray  # (n, FEATURE_DIM) float32
    rows: np.ndarray  # (n,) int64 positions in the manifest the features were computed for
    path: Path
    skipped: list[str] = field(default_factory=list)  # files that could not be decoded
    reused: bool = False
    seconds: float = 0.0


def weights_fingerprint(model) -> str:
    """SHA-256 of every weight of ``model``: the identity of ImageNet, a weights file, or a seeded random init."""
    digest = hashlib.sha256()
    for variable in model.weights:
        digest.update(np.ascontiguousarray(np.asarray(variable)).tobytes())
    return digest.hexdigest()


def feature_cache_key(paths: Sequence[str], *, image_size: int, fingerprint: str) -> dict[str, Any]:
    """What cached features depend on: backbone weights, image size, each file's path/size/mtime, versions."""
    import keras
    import tensorflow as tf

    files = hashlib.sha256()
    for path in paths:
        stat = os.stat(path)
        files.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return {
        "format": FEATURE_CACHE_FORMAT,
        "weights": fingerprint,
        "image_size": int(image_size),
        "files": files.hexdigest(),
        "count": len(paths),
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__},
    }


def extract_features(backbone, paths: Sequence[str], *, image_size: int, batch_size: int,
                     verbose: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Backbone features of every file that decodes, and the positions of those files in ``paths``."""
    import keras
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((np.asarray(paths, str), np.arange(len(paths), dtype=np.int64)))
    ds = ds.map(lambda p, i: (load_image(p, image_size), i), num_parallel_calls=tf.data.AUTOTUNE)
    # ignore_errors drops undecodable files but keeps the order, so the carried index tells which were dropped.
    ds = ds.ignore_errors(log_warning=False).batch(batch_size).prefetch(tf.data.AUTOTUNE)
    forward = tf.function(lambda images: backbone(images, training=False), reduce_retracing=True)
    progress = keras.utils.Progbar(-(-len(paths) // batch_size), verbose=verbose, unit_name="batch")
    values, rows = [], []
    for step, (images, index) in enumerate(ds, start=1):
        values.append(np.asarray(forward(images), np.float32))
        rows.append(index.numpy())
        progress.update(step, finalize=step == progress.target)
    if len(values) < progress.target:  # undecodable files left the last batches short
        progress.update(len(values), finalize=True)
    if not rows:
        raise DataError(f"none of the {len(paths)} images could be decoded (first: {paths[0] if paths else '-'})")
    values, rows = np.concatenate(values), np.concatenate(rows)
    skipped = _skipped(paths, rows)
    for path in skipped[:20]:
        log.warning("skipping %s: it could not be read or decoded as an image", path)
    if len(skipped) > 20:
        log.warning("... and %d more unreadable images", len(skipped) - 20)
    return values, rows


def cached_features(backbone, paths: Sequence[str], *, image_size: int, batch_size: int, cache_dir: str | os.PathLike,
                    verbose: int = 1) -> Features:
    """Features of ``paths`` from the cache when its key matches exactly, else computed and cached atomically."""
    start = time.perf_counter()
    key = feature_cache_key(paths, image_size=image_size, fingerprint=weights_fingerprint(backbone))
    key_text = json.dumps(key, sort_keys=True)
    path = Path(cache_dir) / f"features-{hashlib.sha256(key_text.encode()).hexdigest()[:24]}.npz"
    log.debug("feature cache key %s", key_text)
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as stored:
                if str(stored["key"]) == key_text:
                    log.info("reusing cached features %s", path)
                    values, rows = stored["values"], stored["rows"]
                    return Features(values, rows, path, _skipped(paths, rows), True, time.perf_counter() - start)
        except (OSError, ValueError, KeyError) as exc:
            log.warning("ignoring unreadable feature cache %s (%s); recomputing", path, exc)
    log.info("computing backbone features of %d images at %d px -> %s", len(paths), image_size, path)
    values, rows = extract_features(backbone, paths, image_size=image_size, batch_size=batch_size, verbose=verbose)
    with rundir.atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, values=values, rows=rows, key=np.asarray(key_text))
    return Features(values, rows, path, _skipped(paths, rows), False, time.perf_counter() - start)


def _skipped(paths: Sequence[str], rows: np.ndarray) -> list[str]:
    return [paths[i] for i in sorted(set(range(len(paths))) - set(rows.tolist()))]


def features_dataset(features: np.ndarray, labels: dict[str, np.ndarray], *, batch_size: int,
                     sample_weight: dict[str, np.ndarray] | None = None, training: bool = False, seed: int = 0):
    """Batches of (features, {task: labels}[, {task: weights}]) for training the heads."""
    import tensorflow as tf

    parts = (features, labels) if sample_weight is None else (features, labels, sample_weight)
    ds = tf.data.Dataset.from_tensor_slices(parts)
    if training:
        ds = ds.shuffle(len(features), seed=seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


# ----------------------------------------------------------------------------------------------- run directory


def _clear_run(out: Path) -> None:
    """Remove what a previous run left in ``out`` (never the feature cache, which is keyed and always safe)."""
    for name in (rundir.CONFIG_FILE, rundir.MODEL_FILE, rundir.SPLIT_FILE, rundir.HISTORY_FILE, rundir.HISTORY_PLOT):
        (out / name).unlink(missing_ok=True)
    for name in (STATE_DIR, TENSORBOARD_DIR):
        shutil.rmtree(out / name, ignore_errors=True)


def open_run_dir(config: TrainConfig) -> tuple[Path, bool]:
    """Create or reopen ``config.out``; returns (path, resuming). A finished run is replaced only with overwrite."""
    out = Path(config.out).expanduser()
    settings_path = out / STATE_DIR / "settings.json"
    if (out / rundir.CONFIG_FILE).is_file():
        if not config.overwrite:
            raise ConfigError(f"{out} already holds a finished run; choose another --out, or pass --overwrite "
                              "to replace it")
        _clear_run(out)
    if settings_path.is_file():
        before = json.loads(settings_path.read_text(encoding="utf-8"))
        now = config.to_dict()
        changed = [k for k in now if k not in RESUMABLE_ANYWAY and before.get(k) != now[k]]
        if changed and not config.overwrite:
            diff = "; ".join(f"{k}: {before.get(k)!r} -> {now[k]!r}" for k in changed)
            raise ConfigError(f"{out} holds an unfinished run with other settings ({diff}); rerun the original "
                              "command to resume it, choose another --out, or pass --overwrite to start over")
        if not changed:
            log.info("resuming the unfinished run in %s", out)
            return out, True
    _clear_run(out)
    rundir.write_json(config.to_dict(), settings_path)
    return out, False


def _split_for_run(config: TrainConfig, taxonomy: Taxonomy, out: Path, resuming: bool) -> pd.DataFrame:
    """The split of this run, saved as ``split.csv`` before training so a resumed run uses the very same one."""
    saved = out / rundir.SPLIT_FILE
    if resuming and saved.is_file():
        return load_split(saved, taxonomy=taxonomy)
    split = prepare_split(config, taxonomy)
    save_split(split, saved)
    return split


def plot_history(history: pd.DataFrame, path: str | os.PathLike, *, tasks: Sequence[str],
                 fine_tune_from: int | None = None) -> Path:
    """Save loss and accuracy per head (train and validation) per epoch as a PNG; returns its path."""
    from matplotlib.figure import Figure  # no pyplot: no global backend switch, safe inside notebooks
    from matplotlib.ticker import MaxNLocator

    rows = [("loss", "cross-entropy"), ("accuracy", "accuracy")]
    if f"{tasks[0]}_weight" in history.columns:
        rows.append(("weight", "learned weight exp(-s)"))
    fig = Figure(figsize=(4.5 * len(tasks), 3.2 * len(rows)))
    axes = fig.subplots(len(rows), len(tasks), squeeze=False)
    epochs = history["epoch"] + 1
    for col, task in enumerate(tasks):
        for row, (metric, label) in enumerate(rows):
            ax = axes[row][col]
            series = (("", "learned"),) if metric == "weight" else (("", "train"), ("val_", "validation"))
            for prefix, name in series:
                key = f"{prefix}{task}_{metric}"
                if key in history.columns and history[key].notna().any():
                    ax.plot(epochs, history[key], marker="o", label=name)
            if fine_tune_from is not None:
                ax.axvline(fine_tune_from + 0.5, color="grey", linestyle="--", linewidth=1, label="fine-tuning")
            ax.set(title=f"{task}: {metric}", xlabel="epoch", ylabel=label)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.legend(fontsize=8)
    fig.tight_layout()
    with rundir.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    return Path(path)


def _tidy_history(path: Path) -> pd.DataFrame:
    """history.csv with one row per epoch (a resumed epoch replaces its interrupted twin), rewritten atomically."""
    history = pd.read_csv(path).drop_duplicates("epoch", keep="last").sort_values("epoch").reset_index(drop=True)
    write_csv_atomic(history, path)
    return history


def _best_so_far(history_path: Path, monitor: str, *, since: int) -> float | None:
    """Best ``monitor`` value logged from epoch ``since`` on: where a resumed best checkpoint must beat."""
    if not history_path.is_file():
        return None
    history = pd.read_csv(history_path)
    if monitor not in history.columns:
        return None
    values = history.loc[history["epoch"] >= since, monitor]
    return float(values.min()) if values.notna().any() else None


# ----------------------------------------------------------------------------------------------- phases


def phase_callbacks(phase: str, *, out: Path, monitor: str, patience: int, weighting,
                    best_threshold: float | None = None, extra: Sequence = ()) -> list:
    """Learned-weight logging, best checkpoint, early stopping, CSV and TensorBoard logs, backup and restore."""
    import keras

    callbacks = []
    if hasattr(weighting, "log_values"):  # learned weights: add them to each epoch's logs, before CSVLogger
        callbacks.append(keras.callbacks.LambdaCallback(
            on_epoch_end=lambda epoch, logs: logs.update(weighting.log_values())))
    state = out / STATE_DIR
    callbacks += [
        keras.callbacks.ModelCheckpoint(state / f"{phase}-best.weights.h5", monitor=monitor, save_best_only=True,
                                        save_weights_only=True, initial_value_threshold=best_threshold),
        keras.callbacks.EarlyStopping(monitor=monitor, patience=patience),
        keras.callbacks.CSVLogger(out / rundir.HISTORY_FILE, append=True),
        # Last of ours: an epoch counts as done for a resumed run only once everything above has seen it.
        keras.callbacks.BackupAndRestore(state / "backup" / phase, double_checkpoint=True),
    ]
    if _have_tensorboard():
        callbacks.insert(-1, keras.callbacks.TensorBoard(out / TENSORBOARD_DIR, write_graph=False))
    return callbacks + list(extra)


@functools.cache
def _have_tensorboard() -> bool:
    if importlib.util.find_spec("tensorboard") is None:  # TensorFlow 2.21 no longer installs it
        log.warning("TensorBoard is not installed, so no TensorBoard logs are written (pip install tensorboard)")
        return False
    return True


def fit_phase(trainer, train_ds, val_ds, *, phase: str, initial_epoch: int, epochs: int, out: Path,
              config: TrainConfig, weighting, callbacks: Sequence = ()) -> tuple[int, float | None]:
    """Fit ``trainer`` for epochs ``initial_epoch .. initial_epoch + epochs - 1`` (resuming if a backup exists),
    then load the weights of its best epoch. Returns (the epoch after the last one run, best monitored value)."""
    monitor = "val_loss" if val_ds is not None else "loss"
    best_path = out / STATE_DIR / f"{phase}-best.weights.h5"
    threshold = _best_so_far(out / rundir.HISTORY_FILE, monitor, since=initial_epoch) if best_path.is_file() else None
    with warnings.catch_warnings():
        # Datasets that skip bad files have no known length, so Keras finds the end of the first epoch by
        # running out of data and warns about it; that is expected here.
        warnings.filterwarnings("ignore", message="Your input ran out of data")
        history = trainer.fit(
            train_ds, validation_data=val_ds, initial_epoch=initial_epoch, epochs=initial_epoch + epochs,
            shuffle=False, verbose=config.verbose,
            callbacks=phase_callbacks(phase, out=out, monitor=monitor, patience=config.patience, weighting=weighting,
                                      best_threshold=threshold, extra=callbacks),
        )
    end = history.epoch[-1] + 1 if history.epoch else initial_epoch + epochs
    if best_path.is_file():
        trainer.load_weights(best_path)
    return end, _best_so_far(out / rundir.HISTORY_FILE, monitor, since=initial_epoch)


def train_heads(heads, weighting, features: Features, fit_rows: pd.DataFrame, n_train: int, *, out: Path,
                config: TrainConfig, strategy, class_weight: dict | None, callbacks: Sequence = ()) -> dict[str, Any]:
    """Phase 1: the heads on cached features. Skipped (weights reloaded) when an earlier attempt finished it."""
    import keras

    state = out / STATE_DIR
    marker, weights_path = state / "heads.json", state / "heads.weights.h5"
    if marker.is_file() and weights_path.is_file():
        done = json.loads(marker.read_text(encoding="utf-8"))
        heads.load_weights(weights_path)
        for task, value in done.get("log_vars", {}).items():
            weighting.log_vars[task].assign(value)
        log.info("heads already trained (%d epochs) in an earlier attempt; continuing", done["epochs"])
        return done
    from multitask.weighting import MultiTaskTrainer

    start = time.perf_counter()
    labels = {t: fit_rows[f"{t}_id"].to_numpy(np.int32)[features.rows] for t in config.tasks}
    weights = sample_weights(fit_rows.iloc[features.rows], class_weight) if class_weight else None
    is_train = features.rows < n_train

    def subset(mask, training):
        if not mask.any():
            return None
        return features_dataset(
            features.values[mask], {t: v[mask] for t, v in labels.items()},
            sample_weight=None if weights is None else {t: v[mask] for t, v in weights.items()},
            batch_size=config.batch_size, training=training, seed=config.seed,
        )

    with strategy.scope():
        trainer = MultiTaskTrainer(heads, weighting, name="heads_trainer")
        trainer.compile(optimizer=keras.optimizers.Adam(config.learning_rate))
    end, best = fit_phase(trainer, subset(is_train, True), subset(~is_train, False), phase="heads", initial_epoch=0,
                          epochs=config.epochs, out=out, config=config, weighting=weighting, callbacks=callbacks)
    heads.save_weights(weights_path)
    done = {"epochs": end, "best": best, "seconds": time.perf_counter() - start,
            "log_vars": {t: float(np.asarray(v)) for t, v in getattr(weighting, "log_vars", {}).items()}}
    rundir.write_json(done, marker)
    return done


def fine_tune(backbone, heads, weighting, split: pd.DataFrame, *, initial_epoch: int, out: Path,
              config: TrainConfig, strategy, class_weight: dict | None, callbacks: Sequence = ()) -> dict[str, Any]:
    """Phase 2: unfreeze the backbone from ``config.unfreeze_from`` and train end to end on augmented images."""
    import keras

    from multitask.augment import make_augmenter
    from multitask.model import assemble, freeze_backbone
    from multitask.weighting import MultiTaskTrainer

    start = time.perf_counter()
    train_rows, val_rows = (split[split["split"] == s].reset_index(drop=True) for s in ("train", "val"))

    def dataset(rows, training):
        if rows.empty:
            return None
        weights = _for_task(sample_weights(rows, class_weight), config.task) if class_weight else None
        return make_dataset(rows, image_size=config.image_size, batch_size=config.batch_size, task=config.task,
                            training=training, seed=config.seed, sample_weight=weights,
                            augment=make_augmenter(config.seed) if training else None)

    with strategy.scope():
        trainable = freeze_backbone(backbone, unfreeze_from=config.unfreeze_from)
        trainer = MultiTaskTrainer(assemble(backbone, heads), weighting, name="fine_tune_trainer")
        trainer.compile(optimizer=keras.optimizers.Adam(config.fine_tune_lr))
    if not trainable:
        log.warning("no backbone layer with weights comes after %s, so fine-tuning trains the heads only; unfreeze "
                    "from an earlier layer (mixed9 trains the last Inception block)", config.unfreeze_from)
    log.info("fine-tuning %d backbone layers after %s at learning rate %g", trainable, config.unfreeze_from,
             config.fine_tune_lr)
    end, best = fit_phase(trainer, dataset(train_rows, True), dataset(val_rows, False), phase="fine_tune",
                          initial_epoch=initial_epoch, epochs=config.fine_tune_epochs, out=out, config=config,
                          weighting=weighting, callbacks=callbacks)
    return {"epochs": end - initial_epoch, "best": best, "seconds": time.perf_counter() - start,
            "trainable_layers": trainable}


# ----------------------------------------------------------------------------------------------- train


def train(config: TrainConfig, *, callbacks: Sequence = ()) -> rundir.RunInfo:
    """Train as ``config`` says and write the run directory; returns the finished run (see multitask.run)."""
    import keras

    from multitask.model import build_backbone, build_heads, fit_feature_scaling
    from multitask.weighting import make_weighting

    config.validate()
    taxonomy = load_taxonomy(config.taxonomy)
    strategy = make_strategy(config.strategy)
    keras.utils.set_random_seed(config.seed)  # same seed, same random init: the feature cache stays valid
    with strategy.scope():  # first, so that unavailable weights fail before the run directory is touched
        backbone = build_backbone(config.image_size, config.weights)
        heads = build_heads(config.tasks)
        weighting = make_weighting(config.weighting, tasks=config.tasks, loss_weights=config.loss_weights)
    worker, chief = worker_role()
    if not chief:  # the other workers of a multi-worker run write a private copy that nobody reads
        config = dataclasses.replace(config, out=str(Path(config.out) / ".workers" / worker))
    out, resuming = open_run_dir(config)
    split = _split_for_run(config, taxonomy, out, resuming)
    fit_rows = pd.concat([split[split["split"] == s] for s in ("train", "val")]).reset_index(drop=True)
    n_train = int((split["split"] == "train").sum())
    features = cached_features(backbone, fit_rows["path"].tolist(), image_size=config.image_size,
                               batch_size=config.batch_size, cache_dir=config.cache_dir or out / CACHE_DIR,
                               verbose=config.verbose)
    # Standardise features with training-set statistics; the fitted layer is part of the saved backbone.
    features.values = fit_feature_scaling(backbone, features.values, fit_rows=features.rows < n_train)
    class_weight = class_weights(split[split["split"] == "train"], config.tasks) if config.balance else None
    heads_done = train_heads(heads, weighting, features, fit_rows, n_train, out=out, config=config,
                             strategy=strategy, class_weight=class_weight, callbacks=callbacks)
    tuned = None
    if config.fine_tune_epochs:
        phase_one = [variable.numpy() for variable in backbone.weights + heads.weights]
        tuned = fine_tune(backbone, heads, weighting, split, initial_epoch=heads_done["epochs"], out=out,
                          config=config, strategy=strategy, class_weight=class_weight, callbacks=callbacks)
        tuned["kept"] = _better(tuned["best"], heads_done["best"])
        if not tuned["kept"]:  # the saved model is the best one seen, whichever phase produced it
            log.warning("fine-tuning did not beat the frozen-backbone model (best monitored loss %s vs %s); the "
                        "run keeps the phase-1 model", tuned["best"], heads_done["best"])
            for variable, value in zip(backbone.weights + heads.weights, phase_one, strict=True):
                variable.assign(value)
    return _finish_run(out, config, taxonomy=taxonomy, split=split, backbone=backbone, heads=heads,
                       weighting=weighting, features=features, heads_done=heads_done, tuned=tuned,
                       class_weight=class_weight)


def _better(candidate: float | None, incumbent: float | None) -> bool:
    """Whether a phase's best monitored loss beats the previous one (unknown values never win or lose)."""
    return candidate is None or incumbent is None or candidate <= incumbent


def _finish_run(out: Path, config: TrainConfig, *, taxonomy: Taxonomy, split: pd.DataFrame, backbone, heads,
                weighting, features: Features, heads_done: dict, tuned: dict | None,
                class_weight: dict | None) -> rundir.RunInfo:
    """Save the model, tidy and plot the history, then write config.json (last) and drop the training state."""
    from multitask.model import assemble

    model = assemble(backbone, heads, name="joint" if config.task == "joint" else f"single_{config.task}")
    rundir.save_model(model, out / rundir.MODEL_FILE)
    history = _tidy_history(out / rundir.HISTORY_FILE)
    plot_history(history, out / rundir.HISTORY_PLOT, tasks=config.tasks,
                 fine_tune_from=heads_done["epochs"] if tuned else None)
    record = {
        "status": "complete",
        "format": rundir.CONFIG_FORMAT,
        "task": config.task,
        "tasks": list(config.tasks),
        "image_size": config.image_size,
        "labels": {t: list(taxonomy.labels(t)) for t in config.tasks},
        "taxonomy": taxonomy.to_records(),
        "taxonomy_source": taxonomy.source,
        "settings": config.to_dict(),
        "seed": config.seed,
        "versions": rundir.package_versions(),
        "timings": {"features": round(features.seconds, 3), "heads": round(heads_done["seconds"], 3),
                    "fine_tune": round(tuned["seconds"], 3) if tuned else 0.0},
        "epochs": {"heads": heads_done["epochs"], "fine_tune": tuned["epochs"] if tuned else 0},
        "best": {"monitor": "val_loss" if (split["split"] == "val").any() else "loss",
                 "heads": heads_done["best"], "fine_tune": tuned["best"] if tuned else None},
        "weighting": weighting.state(),
        "class_weights": class_weight,
        "split_counts": split["split"].value_counts().reindex(["train", "val", "test"], fill_value=0).to_dict(),
        "features": {"cache": str(features.path), "reused": features.reused, "images": int(len(features.rows)),
                     "skipped": features.skipped},
        "final": {k: float(v) for k, v in history.iloc[-1].items() if pd.notna(v)},
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    rundir.write_json(record, out / rundir.CONFIG_FILE)
    shutil.rmtree(out / STATE_DIR, ignore_errors=True)
    return rundir.open_run(out)



# ----------------------------------------------------------------------------------------------- measurement


def time_head_epochs(manifest: pd.DataFrame, *, image_size: int = 96, batch_size: int = 32,
                     weights: str | None = None, epochs: int = 2, seed: int = 42) -> dict[str, float]:
    """Seconds per epoch of training the heads on ``manifest``: through the frozen backbone on images every
    epoch, versus on features cached once. The ``*_epoch_s`` numbers are the median of the epochs after the
    first (steady state); the first one includes graph tracing and is reported apart."""
    import keras

    from multitask.model import assemble, build_backbone, build_heads
    from multitask.weighting import MultiTaskTrainer, StaticWeighting

    def timed_fit(net, ds) -> list[float]:
        trainer = MultiTaskTrainer(net, StaticWeighting({t: 1.0 for t in TASKS}))
        trainer.compile(optimizer=keras.optimizers.Adam(1e-3))
        seconds, begun = [], []
        timer = keras.callbacks.LambdaCallback(
            on_epoch_begin=lambda epoch, logs: begun.append(time.perf_counter()),
            on_epoch_end=lambda epoch, logs: seconds.append(time.perf_counter() - begun[-1]))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Your input ran out of data")
            trainer.fit(ds, epochs=epochs, callbacks=[timer], verbose=0, shuffle=False)
        return seconds

    keras.utils.set_random_seed(seed)
    backbone = build_backbone(image_size, weights)
    backbone.trainable = False  # phase 1: frozen, BatchNorm in inference mode
    images = make_dataset(manifest, image_size=image_size, batch_size=batch_size, task="joint", training=True,
                          seed=seed)
    on_images = timed_fit(assemble(backbone, build_heads(TASKS)), images)
    start = time.perf_counter()
    values, rows = extract_features(backbone, manifest["path"].tolist(), image_size=image_size,
                                    batch_size=batch_size, verbose=0)
    extraction = time.perf_counter() - start
    labels = {t: manifest[f"{t}_id"].to_numpy(np.int32)[rows] for t in TASKS}
    on_features = timed_fit(build_heads(TASKS), features_dataset(values, labels, batch_size=batch_size,
                                                                 training=True, seed=seed))
    steady_images, steady_features = (float(np.median(s[1:] or s)) for s in (on_images, on_features))
    return {
        "images": int(len(rows)), "image_size": image_size, "batch_size": batch_size, "epochs": epochs,
        "frozen_backbone_epoch_s": steady_images, "frozen_backbone_first_epoch_s": on_images[0],
        "feature_extraction_s": extraction,
        "cached_heads_epoch_s": steady_features, "cached_heads_first_epoch_s": on_features[0],
        "speedup_per_epoch": steady_images / steady_features,
        "per_epoch_s": {"frozen_backbone": on_images, "cached_heads": on_features},
    }
