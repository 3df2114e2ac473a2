"""Bootstrap confidence intervals: stratified, paired, percentile; vectorised over resamples.

:func:`bootstrap_intervals` takes any metric functions; :func:`classification_intervals` computes evaluate's
classification metrics (accuracy, balanced accuracy, per-class recall, ROC-AUC, sensitivity/specificity at a
threshold) for all resamples at once as weighted sums, because 1,000 calls into scikit-learn per metric take
minutes on a full test split. :func:`classification_metrics` is the same computation on the data itself.
:func:`proportion_interval` is the exact binomial interval, for proportions on groups too small to resample.
Pure numpy (and scipy): no TensorFlow, no files.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from multitask.calibration import ECE_BINS, brier_terms, confidence_bins, scores_and_labels

log = logging.getLogger(__name__)

MIN_DEFINED_FRACTION = 0.5  # a metric undefined on more resamples than this gets no interval
MetricFn = Callable[..., Any]



def stratified_indices(strata, *, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(n_resamples, n) row indices; each row redraws every stratum with replacement at its own size."""
    _, codes = np.unique(np.asarray(strata).ravel(), return_inverse=True)
    indices = np.empty((n_resamples, codes.size), np.int64)
    start = 0
    for code in range(codes.max() + 1):
        members = np.flatnonzero(codes == code)
        draws = rng.integers(0, members.size, size=(n_resamples, members.size))
        indices[:, start:start + members.size] = members[draws]
        start += members.size
    return indices


def _resamples(strata, *, n_resamples: int, seed: int, chunk: int = 100):
    """Blocks of stratified resample indices from one seeded generator, ``chunk`` resamples at a time."""
    # Vectorised per block, with memory bounded at any n. Not sklearn.utils.resample(stratify=...): it checks every
    # array on every call, 1,000 times; scipy.stats.bootstrap cannot stratify.
    rng = np.random.default_rng(seed)
    for start in range(0, n_resamples, chunk):
        yield stratified_indices(strata, n_resamples=min(chunk, n_resamples - start), rng=rng)


def _percentiles(values: Mapping[str, np.ndarray], level: float) -> dict[str, list[float] | None]:
    """``[lo, hi]`` percentile interval per metric, or None when it is undefined (NaN) on most resamples."""
    tail = 50.0 * (1.0 - level)
    intervals: dict[str, list[float] | None] = {}
    for name, draws in values.items():
        if np.isfinite(draws).mean() < MIN_DEFINED_FRACTION:
            log.debug("no interval for %s: undefined on most of %d resamples", name, draws.size)
            intervals[name] = None
        else:
            intervals[name] = [float(bound) for bound in np.nanpercentile(draws, [tail, 100.0 - tail])]
    return intervals


def _columns(y_true, columns, strata) -> tuple[list[np.ndarray], np.ndarray]:
    arrays = [np.asarray(y_true), *(np.asarray(column) for column in columns)]
    if any(len(array) != len(arrays[0]) for array in arrays) or len(arrays[0]) == 0:
        raise ValueError(f"columns must be non-empty and of equal length, got {[len(a) for a in arrays]}")
    strata = arrays[0] if strata is None else np.asarray(strata).ravel()
    if len(strata) != len(arrays[0]):
        raise ValueError(f"expected one stratum per row ({len(arrays[0])}), got {len(strata)}")
    return arrays, strata


def bootstrap_intervals(metric_fns: Mapping[str, MetricFn] | Callable[..., Mapping[str, Any]], y_true, *columns,
                        strata=None, n_resamples: int = 1000, seed: int = 0,
                        level: float = 0.95) -> dict[str, list[float] | None]:
    """Percentile intervals ``{name: [lo, hi]}`` of each metric of ``(y_true, *columns)`` over stratified resamples.

    ``metric_fns`` maps names to ``fn(y_true, *columns) -> float | None``, or is one function returning such a
    dict. Resamples redraw the rows within each stratum (default: the true class) with replacement, keeping each
    stratum's size; every metric sees the same resample (paired). A metric that is None or NaN on more than half
    of the resamples gets None. For a head's standard metrics :func:`classification_intervals` is much faster.
    """
    arrays, strata = _columns(y_true, columns, strata)
    measure = metric_fns if callable(metric_fns) else (
        lambda *sample: {name: fn(*sample) for name, fn in metric_fns.items()})
    values: dict[str, np.ndarray] = {}
    row = 0
    for block in _resamples(strata, n_resamples=n_resamples, seed=seed):
        for index in block:
            for name, value in measure(*(array[index] for array in arrays)).items():
                values.setdefault(name, np.full(n_resamples, np.nan))[row] = np.nan if value is None else value
            row += 1
    return _percentiles(values, level)


def classification_intervals(y_true, probs, *, strata=None, positive: int = 1, threshold: float | None = None,
                             n_resamples: int = 1000, seed: int = 0, level: float = 0.95,
                             per_class: bool = False) -> dict[str, list | None]:
    """:func:`bootstrap_intervals` of :func:`classification_metrics`: the same resamples, computed all at once.

    Each resample becomes a row of counts (how often each image was drawn), so a block of 100 resamples costs a few
    weighted bincounts rather than 100 calls; with the same ``seed`` and strata the resamples are
    :func:`bootstrap_intervals`' own (tested: equal intervals).
    """
    (y_true, probs), strata = _columns(y_true, [probs], strata)
    values: dict[str, list[np.ndarray]] = {}
    for block in _resamples(strata, n_resamples=n_resamples, seed=seed):
        rows, n = block.shape
        offsets = (np.arange(rows)[:, None] * n + block).ravel()
        counts = np.bincount(offsets, minlength=rows * n).reshape(rows, n).astype(np.float64)
        for name, value in _weighted_metrics(y_true, probs, counts, positive=positive, threshold=threshold,
                                             per_class=per_class).items():
            values.setdefault(name, []).append(value)
    return _percentiles({name: np.concatenate(parts) for name, parts in values.items()}, level)


