"""The handlers a training phase attaches to ``fit`` (MONAI style): backup for resuming, the best checkpoint, a
stop on a non-finite loss, and logging of learned loss weights.

Every checkpoint is written atomically (a temporary file, then a rename), so after a crash or a full disk it is
either complete or absent; a backup that still cannot be read is treated as absent (the phase starts over).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import keras
import numpy as np

from multitask.errors import TrainingError
from multitask.files import atomic_path, check_free_space, write_json

log = logging.getLogger(__name__)


def save_weights(model: keras.Model, path: Path) -> None:
    """``model.save_weights`` (with its optimizer's state), atomically."""
    with atomic_path(path) as tmp:
        model.save_weights(tmp)


class EpochBackup(keras.callbacks.Callback):
    """Keeps ``backup_dir/latest.weights.h5`` (model and optimizer) and ``epoch.json`` after every epoch.

    :meth:`restore` is called before ``fit``: it loads the backup and returns the epoch to continue from, or
    ``None`` when there is none, or when it cannot be read (then it is deleted with a warning, and the phase
    starts over).
    """

    def __init__(self, backup_dir: Path):
        super().__init__()
        self.dir = Path(backup_dir)
        self.weights, self.meta = self.dir / "latest.weights.h5", self.dir / "epoch.json"

    def restore(self, trainer: keras.Model) -> int | None:
        if not self.meta.is_file():
            return None
        try:
            epoch = int(json.loads(self.meta.read_text(encoding="utf-8"))["epoch"])
            if trainer.optimizer is not None and not trainer.optimizer.built:
                trainer.optimizer.build(trainer.trainable_variables)  # so its state can be loaded too
            trainer.load_weights(self.weights)
        except Exception as exc:  # h5py raises OSError, KeyError, ValueError... on damaged files alike
            log.warning("the backup in %s cannot be read (%s: %s); this phase starts over", self.dir,
                        type(exc).__name__, str(exc)[:200])
            shutil.rmtree(self.dir, ignore_errors=True)
            return None
        log.info("resuming from the backup of epoch %d in %s", epoch, self.dir)
        return epoch

    def on_epoch_end(self, epoch, logs=None):
        save_weights(self.model, self.weights)
        write_json({"epoch": epoch + 1}, self.meta)  # written after the weights: it vouches for them


class BestWeights(keras.callbacks.Callback):
    """Saves the weights (and ``<name>.json`` with the epoch and value) whenever ``monitor`` reaches a new low.

    A checkpoint left by an earlier attempt counts as the best so far only if it comes from an epoch before
    ``before_epoch`` (the epochs that are kept); one from an epoch that is being run again is discarded.
    """

    def __init__(self, path: Path, *, monitor: str, before_epoch: int = 0):
        super().__init__()
        self.path, self.monitor, self.best = Path(path), monitor, math.inf
        self.record = self.path.with_name(self.path.name.replace(".weights.h5", ".json"))
        if self.record.is_file() and self.path.is_file():
            saved = json.loads(self.record.read_text(encoding="utf-8"))
            if saved["epoch"] < before_epoch:
                self.best = float(saved["value"])
                return
        self.path.unlink(missing_ok=True)
        self.record.unlink(missing_ok=True)

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is not None and value < self.best:
            self.best = float(value)
            save_weights(self.model, self.path)
            write_json({"epoch": epoch, "value": self.best}, self.record)


class StopBeforeDiskFills(keras.callbacks.Callback):
    """Raises TrainingError at the end of an epoch, before any of its checkpoints is written, when the run folder's
    disk has less free space than they need (two checkpoints of model and optimizer: the best and the backup, each
    written beside the one it replaces, plus a margin for the history and logs).

    Writing HDF5 into a full disk can crash the whole process (a segfault, exit 139) instead of raising; stopping
    first keeps the run resumable from its last backup: free some space and rerun the same command.
    """

    MARGIN = 16 * 2**20

    def __init__(self, folder: Path):
        super().__init__()
        self.folder, self.needed = Path(folder), None

    def checkpoint_bytes(self) -> int:
        """The size of one checkpoint: every weight and optimizer variable of the model being fitted."""
        variables = list(self.model.weights)
        optimizer = getattr(self.model, "optimizer", None)
        if optimizer is not None:
            variables += list(optimizer.variables)
        return sum(math.prod(v.shape) * np.dtype(keras.backend.standardize_dtype(v.dtype)).itemsize
                   for v in variables)

    def on_epoch_end(self, epoch, logs=None):
        if self.needed is None:  # after the first epoch, when the optimizer's variables exist
            self.needed = 2 * self.checkpoint_bytes() + self.MARGIN
        try:
            check_free_space(self.folder, self.needed, what=f"the checkpoints of epoch {epoch + 1}")
        except OSError as exc:
            raise TrainingError(f"stopped at the end of epoch {epoch + 1}, before writing its checkpoints: "
                                f"{exc.strerror}. The run is resumable: free some space and rerun the same command "
                                "(it continues from the last saved epoch)") from None


class HistoryCsv(keras.callbacks.CSVLogger):
    """Keras' CSVLogger with epochs counted from 1, as people count them: row k of history.csv is the k-th epoch run,
    the number config.json's ``saved.epoch``, the CLI and history.png use (Keras' own epoch index is k - 1)."""

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch + 1, logs)


class StopOnNonFiniteLoss(keras.callbacks.Callback):
    """Raises TrainingError as soon as a batch's loss is NaN or infinite: such a model is never saved."""

    def __init__(self, learning_rate: float):
        super().__init__()
        self.learning_rate, self.epoch = learning_rate, 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            raise TrainingError(
                f"training diverged: the loss became {float(loss)} in epoch {self.epoch + 1}, batch {batch + 1}, at "
                f"learning rate {self.learning_rate:g}; nothing was saved as a finished run. Lower $learning_rate "
                "(or $fine_tune_learning_rate) and rerun with $overwrite"
            )


class LogWeighting(keras.callbacks.Callback):
    """Adds the weighting's learned values (if any) to each epoch's logs, before CSVLogger writes them."""

    def __init__(self, weighting):
        super().__init__()
        self.weighting = weighting

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs.update(self.weighting.log_values())
