"""A run's per-epoch history (``history.csv``): tidy it, find the best epoch, plot it."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from multitask.files import save_figure, write_csv

log = logging.getLogger(__name__)


def read_history(path: Path) -> pd.DataFrame:
    """history.csv's rows; an empty table (with an ``epoch`` column) when the file is missing, empty or damaged.

    Keras' CSVLogger creates the file when training starts and writes its first row when the first epoch ends, so
    a kill, Ctrl-C or a full disk in the first epoch leaves 0 bytes; a kill mid-row leaves a cut last line. Neither
    may stop a rerun: the history is rebuilt from the epochs that run again (and a cut row is dropped).
    """
    empty = pd.DataFrame({"epoch": pd.Series([], dtype="int64")})
    if not path.is_file() or path.stat().st_size == 0:
        return empty
    try:
        history = pd.read_csv(path)
    except (ValueError, UnicodeDecodeError) as exc:  # pandas' EmptyDataError and ParserError are ValueErrors
        log.warning("ignoring the damaged history %s (%s)", path, str(exc).splitlines()[0][:120])
        return empty
    if "epoch" not in history.columns:
        log.warning("ignoring the history %s: it has no epoch column", path)
        return empty
    epochs = pd.to_numeric(history["epoch"], errors="coerce")
    return history[epochs.notna()].astype({"epoch": "int64"}).reset_index(drop=True)


def tidy_history(path: Path) -> pd.DataFrame:
    """history.csv with one row per epoch (a resumed epoch replaces its interrupted twin), rewritten atomically."""
    history = read_history(path).drop_duplicates("epoch", keep="last").sort_values("epoch").reset_index(drop=True)
    write_csv(history, path)
    return history


def best_epoch(history: pd.DataFrame, monitor: str, *, since: int = 0, until: int | None = None) -> pd.Series | None:
    """The row with the lowest ``monitor`` among epochs ``since <= epoch < until`` (None when there is none)."""
    if monitor not in history.columns:
        return None
    rows = history[(history["epoch"] >= since) & (history["epoch"] < (until if until is not None else 2**31))]
    rows = rows[rows[monitor].notna()]
    return None if rows.empty else rows.loc[rows[monitor].idxmin()]


def best_value(path: Path, monitor: str, *, since: int) -> float | None:
    """Best ``monitor`` value logged in ``path`` from epoch ``since`` on (None without a history)."""
    if not path.is_file():
        return None
    row = best_epoch(read_history(path), monitor, since=since)
    return None if row is None else float(row[monitor])


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
    epochs = history["epoch"]  # counted from 1 already (multitask.callbacks.HistoryCsv)
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
    return save_figure(fig, path)
