"""Metrics of a finished run on its own test split or on another labelled folder, with intervals.

The metric functions take label ids and class probabilities only; the forward pass is
:class:`multitask.predict.Predictor`'s, so evaluation and prediction share one inference path (calibrated
probabilities, the run's malignancy threshold, the OOD score).

:func:`evaluate_run` writes into the run directory (or ``out``)::

    metrics.json            numbers per head with 95% bootstrap intervals (layout below), what was evaluated
    report.md               the same as readable tables, with links to the figures
    MODEL_CARD.md           Mitchell et al.'s model card, filled from the run and these numbers
    confusion_<task>.png    confusion matrix: counts and row-normalised (recall per true class)
    reliability_<task>.png  reliability diagram before and after calibration
    roc_cancer.png          ROC curve of P(Malignant) with the chosen threshold and 0.5 marked
    eval_predictions.csv    one row per evaluated image: true labels beside the predictions

``metrics.json``: ``{"n_images", "source", "tasks", "unreadable", "calibrated", "tta", "bootstrap", "overlap", "ood",
"<task>": {"n", "accuracy", "balanced_accuracy", "macro_f1", "ece", "ece_uncalibrated", "brier", "labels",
"per_class", "confusion_matrix", "figures", "ci95": {metric: [lo, hi]}}}``; the cancer head adds ``roc_auc``,
``threshold`` (the global one), ``organ_thresholds``, ``sensitivity`` and ``specificity`` (at the operating
point), ``at_global``, ``at_0.5``, ``positive_label``, ``per_organ``, ``organs_below_target`` and ``notes``. The
cancer head decides each image at the threshold that :class:`multitask.predict.Predictor` applied: its PREDICTED
organ's own threshold where the run has one, else the global one (``--threshold`` overrides both). ``per_organ``
holds, per TRUE organ, sensitivity and specificity at that operating point and at the global threshold, with exact
binomial intervals (:func:`multitask.bootstrap.proportion_interval`), and ``below_target`` when its sensitivity
is below the run's target. Undefined numbers (a class absent from the evaluated images) are ``null`` with a note,
never a crash.

``tta`` says whether flip test-time augmentation averaged each image's probabilities with its mirror's
(``evaluate --tta``); then ``ece_uncalibrated`` is that of ``softmax(T log p)`` of the averaged probabilities, the
uncalibrated view as near as it can be recovered (a mean of two softmaxes is no softmax of one set of logits).

Summary numbers follow scikit-learn: balanced accuracy is the mean recall over the classes present in the true
labels; macro-F1 averages over the classes present in the true labels or the predictions. Intervals:
:func:`multitask.bootstrap.classification_intervals` (resamples of the evaluated images, stratified by true class,
paired across metrics).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from multitask import calibration as cal
from multitask.bootstrap import bootstrap_intervals, classification_intervals, proportion_interval
from multitask.data import scan_tree
from multitask.errors import ConfigError, DataError
from multitask.figures import confusion_figure, reliability_figure, roc_figure
from multitask.files import read_json, remove_stale_dirs, temp_dir, write_csv, write_json, write_text
from multitask.filesystem import resolved_paths
from multitask.guard import check_output
from multitask.report import overlap_note, render_model_card, render_report
from multitask.rundir import RunInfo, claim_files, reading_run
from multitask.settings import BATCH_SIZE, BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED
from multitask.splits import load_split
from multitask.synthetic import SYNTHETIC_MARK
from multitask.taxonomy import MALIGNANT

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
REPORT_FILE = "report.md"
MODEL_CARD_FILE = "MODEL_CARD.md"
PREDICTIONS_FILE = "eval_predictions.csv"
EXPLAIN_FILE = "explain.png"
EVALUATION_MARK = ".multitask-evaluation.json"  # in an --out folder (not a run's): the files evaluate wrote
EVALUATION_TEMP = "evaluation"  # its temporary folder in --out: .evaluation.tmp-<pid>-XXXX (multitask.files.temp_dir)
AUDIT_FILE = Path("split_audit") / "audit.json"  # where `multitask audit-split RUN/split.csv` writes
POSITIVE_LABEL = MALIGNANT  # the positive class of the cancer head
FIT_SPLITS = ("train", "val")  # the splits a run fits its model on, or selects it with (early stopping)


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


def task_metrics(y_true, probs, labels: Sequence[str], *, predicted=None) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro-F1, per-class precision/recall/F1 and the confusion matrix of the
    ``predicted`` class ids (default: the most probable class)."""
    from sklearn.metrics import (
        accuracy_score,
        balanced_accuracy_score,
        confusion_matrix,
        f1_score,
        precision_recall_fscore_support,
    )

    y_true, probs = _check(y_true, probs, labels)
    y_pred = probs.argmax(axis=1) if predicted is None else np.asarray(predicted).astype(np.int64)
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


