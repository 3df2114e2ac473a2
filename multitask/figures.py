"""The evaluation's figures, drawn from numbers only (no runs, no models): confusion matrices, the ROC curve with
its operating points, and reliability diagrams. Each is a matplotlib ``Figure`` (no pyplot: no global state, safe
without a display) saved atomically as a PNG next to the numbers it shows."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from multitask.files import save_figure

FIGURE_DPI = 100


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=FIGURE_DPI, layout="constrained")


def confusion_figure(matrix, labels: Sequence[str], path: str | os.PathLike, *, title: str) -> Path:
    """Save a confusion matrix as two labelled panels: counts, and rows normalised to 1 (recall per class)."""
    counts = np.asarray(matrix, np.int64)
    totals = counts.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        normalised = np.where(totals > 0, counts / np.maximum(totals, 1), np.nan)  # absent classes: empty row
    side = 2.2 + 0.45 * len(labels)
    fig = _figure(2 * side + 1.0, side)
    fig.suptitle(title)
    for ax, values, name, fmt in ((fig.add_subplot(1, 2, 1), counts, "counts", "d"),
                                  (fig.add_subplot(1, 2, 2), normalised, "row-normalised", ".2f")):
        image = ax.imshow(values, cmap="Blues", vmin=0, vmax=max(1, counts.max()) if fmt == "d" else 1)
        fig.colorbar(image, ax=ax, shrink=0.8)
        ax.set(title=name, xlabel="predicted", ylabel="true", xticks=range(len(labels)),
               yticks=range(len(labels)))
        ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=8)
        ax.set_yticklabels(labels, fontsize=8)
        limit = np.nanmax(values) if np.isfinite(values).any() else 0
        for (i, j), value in np.ndenumerate(values):
            if np.isfinite(value) and (value > 0 or fmt == "d"):
                ax.text(j, i, format(value, fmt), ha="center", va="center", fontsize=7,
                        color="white" if value > 0.6 * limit else "black")
    return save_figure(fig, path, dpi=FIGURE_DPI)


def roc_figure(y_true, scores, path: str | os.PathLike, *, title: str, auc: float | None = None,
               points: Mapping[str, tuple[float, float]] | None = None) -> Path:
    """Save the ROC curve of binary labels ``y_true`` (1 = positive) against ``scores``; ``points`` marks operating
    points by name as (sensitivity, specificity), e.g. the chosen threshold and 0.5."""
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(np.asarray(y_true).astype(int), np.asarray(scores, float))
    fig = _figure(4.5, 4.5)
    ax = fig.add_subplot()
    ax.plot(fpr, tpr, lw=2, label="model" if auc is None else f"model (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="chance")
    for (name, (sensitivity, specificity)), marker in zip((points or {}).items(), "os^D", strict=False):
        if sensitivity is not None and specificity is not None:
            ax.plot(1 - specificity, sensitivity, marker=marker, ms=8, ls="none",
                    label=f"{name}: sens {sensitivity:.2f}, spec {specificity:.2f}")
    ax.set(title=title, xlabel="false positive rate (1 - specificity)", ylabel="true positive rate (sensitivity)",
           xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=8)
    return save_figure(fig, path, dpi=FIGURE_DPI)


def reliability_figure(tables, path: str | os.PathLike, *, title: str) -> Path:
    """Save a reliability diagram of ``{name: reliability table}`` (multitask.calibration.reliability_table)."""
    from multitask.calibration import reliability_figure as draw

    return save_figure(draw(tables, title=title), path, dpi=FIGURE_DPI)
