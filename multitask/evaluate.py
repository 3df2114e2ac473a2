"""Metrics and figures of a finished run on its own test split or on another labelled folder.

The metric and figure functions take label ids and class probabilities (or predictions) only; the forward pass
is :class:`multitask.predict.Predictor`'s, so evaluation and prediction share one inference path.

:func:`evaluate_run` writes into the run directory (or ``out``)::

    metrics.json          numbers per task (layout below), what was evaluated, unreadable files
    report.md             the same as readable tables, with links to the figures
    confusion_<task>.png  confusion matrix: counts and row-normalised (recall per true class)
    roc_cancer.png        ROC curve of the Malignant probability (when both classes are present)
    eval_predictions.csv  one row per evaluated image: true labels beside the predictions

``metrics.json``: ``{"n_images", "source", "tasks", "unreadable", "overlap", "<task>": {"n", "accuracy",
"balanced_accuracy", "macro_f1", "labels", "per_class", "confusion_matrix", "figures"}}``; the cancer task adds
``roc_auc``, ``sensitivity``, ``specificity``, ``positive_label``, ``per_organ`` and ``notes``. Undefined numbers
(a class absent from the evaluated images) are ``null`` with a note, never a crash. ``overlap`` is
``{"train": n, "val": n, "fraction": f}``: how many evaluated files (compared by resolved path) the run's own
``split.csv`` puts in train or val, so a folder the model was trained on is flagged (logged, printed by the
CLI, and a warning at the top of ``report.md``); ``null`` when the run has no ``split.csv``.

Summary numbers follow scikit-learn: balanced accuracy is the mean recall over the classes present in the true
labels; macro-F1 averages over the classes present in the true labels or the predictions.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from multitask.data import load_split, scan_tree
from multitask.errors import DataError
from multitask.files import check_writable, save_figure, write_csv, write_json, write_text
from multitask.filesystem import resolved_paths
from multitask.rundir import RunInfo, open_run
from multitask.settings import BATCH_SIZE
from multitask.taxonomy import MALIGNANT as POSITIVE_LABEL

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
REPORT_FILE = "report.md"
PREDICTIONS_FILE = "eval_predictions.csv"
EXPLAIN_FILE = "explain.png"
FIT_SPLITS = ("train", "val")  # the splits a run fits its model on, or selects it with (early stopping)
FIGURE_DPI = 100


# ----------------------------------------------------------------------------------------------- metrics


def _number(value) -> float | None:
    """A JSON-ready float, or None for NaN (an undefined metric)."""
    return None if value is None or np.isnan(value) else float(value)


def _check(y_true, probs, labels: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true).astype(np.int64).ravel()
    probs = np.asarray(probs, np.float64)
    if probs.ndim != 2 or probs.shape != (len(y_true), len(labels)):
        raise ValueError(f"expected probabilities of shape ({len(y_true)}, {len(labels)}), got {probs.shape}")
    if len(y_true) == 0:
        raise ValueError("no samples to evaluate")
    if y_true.min() < 0 or y_true.max() >= len(labels):
        raise ValueError(f"label ids must be in 0..{len(labels) - 1}, got {y_true.min()}..{y_true.max()}")
    return y_true, probs


def task_metrics(y_true, probs, labels: Sequence[str]) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro-F1, per-class precision/recall/F1 and the confusion matrix."""
    from sklearn.metrics import (
        accuracy_score,
        balanced_accuracy_score,
        confusion_matrix,
        f1_score,
        precision_recall_fscore_support,
    )

    y_true, probs = _check(y_true, probs, labels)
    y_pred = probs.argmax(axis=1)
    ids = np.arange(len(labels))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=ids, zero_division=np.nan
    )
    with warnings.catch_warnings():  # "y_pred contains classes not in y_true": expected on small sets
        warnings.simplefilter("ignore", UserWarning)
        balanced = balanced_accuracy_score(y_true, y_pred)
    per_class = {
        label: {"precision": _number(precision[i]), "recall": _number(recall[i]), "f1": _number(f1[i]),
                "support": int(support[i])}
        for i, label in enumerate(labels)
    }
    return {
        "n": int(len(y_true)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0.0)),
        "labels": list(labels),
        "per_class": per_class,
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=ids).tolist(),
    }


