"""Calibrated probabilities and the malignancy operating point: pure numpy/scipy/sklearn.

Everything here takes arrays (label ids, logits or probabilities) and returns numbers, tables or a matplotlib
``Figure``; nothing imports TensorFlow, touches files or knows about runs, so ``train``, ``evaluate``, ``predict``
and the notebooks share one definition of each quantity.

- Temperature scaling per head (Guo et al., 2017): :func:`fit_temperature` on validation logits, then
  :func:`softmax` with that temperature.
- Calibration measures: :func:`expected_calibration_error` (top-label, 15 equal-width bins),
  :func:`reliability_table`, :func:`reliability_figure`, :func:`brier_score`.
- Operating point: :func:`choose_threshold` (highest threshold reaching a target sensitivity),
  :func:`sensitivity_specificity`, :func:`organ_thresholds` (one per organ, with the fallback rule
  :data:`ORGAN_THRESHOLD_RULE`) and :func:`choose_thresholds_by_group` (the same as a table).
- :func:`format_interval` prints a value with its interval; the intervals themselves are
  :mod:`multitask.bootstrap`'s.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import special
from scipy.optimize import minimize_scalar

from multitask.errors import ConfigError, DataError
from multitask.taxonomy import CANCER_LABELS, MALIGNANT

log = logging.getLogger(__name__)

ECE_BINS = 15
TEMPERATURE_BOUNDS = (0.05, 20.0)
MIN_CALIBRATION_SAMPLES = 10  # below this a fitted temperature is noise: keep the raw probabilities
MetricFn = Callable[..., Any]


def scores_and_labels(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    """``scores`` as float64 (n, classes) and ``labels`` as int64 (n,), checked against each other."""
    scores = np.asarray(scores, np.float64)
    labels = np.asarray(labels).ravel().astype(np.int64)
    if scores.ndim != 2 or len(scores) != len(labels) or len(labels) == 0:
        raise ValueError(f"expected non-empty scores of shape ({len(labels)}, n_classes), got {scores.shape}")
    if labels.min() < 0 or labels.max() >= scores.shape[1]:
        raise ValueError(f"label ids must be in 0..{scores.shape[1] - 1}, got {labels.min()}..{labels.max()}")
    return scores, labels


# ----------------------------------------------------------------------------------------------- temperature


def softmax(logits, temperature: float = 1.0) -> np.ndarray:
    """Class probabilities ``softmax(logits / temperature)`` along the last axis, stable at any logit scale."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return special.softmax(np.asarray(logits, np.float64) / temperature, axis=-1)


def fit_temperature(logits, labels, *, bounds: tuple[float, float] = TEMPERATURE_BOUNDS) -> float:
    """The temperature T > 0 minimising the mean NLL of ``softmax(logits / T)``; 1.0 when there is nothing to fit.

    ``logits`` are a head's outputs on held-out (validation) images; log-probabilities work too, since softmax
    ignores a per-row shift. T > 1 softens over-confident probabilities; argmax predictions never change.
    """
    logits, labels = scores_and_labels(logits, labels)
    if len(labels) < MIN_CALIBRATION_SAMPLES or np.unique(labels).size < 2:
        log.warning("temperature scaling skipped (T = 1): %d images of %d class(es); need >= %d of >= 2",
                    len(labels), np.unique(labels).size, MIN_CALIBRATION_SAMPLES)
        return 1.0
    rows = np.arange(len(labels))

    def mean_nll(log_temperature: float) -> float:
        return -special.log_softmax(logits / math.exp(log_temperature), axis=1)[rows, labels].mean()

    # The NLL is convex in 1/T, hence unimodal in log T: bounded Brent finds its minimum, deterministically.
    low, high = np.log(bounds)
    result = minimize_scalar(mean_nll, bounds=(low, high), method="bounded", options={"xatol": 1e-6})
    temperature = float(math.exp(result.x))
    if min(result.x - low, high - result.x) < 1e-3:
        log.warning("fitted temperature %.3g is at the bound %s: the logits may be degenerate", temperature, bounds)
    return temperature