def classification_metrics(y_true, probs, *, positive: int = 1,
                           threshold: float | None = None) -> dict[str, float | None]:
    """A head's metrics by name: accuracy, balanced_accuracy, macro_f1, ece, brier (+ roc_auc, sensitivity, ...).

    Two classes add ``roc_auc``, ``sensitivity`` and ``specificity`` of class ``positive``, which is predicted when
    its probability is >= ``threshold`` (argmax when None). scikit-learn's definitions (tested against it: balanced
    accuracy over the classes present in ``y_true``, macro-F1 over those true or predicted); None if undefined.
    """
    weights = np.ones((1, len(np.asarray(y_true).ravel())))
    values = _weighted_metrics(y_true, probs, weights, positive=positive, threshold=threshold)
    return {name: float(value[0]) if np.isfinite(value[0]) else None for name, value in values.items()}


def _weighted_metrics(y_true, probs, weights: np.ndarray, *, positive: int, threshold: float | None,
                      per_class: bool = False) -> dict[str, np.ndarray]:
    """Each metric for each row of ``weights`` (resamples x images: how often each image counts); ``per_class``
    adds ``recall/<k>`` and ``precision/<k>`` for every class id k."""
    probs, y_true = scores_and_labels(probs, y_true)
    n_classes = probs.shape[1]
    if threshold is not None and n_classes != 2:
        raise ValueError(f"a threshold needs a binary head, got {n_classes} classes")
    predicted = (probs.argmax(axis=1) if threshold is None
                 else np.where(probs[:, positive] >= threshold, positive, 1 - positive))
    cells = _weighted_bincount(weights, y_true * n_classes + predicted, n_classes * n_classes)
    matrix = cells.reshape(-1, n_classes, n_classes)  # a confusion matrix per resample
    hits, support = np.diagonal(matrix, axis1=1, axis2=2), matrix.sum(axis=2)
    seen = support + matrix.sum(axis=1)  # 2TP + FP + FN: > 0 for each class true or predicted
    total = weights.sum(axis=1)
    index, confidence, correct = confidence_bins(probs, y_true, ECE_BINS)
    gaps = _weighted_bincount(weights * (confidence - correct), index, ECE_BINS)  # count * (confidence - accuracy)
    with np.errstate(invalid="ignore", divide="ignore"):  # absent classes: NaN, left out of the means
        recall, f1 = hits / support, 2 * hits / seen
    metrics = {"accuracy": hits.sum(axis=1) / total, "balanced_accuracy": np.nanmean(recall, axis=1),
               "macro_f1": np.nanmean(f1, axis=1), "ece": np.abs(gaps).sum(axis=1) / total,
               "brier": weights @ brier_terms(probs, y_true) / total}
    if n_classes == 2:
        metrics.update(roc_auc=_weighted_roc_auc(y_true == positive, probs[:, positive], weights),
                       sensitivity=recall[:, positive], specificity=recall[:, 1 - positive])
    if per_class:
        with np.errstate(invalid="ignore", divide="ignore"):
            precision = hits / matrix.sum(axis=1)
        for k in range(n_classes):
            metrics[f"recall/{k}"], metrics[f"precision/{k}"] = recall[:, k], precision[:, k]
    return metrics


def _weighted_bincount(weights: np.ndarray, category: np.ndarray, size: int) -> np.ndarray:
    """(rows, size) sums of each row of ``weights`` per ``category`` (one bincount for all rows: O(rows x n))."""
    rows = len(weights)
    offsets = (np.arange(rows)[:, None] * size + category).ravel()
    return np.bincount(offsets, weights=weights.ravel(), minlength=rows * size).reshape(rows, size)


def _weighted_roc_auc(is_positive: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC-AUC per row of ``weights``: P(a positive scores above a negative), ties 1/2 (sklearn's trapezoid)."""
    levels, level = np.unique(scores, return_inverse=True)
    negative_weights = weights[:, ~is_positive]
    tied = _weighted_bincount(negative_weights, level[~is_positive], levels.size)  # negatives at each score
    below = np.cumsum(tied, axis=1) - tied
    positive_weights, at = weights[:, is_positive], level[is_positive]
    wins = (positive_weights * (below[:, at] + 0.5 * tied[:, at])).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return wins / (positive_weights.sum(axis=1) * negative_weights.sum(axis=1))




def proportion_interval(successes: int, n: int, *, level: float = 0.95) -> list[float] | None:
    """The exact (Clopper-Pearson) binomial interval ``[lo, hi]`` of ``successes / n``; None when ``n`` is 0.

    For a proportion on a small group (an organ's sensitivity on 9 malignant images) a percentile bootstrap
    collapses to a point (all 9 found: "1.000 (1.000-1.000)"); the exact interval says how little 9 images show.
    """
    from scipy.stats import binomtest

    if n == 0:
        return None
    interval = binomtest(int(successes), int(n)).proportion_ci(confidence_level=level, method="exact")
    return [float(interval.low), float(interval.high)]