def cancer_metrics(y_true, probs, labels: Sequence[str], *, positive: str = POSITIVE_LABEL,
                   threshold: float | np.ndarray = 0.5) -> dict[str, Any]:
    """:func:`task_metrics` of the decision P(positive) >= ``threshold`` (one number, or one per image), plus
    ROC-AUC, sensitivity and specificity of the ``positive`` class."""
    from sklearn.metrics import roc_auc_score

    if len(labels) != 2 or positive not in labels:
        raise ValueError(f"cancer metrics need two labels including {positive!r}, got {list(labels)}")
    y_true, probs = _check(y_true, probs, labels)
    pos = list(labels).index(positive)
    negative = labels[1 - pos]
    metrics = task_metrics(y_true, probs, labels, predicted=np.where(probs[:, pos] >= threshold, pos, 1 - pos))
    is_positive = y_true == pos
    notes = []
    if not is_positive.any():
        notes.append(f"no {positive} images: sensitivity and ROC-AUC are undefined")
    if is_positive.all():
        notes.append(f"no {negative} images: specificity and ROC-AUC are undefined")
    both = 0 < is_positive.sum() < len(y_true)
    metrics.update(
        positive_label=positive,
        threshold=float(threshold) if np.ndim(threshold) == 0 else None,
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


def head_metrics(task: str, y_true, probs, raw_probs, labels: Sequence[str], *,
                 threshold: float | np.ndarray | None = None, resamples: int = BOOTSTRAP_RESAMPLES,
                 seed: int = BOOTSTRAP_SEED) -> dict[str, Any]:
    """One head's metrics with calibration (ECE before/after, Brier) and 95% bootstrap intervals of each; the
    cancer head decides at ``threshold`` (one number, or one per image)."""
    if task == "cancer":
        result = cancer_metrics(y_true, probs, labels, threshold=threshold if threshold is not None else 0.5)
    else:
        result = task_metrics(y_true, probs, labels)
    result.update(ece=cal.expected_calibration_error(probs, y_true),
                  ece_uncalibrated=cal.expected_calibration_error(raw_probs, y_true),
                  brier=cal.brier_score(probs, y_true))
    positive = list(labels).index(POSITIVE_LABEL) if task == "cancer" else 1
    decision = threshold if task == "cancer" else None
    ci = classification_intervals(y_true, probs, positive=positive, threshold=decision, n_resamples=resamples,
                                      seed=seed, per_class=True)
    ci["ece_uncalibrated"] = classification_intervals(y_true, raw_probs, positive=positive, threshold=decision,
                                                          n_resamples=resamples, seed=seed)["ece"]
    for k, label in enumerate(labels):
        result["per_class"][label]["ci95"] = {"precision": ci.pop(f"precision/{k}"), "recall": ci.pop(f"recall/{k}")}
    result["ci95"] = ci
    _exact_intervals_for_small_groups(result)
    if task == "cancer" and np.any(np.asarray(threshold) != 0.5):
        half = classification_intervals(y_true, probs, positive=positive, threshold=0.5, n_resamples=resamples,
                                            seed=seed)
        sensitivity, specificity = cal.sensitivity_specificity(np.asarray(probs)[:, positive],
                                                               np.asarray(y_true) == positive, 0.5)
        result["at_0.5"] = {"sensitivity": sensitivity, "specificity": specificity,
                            "ci95": {"sensitivity": half["sensitivity"], "specificity": half["specificity"]}}
        _exact_rates_for_small_groups(result["at_0.5"], np.asarray(probs)[:, positive] >= 0.5,
                                      np.asarray(y_true) == positive)
    return result


# ----------------------------------------------------------------------------------------------- a run


def evaluate_run(run_dir: str | os.PathLike, *, data: str | os.PathLike | None = None, split: str = "test",
                 out: str | os.PathLike | None = None, batch_size: int = BATCH_SIZE, explain: int = 0,
                 calibrated: bool = True, threshold: float | None = None,
                 resamples: int = BOOTSTRAP_RESAMPLES, tta: bool = False) -> dict[str, Any]:
    """Evaluate a finished run on its ``split`` (or every image under ``data``); write metrics, report, model card
    and figures; returns the metrics (metrics.json). ``explain=N`` adds a figure of N evaluated images with each
    head's Grad-CAM heatmap; ``tta=True`` evaluates with flip test-time augmentation (see multitask.predict).

    The run is read under a shared lock (a ``train --overwrite`` of it is refused meanwhile). ``out`` (default: the
    run folder) is checked first (:func:`multitask.guard.check_output`: not in the data, not another run's files,
    a new or empty folder or an earlier evaluation's); everything is written into a temporary folder there and then
    moved into place as one unit (:func:`_publish`)."""
    if batch_size < 1:
        raise ConfigError(f"$batch_size must be at least 1, got {batch_size}")
    with reading_run(run_dir) as run:
        out = Path(out).expanduser() if out is not None else run.path
        check_output(out, flag="$out", folder=True, data=[*run.data_roots(), *([data] if data else [])],
                     run=run.path, writes=output_names(run.tasks), mark=EVALUATION_MARK)
        remove_stale_dirs(out, EVALUATION_TEMP)
        created = not out.exists()
        stage = temp_dir(out, EVALUATION_TEMP)
        try:
            metrics = _evaluate(run, stage, data=data, split=split, batch_size=batch_size, explain=explain,
                                calibrated=calibrated, threshold=threshold, resamples=resamples, tta=tta)
            _publish(stage, out, run)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
            if created and not any(out.iterdir()):  # a failed evaluation leaves no trace, not even its --out
                out.rmdir()
    log.info("wrote %s, %s, %s and figures to %s", METRICS_FILE, REPORT_FILE, MODEL_CARD_FILE, out)
    return metrics


def _evaluate(run: RunInfo, out: Path, *, data, split: str, batch_size: int, explain: int, calibrated: bool,
              threshold: float | None, resamples: int, tta: bool = False) -> dict[str, Any]:
    """:func:`evaluate_run`'s work: predict, measure, and write every output into ``out`` (the temporary folder)."""
    from multitask.predict import Predictor

    predictor = Predictor.from_run(run, calibrated=calibrated, threshold=threshold, tta=tta)  # a bad model fails first
    manifest, source, unreadable = _evaluation_set(run, data=data, split=split)
    seen_as = training_rows(run, manifest["path"])
    note = overlap_note(overlap_counts(seen_as))
    if note:
        log.warning(note)
    predicted = predictor.predict_files(manifest["path"].tolist(), batch_size=batch_size)
    failed = predicted["error"].notna().to_numpy()
    unreadable.update(zip(predicted.loc[failed, "path"], predicted.loc[failed, "error"], strict=True))
    manifest, predicted = manifest[~failed].reset_index(drop=True), predicted[~failed].reset_index(drop=True)
    if manifest.empty:
        raise DataError(f"none of the {len(failed)} images to evaluate could be read; see the warnings above")

    metrics: dict[str, Any] = {
        "n_images": len(manifest), "source": source, "run": str(run.path), "image_size": run.image_size,
        "tasks": list(run.tasks), "unreadable": unreadable, "calibrated": calibrated, "tta": predictor.tta,
        "bootstrap": {"resamples": resamples, "seed": BOOTSTRAP_SEED, "level": 0.95,
                      "stratified_by": "true class of each head", "small_groups": SMALL_GROUP_RULE},
        "overlap": overlap_counts(None if seen_as is None else seen_as[~failed]),
    }
    for task in run.tasks:
        labels = run.labels[task]
        probs = predicted[[f"p_{task}_{label}" for label in labels]].to_numpy(np.float64)
        raw = probs if not calibrated else cal.uncalibrated(probs, run.temperatures[task])
        y_true = manifest[f"{task}_id"].to_numpy()
        # Each image is decided at the threshold the predictor applied to it: its predicted organ's, or the global one.
        applied = predicted["malignancy_threshold"].to_numpy(np.float64) if task == "cancer" else None
        result = head_metrics(task, y_true, probs, raw, labels, resamples=resamples, threshold=applied)
        if task == "cancer":
            result.update(_operating_point(run, predictor, threshold_given=threshold is not None,
                                           calibrated=calibrated))
            if predictor.organ_thresholds:
                result["at_global"] = _at_threshold(y_true, probs, labels, predictor.threshold, resamples)
            result["per_organ"] = _per_organ(manifest, y_true, probs, labels, applied, predictor=predictor,
                                             organ_labels=run.taxonomy.labels("organ"),
                                             target=result["target_sensitivity"])
            result["organs_below_target"] = [organ for organ, row in result["per_organ"].items()
                                             if row["below_target"]]
        result["figures"] = _task_figures(task, result, y_true, probs, raw, out)
        result["temperature"] = run.temperatures[task] if calibrated else 1.0
        if calibrated and run.calibration.get("notes", {}).get(task):  # why this head kept T = 1
            result["calibration_note"] = run.calibration["notes"][task]
        metrics[task] = result
    if "ood" in predicted.columns:
        metrics["ood"] = _ood_rate(predicted["ood"].to_numpy(bool), manifest, predictor.ood_threshold, resamples)
    if explain > 0:
        metrics["explain"] = explain_figure(predictor, manifest, predicted, n=explain, path=out / EXPLAIN_FILE)

    table = pd.concat([manifest[["path", "subclass"]], manifest[list(run.tasks)].add_prefix("true_"),
                       predicted.drop(columns="path")], axis=1)
    write_csv(table, out / PREDICTIONS_FILE)
    write_json(metrics, out / METRICS_FILE)
    write_text(render_report(metrics), out / REPORT_FILE)
    split_table = load_split(run.split_path, taxonomy=run.taxonomy, check_files=False)
    audit = read_json(run.path / AUDIT_FILE) if (run.path / AUDIT_FILE).is_file() else None
    write_text(render_model_card(run, metrics, split=split_table, audit=audit, synthetic=_is_synthetic(run)),
               out / MODEL_CARD_FILE)
    return metrics


def output_names(tasks: Sequence[str]) -> list[str]:
    """Every file an evaluation may write (figures per task included): what it may replace in its ``out``."""
    figures = [f"{kind}_{task}.png" for task in tasks for kind in ("confusion", "reliability", "roc")]
    return [METRICS_FILE, REPORT_FILE, MODEL_CARD_FILE, PREDICTIONS_FILE, EXPLAIN_FILE, *figures]


def _publish(stage: Path, out: Path, run: RunInfo) -> None:
    """Move the finished outputs from ``stage`` into ``out`` as one unit. First they are recorded as ours (claimed
    by the run when ``out`` is its folder, else listed in ``out``'s :data:`EVALUATION_MARK`); then metrics.json,
    which vouches for the rest, is removed, the other files (and an earlier evaluation's files this one did not
    write, such as a ROC curve) are replaced, and metrics.json comes last. A kill at any point leaves either the
    old evaluation whole, or no metrics.json beside a partial set: never new figures beside old metrics."""
    names = sorted(p.name for p in stage.iterdir())
    if out.resolve() == run.path.resolve():  # they describe this model: an overwritten run must not keep them
        claim_files(run.path, names)
    else:
        write_json({"run": str(run.path), "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": names},
                   out / EVALUATION_MARK)
    (out / METRICS_FILE).unlink(missing_ok=True)
    for name in output_names(run.tasks):
        if name not in names and os.path.lexists(out / name):
            (out / name).unlink()
    for name in [n for n in names if n != METRICS_FILE] + [METRICS_FILE]:
        os.replace(stage / name, out / name)


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


def _operating_point(run: RunInfo, predictor, *, threshold_given: bool, calibrated: bool) -> dict[str, Any]:
    """The cancer head's thresholds as evaluated: the global one, its source, the per-organ table, the target."""
    if threshold_given:
        source = "given with --threshold"
    elif not calibrated or run.malignancy_threshold is None:
        source = "the default 0.5"
    elif predictor.organ_thresholds:
        source = ("the predicted organ's threshold, chosen on validation; this global one where an organ had too few "
                  "validation images")
    else:
        source = "the run's operating point"
    table = {organ: {"threshold": row["threshold"], "source": row["source"], "n_malignant": row.get("n_malignant"),
                     "n_benign": row.get("n_benign")}
             for organ, row in run.organ_thresholds.items()} if predictor.organ_thresholds else {}
    return {"threshold": predictor.threshold, "threshold_source": source, "organ_thresholds": table,
            "target_sensitivity": run.calibration.get("target_sensitivity")}


def _at_threshold(y_true, probs, labels, threshold: float, resamples: int) -> dict[str, Any]:
    """Sensitivity and specificity of the cancer head at one ``threshold`` for every image, with intervals."""
    positive = list(labels).index(POSITIVE_LABEL)
    ci = classification_intervals(y_true, probs, positive=positive, threshold=threshold, n_resamples=resamples,
                                  seed=BOOTSTRAP_SEED)
    sensitivity, specificity = cal.sensitivity_specificity(np.asarray(probs)[:, positive],
                                                           np.asarray(y_true) == positive, threshold)
    return {"threshold": float(threshold), "sensitivity": sensitivity, "specificity": specificity,
            "ci95": {"sensitivity": ci["sensitivity"], "specificity": ci["specificity"]}}


def _per_organ(manifest: pd.DataFrame, y_true, probs, labels, applied: np.ndarray, *, predictor,
               organ_labels: Sequence[str], target: float | None) -> dict[str, Any]:
    """Per TRUE organ: :func:`per_organ_accuracy` at the operating point (each image at the threshold it was decided
    with), the organ's own threshold, the same at the global threshold when per-organ ones applied, exact binomial
    intervals, and ``below_target`` (sensitivity below ``target``; None where undefined)."""
    positive = list(labels).index(POSITIVE_LABEL)
    organ_ids = manifest["organ_id"].to_numpy()
    y_true, p_malignant = np.asarray(y_true), np.asarray(probs)[:, positive]
    decision = np.where(p_malignant >= applied, positive, 1 - positive)
    table = per_organ_accuracy(organ_ids, y_true, decision, organ_labels, positive=positive)
    for organ, row in table.items():
        rows = organ_ids == list(organ_labels).index(organ)
        truth = y_true[rows] == positive
        own = predictor.organ_thresholds.get(organ)
        row.update(threshold=predictor.threshold if own is None else own,
                   threshold_source=predictor.threshold_source if own is None else "organ",
                   ci95=_proportion_intervals(truth, decision[rows] == positive))
        if predictor.organ_thresholds:
            called = p_malignant[rows] >= predictor.threshold
            row["at_global"] = {"sensitivity": float(called[truth].mean()) if truth.any() else None,
                                "specificity": float(1 - called[~truth].mean()) if (~truth).any() else None,
                                "ci95": _proportion_intervals(truth, called)}
        row["below_target"] = (None if target is None or row["sensitivity"] is None
                               else bool(row["sensitivity"] < target))
    return table


def _proportion_intervals(truth: np.ndarray, called: np.ndarray) -> dict[str, list[float] | None]:
    """Exact binomial intervals of accuracy, sensitivity and specificity of the calls ``called`` (Malignant)."""
    return {"accuracy": proportion_interval(int(np.sum(called == truth)), len(truth)),
            "sensitivity": proportion_interval(int(np.sum(called & truth)), int(truth.sum())),
            "specificity": proportion_interval(int(np.sum(~called & ~truth)), int((~truth).sum()))}


MIN_BOOTSTRAP_IMAGES = 20
SMALL_GROUP_RULE = (f"a proportion (accuracy, sensitivity, specificity, per-class precision and recall, the OOD rate) "
                    f"on fewer than {MIN_BOOTSTRAP_IMAGES} images, or one of 0% or 100% (which no resample can move), "
                    "gets the exact (Clopper-Pearson) binomial interval, since a percentile bootstrap collapses there "
                    f"(9 of 9 right: 1.000-1.000); other metrics on fewer than {MIN_BOOTSTRAP_IMAGES} images get no "
                    "interval")


def _needs_exact(successes: int, n: int) -> bool:
    """Whether a proportion's bootstrap interval would mislead (SMALL_GROUP_RULE): few images, or all or none."""
    return n > 0 and (n < MIN_BOOTSTRAP_IMAGES or successes in (0, n))


def _exact_intervals_for_small_groups(result: dict[str, Any]) -> None:
    """Replace the bootstrap intervals of proportions whose denominator is below :data:`MIN_BOOTSTRAP_IMAGES` by exact
    binomial ones, and drop the other metrics' intervals when the whole head saw that few (see SMALL_GROUP_RULE)."""
    matrix = np.asarray(result["confusion_matrix"], np.int64)
    ci = result["ci95"]
    hits = np.diagonal(matrix)
    if matrix.sum() < MIN_BOOTSTRAP_IMAGES:
        ci.update({key: None for key in ci if key != "accuracy"})
    if _needs_exact(int(hits.sum()), int(matrix.sum())):
        ci["accuracy"] = proportion_interval(int(hits.sum()), int(matrix.sum()))
    recall = {}
    for k, label in enumerate(result["labels"]):
        intervals = result["per_class"][label]["ci95"]
        support, called = int(matrix[k].sum()), int(matrix[:, k].sum())
        if _needs_exact(int(hits[k]), support):
            intervals["recall"] = recall[label] = proportion_interval(int(hits[k]), support)
        if _needs_exact(int(hits[k]), called):
            intervals["precision"] = proportion_interval(int(hits[k]), called)
    if "positive_label" in result:  # sensitivity and specificity are the two classes' recalls
        positive = result["positive_label"]
        negative = next(label for label in result["labels"] if label != positive)
        for key, label in (("sensitivity", positive), ("specificity", negative)):
            if label in recall:
                ci[key] = recall[label]


def _exact_rates_for_small_groups(rates: dict[str, Any], called: np.ndarray, truth: np.ndarray) -> None:
    """Exact intervals of ``rates``' sensitivity / specificity (calls ``called`` against ``truth``) whose class has
    fewer than :data:`MIN_BOOTSTRAP_IMAGES` images."""
    for key, members, right in (("sensitivity", truth, called), ("specificity", ~truth, ~called)):
        if _needs_exact(int((right & members).sum()), int(members.sum())):
            rates["ci95"][key] = proportion_interval(int((right & members).sum()), int(members.sum()))


def _ood_rate(flagged: np.ndarray, manifest: pd.DataFrame, threshold: float, resamples: int) -> dict[str, Any]:
    ci = bootstrap_intervals({"fraction": lambda f: float(np.mean(f))}, flagged.astype(float),
                                 strata=manifest["organ_id"].to_numpy(), n_resamples=resamples, seed=BOOTSTRAP_SEED)
    if _needs_exact(int(flagged.sum()), len(flagged)):  # SMALL_GROUP_RULE
        ci = {"fraction": proportion_interval(int(flagged.sum()), len(flagged))}
    return {"threshold": threshold, "n_flagged": int(flagged.sum()), "fraction": float(flagged.mean()), "ci95": ci}


def _is_synthetic(run: RunInfo) -> bool:
    root = run.config.get("settings", {}).get("data")
    return bool(root) and (Path(root) / SYNTHETIC_MARK).is_file()


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
    from multitask.explain import is_flat

    cams = {t: np.concatenate(v) for t, v in cams.items()}
    flat = {t: [is_flat(cam) for cam in cams[t]] for t in predictor.tasks}
    titles = [{"input": Path(manifest.at[r, "path"]).name[:28],
               **{t: f"{t}: {manifest.at[r, t]} -> {predicted.at[r, t]}" + (" (flat map)" if flat[t][i] else "")
                  for t in predictor.tasks}} for i, r in enumerate(rows)]
    save_grid(np.concatenate(images), cams, titles, path)
    return {"n": len(rows), "figure": path.name, "layer": predictor.gradcam.layer,
            "flat": {t: int(sum(v)) for t, v in flat.items()}}


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


def _task_figures(task: str, result: dict[str, Any], y_true, probs, raw, out: Path) -> dict[str, str]:
    figures = {"confusion_matrix": f"confusion_{task}.png", "reliability": f"reliability_{task}.png"}
    confusion_figure(result["confusion_matrix"], result["labels"], out / figures["confusion_matrix"],
                     title=f"{task}: confusion matrix (n={result['n']})")
    reliability_figure({"uncalibrated": cal.reliability_table(raw, y_true),
                        "calibrated": cal.reliability_table(probs, y_true)}, out / figures["reliability"],
                       title=f"{task}: reliability (n={result['n']})")
    if result.get("roc_auc") is not None:
        figures["roc_curve"] = f"roc_{task}.png"
        pos = result["labels"].index(result["positive_label"])
        chosen = "per-organ thresholds" if result.get("organ_thresholds") else f"threshold {result['threshold']:.2f}"
        points = {chosen: (result["sensitivity"], result["specificity"])}
        if "at_global" in result:
            points[f"global {result['threshold']:.2f}"] = (result["at_global"]["sensitivity"],
                                                           result["at_global"]["specificity"])
        if "at_0.5" in result:
            points["0.5"] = (result["at_0.5"]["sensitivity"], result["at_0.5"]["specificity"])
        roc_figure(np.asarray(y_true) == pos, probs[:, pos], out / figures["roc_curve"],
                   title=f"{task}: ROC of {result['positive_label']}", auc=result["roc_auc"], points=points)
    return figures


# ----------------------------------------------------------------------------------------------- summary

SUMMARY_KEYS = ("n", "accuracy", "balanced_accuracy", "macro_f1", "roc_auc", "sensitivity", "specificity", "ece",
                "brier")


def summary_table(metrics: dict[str, Any]) -> pd.DataFrame:
    """One row per task with the headline numbers of :func:`evaluate_run`'s result (NaN where not applicable)."""
    rows = {task: {key: metrics[task].get(key) for key in SUMMARY_KEYS} for task in metrics["tasks"]}
    table = pd.DataFrame.from_dict(rows, orient="index").astype(float).round(3).dropna(axis=1, how="all")
    return table.astype({"n": int})