# ----------------------------------------------------------------------------------------------- calibration


def confidence_bins(probs, labels, bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bin index, top-class confidence and correctness per sample."""
    probs, labels = scores_and_labels(probs, labels)
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    # Right-closed bins (lo, hi] as in Guo et al.; a confidence of exactly 0 joins the first bin.
    index = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    return index, confidence, correct


def expected_calibration_error(probs, labels, *, bins: int = ECE_BINS) -> float:
    """Top-label ECE: sum over equal-width confidence bins of (count / n) * |accuracy - mean confidence|."""
    index, confidence, correct = confidence_bins(probs, labels, bins)
    # Per bin, sum(confidence - correct) = count * (mean confidence - accuracy).
    gaps = np.bincount(index, weights=confidence - correct, minlength=bins)
    return float(np.abs(gaps).sum() / len(index))


def reliability_table(probs, labels, *, bins: int = ECE_BINS) -> pd.DataFrame:
    """Per confidence bin: ``lower``, ``upper``, ``count``, mean ``confidence`` and ``accuracy`` (NaN when empty)."""
    index, confidence, correct = confidence_bins(probs, labels, bins)
    count = np.bincount(index, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(index, weights=confidence, minlength=bins) / count
        accuracy = np.bincount(index, weights=correct, minlength=bins) / count
    edges = np.linspace(0.0, 1.0, bins + 1)
    return pd.DataFrame({"lower": edges[:-1], "upper": edges[1:], "count": count,
                         "confidence": mean_confidence, "accuracy": accuracy})


def table_ece(table: pd.DataFrame) -> float:
    """The ECE that a :func:`reliability_table` describes."""
    used = table[table["count"] > 0]
    return float((used["count"] * (used["accuracy"] - used["confidence"]).abs()).sum() / used["count"].sum())


def reliability_figure(tables: Mapping[str, pd.DataFrame], *, title: str):
    """A ``Figure``: accuracy against confidence per table (e.g. uncalibrated, calibrated) and their bin counts."""
    from matplotlib.figure import Figure  # no pyplot: no global state, safe without a display

    fig = Figure(figsize=(4.8, 6.0), dpi=100, layout="constrained")
    curve, counts = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    curve.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfectly calibrated")
    for i, (name, table) in enumerate(tables.items()):
        used = table[table["count"] > 0]
        curve.plot(used["confidence"], used["accuracy"], marker="o", label=f"{name} (ECE {table_ece(table):.3f})")
        width = (table["upper"] - table["lower"]) / len(tables)
        counts.bar(table["lower"] + i * width, table["count"], width=width, align="edge", label=name)
    curve.set(title=title, ylabel="accuracy", xlim=(0, 1), ylim=(0, 1.01))
    curve.legend(loc="upper left", fontsize=8)
    counts.set(xlabel="confidence (top-class probability)", ylabel="images")
    return fig


def brier_score(probs, labels) -> float:
    """Brier score: sklearn's ``brier_score_loss`` for two classes, else mean over samples of sum_k (p_k - y_k)^2.

    With two classes the sum counts each error twice ((p_1 - y_1)^2 == (p_0 - y_0)^2), so a binary head reports
    half of it: exactly sklearn's ``brier_score_loss`` on P(Malignant) (or on either class). 0 is perfect;
    constant 0.5 scores 0.25.
    """
    return float(brier_terms(*scores_and_labels(probs, labels)).mean())


def brier_terms(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each sample's Brier term, halved for two classes (see :func:`brier_score`)."""
    terms = ((probs - np.eye(probs.shape[1])[labels]) ** 2).sum(axis=1)
    return terms / 2 if probs.shape[1] == 2 else terms


# ----------------------------------------------------------------------------------------------- operating point


def _binary(p_positive, is_positive) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(p_positive, np.float64).ravel()
    truth = np.asarray(is_positive).ravel().astype(bool)
    if len(scores) != len(truth) or len(scores) == 0:
        raise ValueError(f"expected as many scores as labels (> 0), got {len(scores)} and {len(truth)}")
    return scores, truth


def choose_threshold(p_positive, is_positive, *, target_sensitivity: float = 0.95) -> float:
    """The highest threshold t in [0, 1] whose sensitivity (positives with p >= t) here is >= the target."""
    from sklearn.metrics import roc_curve

    scores, truth = _binary(p_positive, is_positive)
    if not 0 < target_sensitivity <= 1:
        raise ConfigError(f"target sensitivity must be in (0, 1], got {target_sensitivity}")
    if not truth.any():
        raise DataError(f"cannot choose a malignancy threshold: none of the {len(truth)} images is positive "
                        "(Malignant); use a validation split that holds malignant images")
    with warnings.catch_warnings():  # no negatives: fpr is undefined, but tpr (all we need) is not
        warnings.simplefilter("ignore")
        # drop_intermediate=False keeps every distinct score: the answer can lie inside a vertical ROC segment.
        _, tpr, thresholds = roc_curve(truth, scores, drop_intermediate=False)
    first = int(np.argmax(tpr >= target_sensitivity - 1e-12))  # tpr rises as the thresholds fall
    return float(np.clip(thresholds[first], 0.0, 1.0))  # sklearn's first threshold is inf


def sensitivity_specificity(p_positive, is_positive, threshold: float) -> tuple[float | None, float | None]:
    """(sensitivity, specificity) predicting positive when p >= ``threshold``; None where a class is absent."""
    scores, truth = _binary(p_positive, is_positive)
    predicted = scores >= threshold
    sensitivity = float(predicted[truth].mean()) if truth.any() else None
    specificity = float(1.0 - predicted[~truth].mean()) if (~truth).any() else None
    return sensitivity, specificity


MIN_ORGAN_CLASS_IMAGES = 10
ORGAN_THRESHOLD_RULE = (f"an organ gets its own threshold when its validation images (by true organ) hold at least "
                        f"{MIN_ORGAN_CLASS_IMAGES} malignant and {MIN_ORGAN_CLASS_IMAGES} benign images; otherwise "
                        "(fewer, one class only, or none) it uses the global threshold")


def organ_thresholds(p_positive, is_positive, organs, *, target_sensitivity: float, global_threshold: float,
                     labels: Sequence[str] | None = None,
                     min_per_class: int = MIN_ORGAN_CLASS_IMAGES) -> dict[str, dict[str, Any]]:
    """Per organ: ``{"threshold", "source": "organ" | "global", "n_malignant", "n_benign", "val_sensitivity",
    "val_specificity"}``, the validation numbers at that threshold on the organ's images (None where undefined).

    ``organs`` names each image's TRUE organ; ``labels`` lists every organ to include (default: those present),
    so an organ without validation images is listed, on the global threshold. An organ reaches its own threshold
    (:func:`choose_threshold` on its images alone) only under :data:`ORGAN_THRESHOLD_RULE`.
    """
    scores, truth = _binary(p_positive, is_positive)
    organs = np.asarray(organs, dtype=object).ravel()
    if len(organs) != len(scores):
        raise ValueError(f"expected one organ per image ({len(scores)}), got {len(organs)}")
    table = {}
    for organ in (list(labels) if labels is not None else sorted(set(organs))):
        member = organs == organ
        n_malignant, n_benign = int(truth[member].sum()), int((~truth[member]).sum())
        own = min(n_malignant, n_benign) >= min_per_class
        threshold = (choose_threshold(scores[member], truth[member], target_sensitivity=target_sensitivity)
                     if own else float(global_threshold))
        sensitivity, specificity = (sensitivity_specificity(scores[member], truth[member], threshold)
                                    if member.any() else (None, None))
        table[organ] = {"threshold": threshold, "source": "organ" if own else "global",
                             "n_malignant": n_malignant, "n_benign": n_benign,
                             "val_sensitivity": sensitivity, "val_specificity": specificity}
    return table


def choose_thresholds_by_group(p_positive, is_positive, groups, *, target_sensitivity: float = 0.95,
                               min_per_class: int = MIN_ORGAN_CLASS_IMAGES) -> pd.DataFrame:
    """Per group (e.g. true organ): ``n_positive``, ``n_negative``, ``threshold`` and ``own`` (False: global).

    Groups with fewer than ``min_per_class`` positives or negatives get the threshold chosen on all data
    (:func:`organ_thresholds` as a table).
    """
    scores, truth = _binary(p_positive, is_positive)
    overall = choose_threshold(scores, truth, target_sensitivity=target_sensitivity)
    groups = np.asarray(groups).ravel()
    table = organ_thresholds(scores, truth, groups, target_sensitivity=target_sensitivity, global_threshold=overall,
                             labels=[g.item() if hasattr(g, "item") else g for g in np.unique(groups)],
                             min_per_class=min_per_class)
    return pd.DataFrame.from_dict({group: {"n_positive": row["n_malignant"], "n_negative": row["n_benign"],
                                           "threshold": row["threshold"], "own": row["source"] == "organ"}
                                   for group, row in table.items()}, orient="index")


def uncalibrated(probs, temperature: float) -> np.ndarray:
    """The raw softmax that temperature-scaled ``probs`` came from: ``softmax(T * log p)`` (exact up to float
    rounding; probabilities that underflowed to 0 stay 0)."""
    with np.errstate(divide="ignore"):
        log_probs = np.log(np.asarray(probs, np.float64))
    return special.softmax(temperature * log_probs, axis=-1)


def format_interval(value: float | None, lo: float | None = None, hi: float | None = None, *,
                    digits: int = 3) -> str:
    """``"0.970 (0.955-0.982)"``; the bare value when there is no interval, ``"n/a"`` when there is no value."""
    if value is None or not np.isfinite(value):
        return "n/a"
    if lo is None or hi is None:
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} ({lo:.{digits}f}-{hi:.{digits}f})"