def cancer_metrics(y_true, probs, labels: Sequence[str], *, positive: str = POSITIVE_LABEL) -> dict[str, Any]:
    """:func:`task_metrics` plus ROC-AUC, sensitivity and specificity of the ``positive`` class."""
    from sklearn.metrics import roc_auc_score

    if len(labels) != 2 or positive not in labels:
        raise ValueError(f"cancer metrics need two labels including {positive!r}, got {list(labels)}")
    metrics = task_metrics(y_true, probs, labels)
    y_true, probs = _check(y_true, probs, labels)
    pos = list(labels).index(positive)
    negative = labels[1 - pos]
    is_positive = y_true == pos
    notes = []
    if not is_positive.any():
        notes.append(f"no {positive} images: sensitivity and ROC-AUC are undefined")
    if is_positive.all():
        notes.append(f"no {negative} images: specificity and ROC-AUC are undefined")
    both = 0 < is_positive.sum() < len(y_true)
    metrics.update(
        positive_label=positive,
        roc_auc=float(roc_auc_score(is_positive, probs[:, pos])) if both else None,
        sensitivity=metrics["per_class"][positive]["recall"],
        specificity=metrics["per_class"][negative]["recall"],
        notes=notes,
    )
    return metrics


def per_organ_accuracy(organ_true, cancer_true, cancer_pred, organ_labels: Sequence[str], *,
                       positive: int = 1) -> dict[str, dict[str, Any]]:
    """Cancer-head accuracy (and sensitivity/specificity) within each TRUE organ present, keyed by organ name."""
    organ_true = np.asarray(organ_true).astype(np.int64).ravel()
    cancer_true = np.asarray(cancer_true).astype(np.int64).ravel()
    cancer_pred = np.asarray(cancer_pred).astype(np.int64).ravel()
    if not len(organ_true) == len(cancer_true) == len(cancer_pred):
        raise ValueError("organ_true, cancer_true and cancer_pred must have the same length")
    table = {}
    for organ_id in np.unique(organ_true):
        rows = organ_true == organ_id
        truth, pred = cancer_true[rows], cancer_pred[rows]
        malignant, benign = truth == positive, truth != positive
        table[organ_labels[organ_id]] = {
            "n": int(rows.sum()),
            "n_malignant": int(malignant.sum()),
            "accuracy": float(np.mean(truth == pred)),
            "sensitivity": float(np.mean(pred[malignant] == positive)) if malignant.any() else None,
            "specificity": float(np.mean(pred[benign] != positive)) if benign.any() else None,
        }
    return table


# ----------------------------------------------------------------------------------------------- figures


def _figure(width: float, height: float):
    from matplotlib.figure import Figure  # no pyplot: no global state, Agg canvas, safe without a display

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


