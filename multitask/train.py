"""Training: a :class:`Trainer` that owns the phases, and :func:`train`, which runs one from a TrainConfig.

Phase 1 (``epochs``): the backbone is frozen, so its pooled features are computed once per image and cached
(:mod:`multitask.features`); the heads then train on them, a few milliseconds per epoch instead of a full
InceptionV3 pass over every image. Phase 2 (``fine_tune_epochs``, optional): the backbone is unfrozen from
``unfreeze_from`` upward (BatchNorm stays frozen) and the whole model trains on augmented images at a lower
learning rate. The saved model is the best epoch seen: phase 2 is kept only if its best epoch beats phase 1's on
the same fixed objective (``task_loss``, see :mod:`multitask.weighting`).

The run folder's life (create, lock, resume, finish) is :mod:`multitask.rundir`'s; the handlers attached to
``fit`` (backup, best checkpoint, NaN stop) are :mod:`multitask.callbacks`'. An interrupted run resumes from its
last finished epoch when the same command is run again.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pandas as pd

from multitask import callbacks as handlers
from multitask.accelerate import (
    check_precision,
    dtype_policy,
    float32_copy,
    make_optimizer,
    resolve_jit,
    resolve_precision,
)
from multitask.calibration import calibration_record, fit_calibration
from multitask.data import (
    BALANCE_KEYS,
    balance_weights,
    make_dataset,
    sample_weights,
    scan_tree,
    task_labels,
)
from multitask.decoded import DecodedImages, decoded_dataset, decoded_images, wants_decoded_cache
from multitask.distribute import Workers, make_strategy, worker_role
from multitask.errors import DataError
from multitask.features import Features, cached_features, features_dataset, model_outputs
from multitask.files import read_json, write_csv, write_json
from multitask.history import best_epoch, plot_history, read_history, tidy_history
from multitask.model import build_model, fit_feature_scaling, freeze_backbone, model_parts
from multitask.ood import Computed, feature_model, fit_run_detector, taps_identity
from multitask.rundir import (
    CACHE_DIR,
    HISTORY_FILE,
    HISTORY_PLOT,
    OOD_FILE,
    TENSORBOARD_DIR,
    RunDir,
    RunInfo,
    package_versions,
)
from multitask.settings import DECODED_CACHE_DISK_SHARE, TrainConfig
from multitask.splits import load_split, save_split, split_manifest
from multitask.taxonomy import load_taxonomy
from multitask.weighting import MultiTaskTrainer, make_weighting

log = logging.getLogger(__name__)

MONITOR = "task_loss"  # the fixed objective (MultiTaskTrainer), "val_task_loss" when there is validation data


@dataclass
class PhaseResult:
    """How a phase ended: the epoch after its last one, its best monitored value and epoch, wall seconds, and the
    weighting's variables at the end (restored with the weights when the phase's model is kept)."""

    end: int
    best: float | None
    best_epoch: int | None
    seconds: float
    weighting: list

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Trainer:
    """One training run: the model's parts, the weighting, the strategy, the settings, the run folder and the
    handlers that every phase shares; the phases are its methods."""

    def __init__(self, config: TrainConfig, *, callbacks: Sequence = ()):
        self.config = config.validate()
        self.taxonomy = load_taxonomy(config.taxonomy)
        self.strategy = make_strategy(config.strategy)
        self.workers = Workers.of(self.strategy)  # None unless several processes train together
        # This process's name in the cluster, and whether it keeps the run (a single process, or the chief).
        self.role, chief = worker_role()
        self.keeps_run = self.workers is None or chief
        keras.utils.set_random_seed(config.seed)  # same seed, same random init: the feature cache stays valid
        self.precision = resolve_precision(config.precision)  # what "auto" means on this machine
        check_precision(self.precision)  # a CPU without 16-bit kernels: one line now, not a crash in the first step
        self.jit_compile = resolve_jit(config.jit_compile, distributed=config.strategy != "default")
        log.info("precision %s, XLA %s", self.precision, "on" if self.jit_compile else "off")
        self.fit_rows: pd.DataFrame | None = None  # the train and val rows, in that order (features, decoded cache)
        self.use_decoded = False  # whether --decoded-cache says to read pixels from the decoded-image cache
        self.decoded: DecodedImages | None = None  # that cache, once opened (see decoded_cache)
        self.ood_blocks: Computed | None = None  # the OOD detector's block features from the feature pass
        with self.strategy.scope():  # first, so that unavailable weights fail before the run folder is touched
            with dtype_policy(self.precision):  # only the model: the weighting and the losses stay float32
                self.model = build_model(config.tasks, config.image_size, config.weights)
            self.weighting = make_weighting(config.weighting, tasks=config.tasks, loss_weights=config.loss_weights)
        self.parts = model_parts(self.model)
        self.extra_callbacks = list(callbacks)
        self.run: RunDir | None = None
        self.monitor = MONITOR

    # ------------------------------------------------------------------------------------------- the whole run

    def fit(self) -> RunInfo | None:
        """Train both phases into the run folder and return the finished run (None in a multi-worker run's
        other workers, which keep nothing)."""
        if not self.keeps_run:
            # The other workers train in step with the chief but keep nothing: their copy of the run (and of the
            # feature cache, unless --cache-dir names one) goes to a temporary folder, removed at the end.
            with tempfile.TemporaryDirectory(prefix=f"multitask-{self.role}-") as scratch:
                return self._fit_into(dataclasses.replace(self.config, out=str(Path(scratch) / "run")))
        return self._fit_into(self.config)

    def _fit_into(self, config: TrainConfig) -> RunInfo | None:
        with RunDir.open(config) as self.run:
            split = self.split()
            _check_classes(split, config.tasks)
            fit_rows = pd.concat([split[split["split"] == s] for s in ("train", "val")]).reset_index(drop=True)
            self.fit_rows = fit_rows
            features = self.features(fit_rows)
            self.monitor = f"val_{MONITOR}" if (split["split"] == "val").any() else MONITOR
            balance = balance_weights(split[split["split"] == "train"], config.tasks, config.balance)
            heads = self.train_heads(features, fit_rows, balance)
            tuned = self.fine_tune(split, features, heads, balance) if config.fine_tune_epochs else None
            if not self.keeps_run:
                # What follows is the chief's alone and needs no other worker (no collective op): calibration,
                # the OOD detector and the saved model. Skipping it frees the cores a shared machine gives the
                # chief (measured in the README, Scaling out).
                log.info("%s: trained in step with the chief; the chief finishes the run", self.role)
                return None
            backbone_changed = tuned is not None and _better(tuned.best, heads.best)
            if self.to_float32():  # calibrate what is saved: the float32 model, not the cached mixed features
                backbone_changed = True
            calibration = self.calibrate(fit_rows, features, backbone_changed=backbone_changed)
            ood = self.fit_ood(split)
            return self.finish(split, features, heads, tuned, balance, calibration, ood)

    def to_float32(self) -> bool:
        """Replace a mixed-precision model by its float32 copy (:func:`multitask.accelerate.float32_copy`), the model
        that is calibrated and saved; whether it was replaced."""
        config = self.config
        with self.strategy.scope():
            model = float32_copy(self.model, lambda: build_model(config.tasks, config.image_size, None))
        if model is self.model:
            return False
        self.model, self.parts = model, model_parts(model)
        return True

    def split(self) -> pd.DataFrame:
        """The run's split, saved as split.csv before training so a resumed run uses the very same one."""
        saved = self.run.path / "split.csv"
        if self.run.resuming and saved.is_file():
            return load_split(saved, taxonomy=self.taxonomy)
        config = self.config
        if config.split_file:
            split = load_split(config.split_file, taxonomy=self.taxonomy)
        else:
            manifest = scan_tree(config.data, taxonomy=self.taxonomy, allow_unknown=config.allow_unknown).manifest
            split = split_manifest(manifest, fractions=config.fractions, seed=config.seed, method=config.split,
                                   min_inliers=config.min_inliers, cache_dir=self.cache_dir / "keypoints")
        save_split(split, saved)
        return split

    @property
    def cache_dir(self) -> Path:
        return Path(self.config.cache_dir) if self.config.cache_dir else self.run.path / CACHE_DIR

    def features(self, fit_rows: pd.DataFrame) -> Features:
        """Cached raw features of the train and val rows, standardised by the backbone's (now fitted) scaling."""
        is_train = fit_rows["split"].to_numpy() == "train"
        config, paths = self.config, fit_rows["path"].tolist()
        self.use_decoded = wants_decoded_cache(config.decoded_cache, count=len(paths), image_size=config.image_size,
                                               cache_dir=self.cache_dir, disk_share=DECODED_CACHE_DISK_SHARE,
                                               distributed=self.workers is not None)
        # The OOD detector's blocks come from the same pass (fit_ood uses them while their layers stay frozen).
        taps = feature_model(self.parts.backbone)
        features = cached_features(self.parts.backbone, paths, image_size=config.image_size,
                                   batch_size=config.batch_size, cache_dir=self.cache_dir, verbose=config.verbose,
                                   workers=self.workers, decoded=self.decoded_cache if self.use_decoded else None,
                                   jit_compile=self.jit_compile, extra_outputs=taps.output)
        if features.extra:
            self.ood_blocks = Computed(paths, features.extra, features.rows, taps_identity(self.parts.backbone, taps))
        # Standardise with training-set statistics; the fitted layer is part of the saved backbone.
        features.values = fit_feature_scaling(self.parts.backbone, features.values, fit_rows=is_train[features.rows])
        return features

    def decoded_cache(self) -> DecodedImages:
        """The decoded-image cache of the train and val images, opened (or built) on first use: only when features
        are computed or fine-tuning runs, never just to be skipped."""
        if self.decoded is None:
            self.decoded = decoded_images(self.fit_rows["path"].tolist(), image_size=self.config.image_size,
                                          cache_dir=self.cache_dir, verbose=self.config.verbose)
        return self.decoded

    def sample_weights(self, rows: pd.DataFrame, balance: dict | None) -> dict[str, np.ndarray] | None:
        """Per task, the ``--balance`` weight of each of ``rows`` (by its own class, or by its organ); None without
        balancing."""
        if not balance:
            return None
        return sample_weights(rows, balance, by=BALANCE_KEYS[self.config.balance])

    # ------------------------------------------------------------------------------------------- phase 1

    def train_heads(self, features: Features, fit_rows: pd.DataFrame, balance: dict | None) -> PhaseResult:
        """Phase 1: the heads on cached features. Skipped (weights reloaded) when an earlier attempt finished it."""
        marker, weights_path = self.run.state("heads.json"), self.run.state("heads.weights.h5")
        if marker.is_file() and weights_path.is_file() and self.workers is None:
            done = PhaseResult(**read_json(marker))
            self.parts.heads.load_weights(weights_path)
            self.weighting.restore(done.weighting)
            log.info("heads already trained (%d epochs) in an earlier attempt; continuing", done.end)
            return done
        start = time.perf_counter()
        tasks, config = self.config.tasks, self.config
        labels = {t: fit_rows[f"{t}_id"].to_numpy(np.int32)[features.rows] for t in tasks}
        weights = self.sample_weights(fit_rows.iloc[features.rows], balance)
        is_train = (fit_rows["split"].to_numpy() == "train")[features.rows]

        def subset(mask, training):
            if not mask.any():
                return None
            return features_dataset(
                features.values[mask], {t: v[mask] for t, v in labels.items()},
                sample_weight=None if weights is None else {t: v[mask] for t, v in weights.items()},
                batch_size=config.batch_size, training=training, seed=config.seed)

        with self.strategy.scope():
            trainer = MultiTaskTrainer(self.parts.heads, self.weighting, name="heads_trainer")
            trainer.compile(optimizer=make_optimizer(config.learning_rate, precision=self.precision),
                            jit_compile=self.jit_compile)
        result = self._fit(trainer, subset(is_train, True), subset(~is_train, False), phase="heads",
                           initial_epoch=0, epochs=config.epochs, learning_rate=config.learning_rate, start=start)
        handlers.save_weights(self.parts.heads, weights_path)
        write_json(result.to_dict(), marker)
        return result

    # ------------------------------------------------------------------------------------------- phase 2

    def fine_tune(self, split: pd.DataFrame, features: Features, heads: PhaseResult,
                  balance: dict | None) -> PhaseResult:
        """Phase 2: unfreeze the backbone from ``unfreeze_from`` and train end to end on augmented images; the
        phase-1 model comes back if this phase's best epoch does not beat phase 1's."""
        from multitask.augment import make_augmenter

        start, config = time.perf_counter(), self.config
        phase_one = [v.numpy() for v in self.parts.backbone.weights + self.parts.heads.weights]
        unreadable = set(features.skipped)  # known from phase 1: leaving them out keeps the epoch length known
        decoded = self.decoded_cache() if self.use_decoded else None

        def augmenter(training):  # --augment's strength on the training images; None for none, and for validation
            return make_augmenter(config.seed, strength=config.augment) if training else None

        def dataset(name, training):
            if decoded is not None:  # the train and val rows, in split order, that the cache holds
                positions = np.intersect1d(np.flatnonzero(self.fit_rows["split"].to_numpy() == name), decoded.rows)
                rows = self.fit_rows.iloc[positions].reset_index(drop=True)
            else:
                rows = split[(split["split"] == name) & ~split["path"].isin(unreadable)].reset_index(drop=True)
            if rows.empty:
                return None
            weights = self.sample_weights(rows, balance)
            if weights is not None and config.task != "joint":
                weights = weights[config.task]
            if decoded is not None:
                return decoded_dataset(decoded, positions, task_labels(rows, config.task),
                                       batch_size=config.batch_size, training=training, seed=config.seed,
                                       sample_weight=weights, augment=augmenter(training))
            return make_dataset(rows, image_size=config.image_size, batch_size=config.batch_size, task=config.task,
                                training=training, seed=config.seed, sample_weight=weights, known_length=True,
                                augment=augmenter(training))

        train_ds, val_ds = dataset("train", True), dataset("val", False)
        # --fine-tune-schedule cosine: decay to 0 over the phase's optimizer steps (the batches of an epoch, which
        # both datasets know: the cache's rows, or the files known to decode)
        decay_steps = (config.fine_tune_epochs * int(train_ds.cardinality())
                       if config.fine_tune_schedule == "cosine" else None)
        with self.strategy.scope():
            trainable = freeze_backbone(self.parts.backbone, unfreeze_from=config.unfreeze_from)
            trainer = MultiTaskTrainer(self.model, self.weighting, name="fine_tune_trainer")
            trainer.compile(optimizer=make_optimizer(config.fine_tune_lr, precision=self.precision,
                                                     decay_steps=decay_steps),
                            jit_compile=self.jit_compile)
        if not trainable:
            log.warning("no backbone layer with weights comes after %s, so fine-tuning trains the heads only; unfreeze "
                        "from an earlier layer (mixed9 trains the last Inception block)", config.unfreeze_from)
        log.info("fine-tuning %d backbone layers after %s at learning rate %g%s", trainable, config.unfreeze_from,
                 config.fine_tune_lr, f", cosine-decayed to 0 over {decay_steps} steps" if decay_steps else "")
        tuned = self._fit(trainer, train_ds, val_ds, phase="fine_tune",
                          initial_epoch=heads.end, epochs=config.fine_tune_epochs, learning_rate=config.fine_tune_lr,
                          start=start)
        if not _better(tuned.best, heads.best):  # the saved model is the best one seen, whichever phase made it
            log.warning("fine-tuning did not beat the frozen-backbone model (best %s %s vs %s); the run keeps the "
                        "phase-1 model", self.monitor, tuned.best, heads.best)
            for variable, value in zip(self.parts.backbone.weights + self.parts.heads.weights, phase_one, strict=True):
                variable.assign(value)
            self.weighting.restore(heads.weighting)
        return tuned

    # ------------------------------------------------------------------------------------------- fitting

    def _fit(self, trainer, train_ds, val_ds, *, phase: str, initial_epoch: int, epochs: int, learning_rate: float,
             start: float) -> PhaseResult:
        """Fit ``trainer`` for epochs ``initial_epoch ..`` (resuming from a backup), then load its best epoch."""
        monitor = self.monitor if val_ds is not None else MONITOR
        history_path = self.run.path / HISTORY_FILE
        best_path = self.run.state(f"{phase}-best.weights.h5")
        backup = handlers.EpochBackup(self.run.state(f"backup-{phase}"))
        # Workers resume in step or not at all: only the chief has backups, so a multi-worker phase starts over.
        with self.strategy.scope():
            resumed = backup.restore(trainer) if self.workers is None else None
        first = initial_epoch if resumed is None else resumed
        # An epoch that is run again replaces its earlier row; history.csv counts epochs from 1 (HistoryCsv), so
        # Keras' epoch index `first` is row first + 1.
        _drop_epochs_from(history_path, first + 1)
        callbacks = [
            handlers.StopBeforeDiskFills(self.run.path),  # first: it runs before any checkpoint of the epoch
            handlers.StopOnNonFiniteLoss(learning_rate),
            handlers.LogWeighting(self.weighting),
            handlers.BestWeights(best_path, monitor=monitor, before_epoch=first),
            keras.callbacks.EarlyStopping(monitor=monitor, mode="min", patience=self.config.patience),
            handlers.HistoryCsv(history_path, append=True),
            *([keras.callbacks.TensorBoard(self.run.path / TENSORBOARD_DIR, write_graph=False)]
              if _have_tensorboard() else []),
            backup,  # last of ours: an epoch counts as done only once everything above has seen it
            *self.extra_callbacks,
        ]
        if first < initial_epoch + epochs:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Your input ran out of data")
                trainer.fit(train_ds, validation_data=val_ds, initial_epoch=first, epochs=initial_epoch + epochs,
                            shuffle=False, verbose=self.config.verbose, callbacks=callbacks)
        if best_path.is_file():
            trainer.load_weights(best_path)
        history = read_history(history_path)
        best = best_epoch(history, monitor, since=initial_epoch + 1)  # this phase's rows, counted from 1
        end = int(history["epoch"].max()) if len(history) else initial_epoch  # epochs done so far
        return PhaseResult(end=max(end, initial_epoch), best=None if best is None else float(best[monitor]),
                           best_epoch=None if best is None else int(best["epoch"]),
                           seconds=time.perf_counter() - start, weighting=self.weighting.values())

    # ------------------------------------------------------------------------------------------- calibration

    def calibrate(self, fit_rows: pd.DataFrame, features: Features, *, backbone_changed: bool) -> dict[str, Any]:
        """Per-head temperatures and the malignancy thresholds (global and per organ), fitted on the validation images
        (see :mod:`multitask.calibration`); without validation images, temperature 1 and threshold 0.5, with a
        warning."""
        is_val = (fit_rows["split"].to_numpy() == "val")[features.rows]
        tasks = self.config.tasks
        if not is_val.any():
            log.warning("no validation images: probabilities stay uncalibrated (temperature 1) and the malignancy "
                        "threshold is 0.5")
            return calibration_record({t: 1.0 for t in tasks}, None, self.config.target_sensitivity, {})
        rows = features.rows[is_val]
        if backbone_changed:  # fine-tuning moved the backbone: the cached features no longer describe the model
            logits = self._logits_of(fit_rows["path"].to_numpy()[rows].tolist())
        else:
            # A direct call, not predict(): under a multi-worker strategy that would split the rows among workers.
            logits = {t: np.asarray(v) for t, v in self.parts.heads(features.values[is_val], training=False).items()}
        labels = {t: fit_rows[f"{t}_id"].to_numpy()[rows] for t in tasks}
        return fit_calibration(logits, labels, tasks=tasks, target_sensitivity=self.config.target_sensitivity,
                               organ_labels=self.taxonomy.labels("organ") if "organ" in tasks else ())

    def _logits_of(self, paths: list[str]) -> dict[str, np.ndarray]:
        """The model's logits for image files (all known to decode), in the order of ``paths``."""
        logits, rows = model_outputs(self.model, paths, image_size=self.config.image_size,
                                     batch_size=self.config.batch_size)
        order = np.argsort(rows)
        return {t: logits[t][order] for t in self.config.tasks}

    def fit_ood(self, split: pd.DataFrame) -> dict[str, Any] | None:
        """The out-of-distribution detector (:mod:`multitask.ood`): fitted on the training images through the saved
        backbone, thresholded on the validation images, written into the run; from phase 1's block features when
        the layers they tap have not changed since (:func:`multitask.ood.fit_run_detector` checks)."""
        config = self.config
        return fit_run_detector(self.parts.backbone, split, image_size=config.image_size,
                                batch_size=config.batch_size, seed=config.seed, out=self.run.path / OOD_FILE,
                                computed=self.ood_blocks)

    # ------------------------------------------------------------------------------------------- the end

    def finish(self, split: pd.DataFrame, features: Features, heads: PhaseResult, tuned: PhaseResult | None,
               balance: dict | None, calibration: dict[str, Any], ood: dict[str, Any] | None = None) -> RunInfo:
        """Plot the history, then save the model and write config.json (last), describing the saved model."""
        config = self.config
        history = tidy_history(self.run.path / HISTORY_FILE)
        plot_history(history, self.run.path / HISTORY_PLOT, tasks=config.tasks,
                     fine_tune_from=heads.end if tuned else None)
        kept = tuned if tuned is not None and _better(tuned.best, heads.best) else heads
        saved = history[history["epoch"] == kept.best_epoch] if kept.best_epoch is not None else history.tail(1)
        record = {
            "task": config.task,
            "tasks": list(config.tasks),
            "image_size": config.image_size,
            "labels": {t: list(self.taxonomy.labels(t)) for t in config.tasks},
            "taxonomy": self.taxonomy.to_records(),
            "taxonomy_source": self.taxonomy.source,
            "settings": config.to_dict(),
            "seed": config.seed,
            "versions": package_versions(),
            "timings": {"features": round(features.seconds, 3), "heads": round(heads.seconds, 3),
                        "fine_tune": round(tuned.seconds, 3) if tuned else 0.0},
            "epochs": {"heads": heads.end, "fine_tune": tuned.end - heads.end if tuned else 0},
            "best": {"monitor": self.monitor, "heads": heads.best,
                     "fine_tune": tuned.best if tuned else None},
            "saved": {"phase": "fine_tune" if kept is tuned else "heads", "epoch": kept.best_epoch},
            "weighting": self.weighting.state(),
            "calibration": calibration,
            "ood": ood,
            "class_weights": balance if config.balance == "classes" else None,
            # --balance organs: each organ's weight, in both heads' losses (multitask.data.organ_weights)
            "organ_weights": _organ_weights_record(balance, self.taxonomy) if config.balance == "organs" else None,
            "split_counts": split["split"].value_counts().reindex(["train", "val", "test"], fill_value=0).to_dict(),
            "features": {"cache": str(features.path), "reused": features.reused, "images": int(len(features.rows)),
                         "skipped": features.skipped},
            # what --precision, --jit-compile and --decoded-cache resolved to on this machine
            "compute": {"precision": self.precision, "jit_compile": self.jit_compile,
                        "decoded_cache": None if self.decoded is None else self.decoded.record()},
            # the metrics of the saved model's epoch (not necessarily the last epoch run)
            "final": {k: float(v) for k, v in saved.iloc[-1].items() if pd.notna(v)} if len(saved) else {},
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        return self.run.finish(self.model, record)


def train(config: TrainConfig, *, callbacks: Sequence = ()) -> RunInfo | None:
    """Train as ``config`` says and write the run folder; returns the finished run (see multitask.rundir), or None
    in a multi-worker run's other workers: they train in step with the chief, whose run it is."""
    return Trainer(config, callbacks=callbacks).fit()


def _check_classes(split: pd.DataFrame, tasks: Sequence[str]) -> None:
    """DataError unless the training images hold at least two classes of every head to train: a head that sees one
    class learns to answer it always, and the cancer threshold would be chosen on images of one class (e.g. a
    dataset of one subclass)."""
    train = split[split["split"] == "train"]
    for task in tasks:
        found = sorted(train[task].unique())
        if len(found) < 2:
            other = " (--task cancer trains the cancer head alone)" if task == "organ" and len(tasks) > 1 else ""
            raise DataError(f"the training split has {len(train)} images of only {len(found)} {task} class "
                            f"({', '.join(map(str, found)) or 'none'}): a {task} head needs images of at least two "
                            f"classes, or it learns to give one answer always{other}. Add images of other "
                            "subclasses to the data or the split")


def _organ_weights_record(balance: dict | None, taxonomy) -> dict[str, float] | None:
    """``{organ label: weight}`` of --balance organs for config.json (every head shares them)."""
    if not balance:
        return None
    labels = taxonomy.labels("organ")
    return {labels[organ]: round(weight, 6) for organ, weight in next(iter(balance.values())).items()}


def _better(candidate: float | None, incumbent: float | None) -> bool:
    """Whether a phase's best monitored loss beats the previous one (unknown values never win or lose)."""
    return candidate is None or incumbent is None or candidate <= incumbent


def _drop_epochs_from(history_path: Path, epoch: int) -> None:
    """Remove history rows of ``epoch`` and later: they belong to an attempt that is being run again. The file is
    rewritten clean (a row cut by a kill is dropped), or removed when no row is left (a 0-byte history of a
    first epoch that never ended), so that CSVLogger appends to whole rows under its header, or starts anew."""
    if not os.path.lexists(history_path):
        return
    history = read_history(history_path)
    kept = history[history["epoch"] < epoch]
    if len(kept):
        write_csv(kept, history_path)
    else:
        history_path.unlink()


@functools.cache
def _have_tensorboard() -> bool:
    if importlib.util.find_spec("tensorboard") is None:  # TensorFlow 2.21 no longer installs it
        log.warning("TensorBoard is not installed, so no TensorBoard logs are written (pip install tensorboard)")
        return False
    return True