# ----------------------------------------------------------------------------------------------- a run's calibration


def fit_calibration(logits: Mapping[str, np.ndarray], labels: Mapping[str, np.ndarray], *, tasks: tuple[str, ...],
                    target_sensitivity: float, organ_labels: Sequence[str] = ()) -> dict[str, Any]:
    """A run's calibration from its validation logits: a temperature per head and, for the cancer head, the highest
    malignancy threshold (on calibrated P(Malignant)) whose validation sensitivity reaches ``target_sensitivity``,
    over all images and, for a joint run, per organ (:func:`organ_thresholds`; ``organ_labels`` name the organ ids).
    The record's "validation" also holds what the saved model scores there (:func:`validation_scores`), so runs can
    be compared on validation without predicting it again.
    """
    validation: dict[str, Any] = {"images": int(len(next(iter(labels.values())))),
                                  **validation_scores(logits, labels, tasks=tasks)}
    temperatures, notes = {}, {}
    for task in tasks:
        fitted = fit_temperature(logits[task], labels[task])
        temperatures[task], note = kept_temperature(logits[task], labels[task], fitted)
        if note:
            notes[task] = note
            log.warning("%s head: %s", task, note)
        validation[f"{task}_temperature_fitted"] = fitted
        validation[f"{task}_ece_uncalibrated"] = expected_calibration_error(softmax(logits[task]), labels[task])
        validation[f"{task}_ece"] = expected_calibration_error(softmax(logits[task], temperatures[task]),
                                                               labels[task])
    threshold, by_organ = None, None
    if "cancer" in tasks:
        positive = CANCER_LABELS.index(MALIGNANT)
        p_malignant = softmax(logits["cancer"], temperatures["cancer"])[:, positive]
        is_malignant = np.asarray(labels["cancer"]) == positive
        if is_malignant.any():
            threshold = choose_threshold(p_malignant, is_malignant, target_sensitivity=target_sensitivity)
            sensitivity, specificity = sensitivity_specificity(p_malignant, is_malignant, threshold)
            validation.update(sensitivity=sensitivity, specificity=specificity)
            if "organ" in tasks:
                organs = np.asarray(organ_labels, dtype=object)[np.asarray(labels["organ"])]
                by_organ = organ_thresholds(p_malignant, is_malignant, organs, labels=organ_labels,
                                            global_threshold=threshold, target_sensitivity=target_sensitivity)
        else:
            log.warning("no malignant validation images: the malignancy threshold stays at 0.5")
    return calibration_record(temperatures, threshold, target_sensitivity, validation, organ_thresholds=by_organ,
                              notes=notes)