def roc_figure(y_true, scores, path: str | os.PathLike, *, title: str, auc: float | None = None) -> Path:
    """Save the ROC curve of binary labels ``y_true`` (1 = positive) against ``scores``."""
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(np.asarray(y_true).astype(int), np.asarray(scores, float))
    fig = _figure(4.5, 4.5)
    ax = fig.add_subplot()
    ax.plot(fpr, tpr, lw=2, label="model" if auc is None else f"model (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="chance")
    ax.set(title=title, xlabel="false positive rate (1 - specificity)", ylabel="true positive rate (sensitivity)",
           xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right")
    return save_figure(fig, path, dpi=FIGURE_DPI)


# ----------------------------------------------------------------------------------------------- a run


def evaluate_run(run_dir: str | os.PathLike, *, data: str | os.PathLike | None = None, split: str = "test",
                 out: str | os.PathLike | None = None, batch_size: int = BATCH_SIZE,
                 explain: int = 0) -> dict[str, Any]:
    """Evaluate a finished run on its ``split`` (or every image under ``data``); write metrics, report, figures.

    ``explain=N`` adds a figure of N evaluated images with each head's Grad-CAM heatmap.
    """
    from multitask.predict import Predictor

    run = open_run(run_dir)
    out = Path(out) if out is not None else run.path
    check_writable(out, flag="$out", folder=True)  # before the work: the default is the run directory
    predictor = Predictor.from_run(run)  # a damaged or refused model fails before a long scan
    manifest, source, unreadable = _evaluation_set(run, data=data, split=split)
    seen_as = training_rows(run, manifest["path"])
    note = overlap_note(overlap_counts(seen_as))
    if note:
        log.warning(note)
    predicted = predictor.predict_files(manifest["path"].tolist(), batch_size=batch_size)
    failed = predicted["error"].notna().to_numpy()
    unreadable.update(zip(predicted.loc[failed, "path"], predicted.loc[failed, "error"], strict=True))
    manifest, predicted = manifest[~failed].reset_index(drop=True), predicted[~failed].reset_index(drop=True)

    metrics: dict[str, Any] = {"n_images": len(manifest), "source": source, "run": str(run.path),
                               "image_size": run.image_size, "tasks": list(run.tasks), "unreadable": unreadable,
                               "overlap": overlap_counts(None if seen_as is None else seen_as[~failed])}
    for task in run.tasks:
        labels = run.labels[task]
        probs = predicted[[f"p_{task}_{label}" for label in labels]].to_numpy()
        y_true = manifest[f"{task}_id"].to_numpy()
        if task == "cancer":
            result = cancer_metrics(y_true, probs, labels)
            result["per_organ"] = per_organ_accuracy(manifest["organ_id"], y_true, probs.argmax(axis=1),
                                                     run.taxonomy.labels("organ"),
                                                     positive=labels.index(POSITIVE_LABEL))
        else:
            result = task_metrics(y_true, probs, labels)
        result["figures"] = _task_figures(task, result, y_true, probs, out)
        metrics[task] = result

    if explain > 0:
        metrics["explain"] = explain_figure(predictor, manifest, predicted, n=explain, path=out / EXPLAIN_FILE)

    table = pd.concat([manifest[["path", "subclass"]], manifest[list(run.tasks)].add_prefix("true_"),
                       predicted.drop(columns="path")], axis=1)
    write_csv(table, out / PREDICTIONS_FILE)
    write_json(metrics, out / METRICS_FILE)
    write_text(render_report(metrics), out / REPORT_FILE)
    log.info("wrote %s, %s and figures to %s", METRICS_FILE, REPORT_FILE, out)
    return metrics


def explain_figure(predictor, manifest: pd.DataFrame, predicted: pd.DataFrame, *, n: int,
                   path: Path) -> dict[str, Any]:
    """Grad-CAM grid of ``n`` evaluated images (evenly spread over the set), titled true -> predicted per head."""
    from multitask.explain import save_grid

    rows = np.unique(np.linspace(0, len(manifest) - 1, num=min(n, len(manifest))).round().astype(int))
    images, cams = [], {task: [] for task in predictor.tasks}
    for _, batch, heatmaps, _ in predictor.heatmaps(manifest["path"].iloc[rows].tolist(), batch_size=16):
        images.append(batch)
        for task in predictor.tasks:
            cams[task].append(heatmaps[task])
    titles = [{"input": Path(manifest.at[r, "path"]).name[:28],
               **{t: f"{t}: {manifest.at[r, t]} -> {predicted.at[r, t]}" for t in predictor.tasks}} for r in rows]
    save_grid(np.concatenate(images), {t: np.concatenate(v) for t, v in cams.items()}, titles, path)
    return {"n": len(rows), "figure": path.name, "layer": predictor.gradcam.layer}


def _evaluation_set(run: RunInfo, *, data, split: str) -> tuple[pd.DataFrame, dict[str, Any], dict[str, str]]:
    """The labelled images to evaluate, a description of where they came from, and files dropped as unreadable."""
    taxonomy = run.taxonomy
    if data is not None:
        scan = scan_tree(data, taxonomy=taxonomy, verify=True, allow_unknown=True)
        source = {"kind": "folder", "path": str(scan.report.root),
                  "skipped_folders": scan.report.unknown_folders}
        return scan.manifest, source, dict(scan.report.unreadable)
    manifest = load_split(run.split_path, taxonomy=taxonomy)
    chosen = manifest[manifest["split"] == split].reset_index(drop=True)
    if chosen.empty:
        raise DataError(f"{run.split_path} has no {split!r} images; choose another $split or pass $data DIR")
    return chosen, {"kind": "split", "split": split, "path": str(run.split_path)}, {}


def training_rows(run: RunInfo, paths: Sequence[str]) -> np.ndarray | None:
    """Per path, the split of the run's ``split.csv`` that holds the same file (compared by resolved path) when
    that split is train or val, else None; None instead of the array when the run has no ``split.csv``."""
    if not run.split_path.is_file():
        log.warning("%s is missing: cannot tell whether the evaluated images were used in training", run.split_path)
        return None
    used = load_split(run.split_path, taxonomy=run.taxonomy, check_files=False)
    used = used[used["split"].isin(FIT_SPLITS)]
    split_of = dict(zip(resolved_paths(used["path"]), used["split"], strict=True))
    return np.array([split_of.get(path) for path in resolved_paths(paths)], dtype=object)


def overlap_counts(seen_as: np.ndarray | None) -> dict[str, Any] | None:
    """``{"train": n, "val": n, "fraction": f}``: evaluated images the run trained on or selected its model with."""
    if seen_as is None:
        return None
    counts = {name: int(np.sum(seen_as == name)) for name in FIT_SPLITS}
    return {**counts, "fraction": sum(counts.values()) / len(seen_as) if len(seen_as) else 0.0}


def overlap_note(overlap: dict[str, Any] | None) -> str | None:
    """One sentence on an overlap from :func:`overlap_counts`, or None when there is none."""
    if not overlap or not overlap["fraction"]:
        return None
    n = overlap["train"] + overlap["val"]
    return (f"{n} of the evaluated images ({overlap['fraction']:.1%}) are in the run's own split.csv (train "
            f"{overlap['train']}, val {overlap['val']}): the model was fitted or selected on them, so expect "
            "optimistic numbers; evaluate the test split or images the run has not seen")


def _task_figures(task: str, result: dict[str, Any], y_true, probs, out: Path) -> dict[str, str]:
    figures = {"confusion_matrix": f"confusion_{task}.png"}
    confusion_figure(result["confusion_matrix"], result["labels"], out / figures["confusion_matrix"],
                     title=f"{task}: confusion matrix (n={result['n']})")
    if result.get("roc_auc") is not None:
        figures["roc_curve"] = f"roc_{task}.png"
        pos = result["labels"].index(result["positive_label"])
        roc_figure(np.asarray(y_true) == pos, probs[:, pos], out / figures["roc_curve"],
                   title=f"{task}: ROC of {result['positive_label']}", auc=result["roc_auc"])
    return figures


# ----------------------------------------------------------------------------------------------- report

SUMMARY_KEYS = ("n", "accuracy", "balanced_accuracy", "macro_f1", "roc_auc", "sensitivity", "specificity")


def summary_table(metrics: dict[str, Any]) -> pd.DataFrame:
    """One row per task with the headline numbers of :func:`evaluate_run`'s result (NaN where not applicable)."""
    rows = {task: {key: metrics[task].get(key) for key in SUMMARY_KEYS} for task in metrics["tasks"]}
    table = pd.DataFrame.from_dict(rows, orient="index").astype(float).round(3).dropna(axis=1, how="all")
    return table.astype({"n": int})


def _fmt(value) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _markdown(rows: list[list[Any]], header: list[str]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]


def render_report(metrics: dict[str, Any]) -> str:
    """The markdown report of a metrics dict from :func:`evaluate_run`."""
    source = metrics["source"]
    where = (f"the `{source['split']}` split of `{source['path']}`" if source["kind"] == "split"
             else f"every labelled image under `{source['path']}`")
    lines = [f"# Evaluation of `{metrics['run']}`", "",
             f"{metrics['n_images']} images: {where}, at {metrics['image_size']} px. Predicted class: the most "
             "probable one (for cancer: Malignant when its probability exceeds 0.5).", ""]
    note = overlap_note(metrics.get("overlap"))
    if note:
        lines += [f"> **Warning**: {note}.", ""]
    if metrics["unreadable"]:
        lines += [f"{len(metrics['unreadable'])} unreadable file(s) left out:", ""]
        lines += [f"- `{path}`: {why}" for path, why in metrics["unreadable"].items()] + [""]
    skipped = source.get("skipped_folders", {})
    lines += [f"- skipped `{folder}` ({count} images): not a subclass of the run's taxonomy"
              for folder, count in skipped.items()] + ([""] if skipped else [])
    for task in metrics["tasks"]:
        lines += _task_section(task, metrics[task])
    if "explain" in metrics:
        lines += ["", "## Where the heads look", "",
                  f"Grad-CAM on InceptionV3's `{metrics['explain']['layer']}` block for the predicted class of each "
                  f"head, {metrics['explain']['n']} images (titles: true -> predicted).", "",
                  f"![Grad-CAM per head]({metrics['explain']['figure']})"]
    return "\n".join(lines) + "\n"


def _task_section(task: str, m: dict[str, Any]) -> list[str]:
    summary = [["accuracy", m["accuracy"]], ["balanced accuracy", m["balanced_accuracy"]], ["macro-F1", m["macro_f1"]]]
    if task == "cancer":
        pos = m["positive_label"]
        summary += [["ROC-AUC", m["roc_auc"]], [f"sensitivity ({pos} recall)", m["sensitivity"]],
                    ["specificity", m["specificity"]]]
    lines = ["", f"## {task}", "", *_markdown(summary, ["metric", "value"]), ""]
    if m.get("notes"):
        lines += [f"> note: {note}" for note in m["notes"]] + [""]
    per_class = [[label, v["precision"], v["recall"], v["f1"], v["support"]] for label, v in m["per_class"].items()]
    lines += [*_markdown(per_class, ["class", "precision", "recall", "F1", "images"]), ""]
    if "per_organ" in m:
        rows = [[organ, v["n"], v["n_malignant"], v["accuracy"], v["sensitivity"], v["specificity"]]
                for organ, v in m["per_organ"].items()]
        lines += ["Cancer head within each true organ:", "",
                  *_markdown(rows, ["organ", "images", "malignant", "accuracy", "sensitivity", "specificity"]), ""]
    lines += [f"![{task} {name.replace('_', ' ')}]({file})" for name, file in m["figures"].items()]
    return lines