def validation_scores(logits: Mapping[str, np.ndarray], labels: Mapping[str, np.ndarray], *,
                      tasks: tuple[str, ...]) -> dict[str, float | None]:
    """The organ head's accuracy and balanced accuracy (of its most probable class, as ``evaluate`` scores them) and
    the cancer head's ROC-AUC (None with one class only): how the run chooses between recipes on validation."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score

    scores: dict[str, float | None] = {}
    if "organ" in tasks:
        y_true, y_pred = np.asarray(labels["organ"]), np.asarray(logits["organ"]).argmax(axis=1)
        with warnings.catch_warnings():  # "y_pred contains classes not in y_true": expected on small sets
            warnings.simplefilter("ignore", UserWarning)
            scores.update(organ_accuracy=float(accuracy_score(y_true, y_pred)),
                          organ_balanced_accuracy=float(balanced_accuracy_score(y_true, y_pred)))
    if "cancer" in tasks:
        is_malignant = np.asarray(labels["cancer"]) == CANCER_LABELS.index(MALIGNANT)
        both = 0 < is_malignant.sum() < len(is_malignant)
        p_malignant = softmax(logits["cancer"])[:, CANCER_LABELS.index(MALIGNANT)]  # a temperature keeps the order
        scores["cancer_roc_auc"] = float(roc_auc_score(is_malignant, p_malignant)) if both else None
    return scores


def kept_temperature(logits, labels, fitted: float) -> tuple[float, str | None]:
    """``fitted`` when it lowers the validation ECE (what calibration promises), else 1.0 and a sentence saying why.

    The temperature minimises the NLL, which on a small validation split can still raise the ECE (the real sample's
    cancer head at 160 px: 0.071 -> 0.102 on the split it was fitted on); such a temperature is not kept.
    """
    if fitted == 1.0:
        return fitted, None
    before = expected_calibration_error(softmax(logits), labels)
    after = expected_calibration_error(softmax(logits, fitted), labels)
    if after < before:
        return fitted, None
    return 1.0, (f"not calibrated (T = 1): the fitted temperature {fitted:.3g} did not lower the validation ECE "
                 f"({before:.3f} -> {after:.3f}), so the raw probabilities are kept")


def calibration_record(temperatures: Mapping[str, float], threshold: float | None, target_sensitivity: float,
                       validation: Mapping[str, Any], *,
                       organ_thresholds: Mapping[str, Any] | None = None,
                       notes: Mapping[str, str] | None = None) -> dict[str, Any]:
    """What config.json stores under "calibration" (read back by :class:`multitask.rundir.RunInfo`).

    ``malignancy_threshold`` is the global operating point (what older readers use); ``malignancy_thresholds``,
    when there are per-organ ones, is :func:`organ_thresholds`' table, applied by PREDICTED organ. ``notes`` say,
    per head, why it kept T = 1 (:func:`kept_temperature`).
    """
    record = {"method": "temperature scaling per head, fitted on the validation split",
              "temperatures": {t: float(v) for t, v in temperatures.items()},
              "malignancy_threshold": None if threshold is None else float(threshold),
              "target_sensitivity": float(target_sensitivity), "validation": dict(validation)}
    if organ_thresholds is not None:
        record["malignancy_thresholds"] = dict(organ_thresholds)
        record["organ_threshold_rule"] = ORGAN_THRESHOLD_RULE
    if notes:
        record["notes"] = dict(notes)
    return record
