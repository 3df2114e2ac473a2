"""Temperature scaling, ECE, Brier, the operating point and bootstrap intervals against known answers."""

from __future__ import annotations

import logging
from functools import partial

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, brier_score_loss, f1_score, roc_auc_score

from multitask.bootstrap import (
    bootstrap_intervals,
    classification_intervals,
    classification_metrics,
    stratified_indices,
)
from multitask.calibration import (
    brier_score,
    choose_threshold,
    choose_thresholds_by_group,
    expected_calibration_error,
    fit_temperature,
    format_interval,
    reliability_figure,
    reliability_table,
    sensitivity_specificity,
    softmax,
)
from multitask.errors import ConfigError, DataError


def sample_labels(probs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One label per row drawn from that row's probabilities: calibrated by construction."""
    return (rng.random((len(probs), 1)) > probs.cumsum(axis=1)).sum(axis=1)


def overconfident_logits(n: int, *, factor: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits ``factor`` times sharper than the calibrated ones the labels were drawn from, and those labels."""
    rng = np.random.default_rng(seed)
    true_logits = rng.normal(0.0, 1.5, size=(n, 5))
    return factor * true_logits, sample_labels(softmax(true_logits), rng)


# ----------------------------------------------------------------------------------------------- temperature


def test_softmax_is_stable_and_tempered():
    probs = softmax([[1000.0, 0.0, -1000.0], [1.0, 1.0, 1.0]])
    np.testing.assert_allclose(probs, [[1, 0, 0], [1 / 3, 1 / 3, 1 / 3]])
    np.testing.assert_allclose(softmax([[2.0, 0.0]], temperature=2.0), softmax([[1.0, 0.0]]))
    with pytest.raises(ValueError, match="temperature"):
        softmax([[1.0, 0.0]], temperature=0.0)


def test_fit_temperature_recovers_a_known_overconfidence_and_fixes_ece():
    logits, labels = overconfident_logits(4000, factor=3.0)
    temperature = fit_temperature(logits, labels)
    assert temperature == pytest.approx(3.0, rel=0.10)
    before = expected_calibration_error(softmax(logits), labels)
    after = expected_calibration_error(softmax(logits, temperature), labels)
    assert before > 0.15 and after < 0.03
    assert fit_temperature(logits, labels) == temperature  # deterministic
    sharp, sharp_labels = overconfident_logits(4000, factor=0.5, seed=1)  # under-confident: T < 1 sharpens
    assert fit_temperature(sharp, sharp_labels) == pytest.approx(0.5, rel=0.10)


def test_a_temperature_that_does_not_lower_validation_ece_is_not_kept(monkeypatch):
    """Issue 20: on the real sample's 160 px run the fitted temperature raised the cancer head's validation ECE
    (0.071 -> 0.102) and the report still said "calibrated". A run keeps T only where it lowers that ECE."""
    from multitask import calibration

    sharp, sharp_labels = overconfident_logits(400, factor=3.0)
    record = calibration.fit_calibration({"organ": sharp}, {"organ": sharp_labels}, tasks=("organ",),
                                         target_sensitivity=0.95)
    assert record["temperatures"]["organ"] == pytest.approx(3.0, rel=0.15) and "notes" not in record
    assert record["validation"]["organ_ece"] < record["validation"]["organ_ece_uncalibrated"]

    calibrated, labels = overconfident_logits(400, factor=1.0, seed=2)
    monkeypatch.setattr(calibration, "fit_temperature", lambda logits, labels: 4.0)  # far too soft for these
    record = calibration.fit_calibration({"organ": calibrated}, {"organ": labels}, tasks=("organ",),
                                         target_sensitivity=0.95)
    assert record["temperatures"]["organ"] == 1.0 and record["validation"]["organ_temperature_fitted"] == 4.0
    assert record["validation"]["organ_ece"] == record["validation"]["organ_ece_uncalibrated"]
    assert "T = 1" in record["notes"]["organ"] and "did not lower the validation ECE" in record["notes"]["organ"]


def test_calibration_records_the_validation_scores_runs_are_compared_by():
    from multitask import calibration

    organ = np.array([[3.0, 0, 0], [0, 2, 0], [0, 0, 1], [2, 1, 0], [0, 0, 5]])  # argmax 0, 1, 2, 0, 2
    organ_labels = np.array([0, 1, 2, 1, 1])
    cancer = np.array([[0.0, 1], [2, 0], [0, 3], [1, 0], [0, 0.5]])  # P(Malignant) rises with the 2nd logit
    cancer_labels = np.array([1, 0, 1, 0, 0])
    record = calibration.fit_calibration({"organ": organ, "cancer": cancer},
                                         {"organ": organ_labels, "cancer": cancer_labels},
                                         tasks=("organ", "cancer"), target_sensitivity=0.95,
                                         organ_labels=("A", "B", "C"))["validation"]
    assert record["organ_accuracy"] == pytest.approx(3 / 5)
    assert record["organ_balanced_accuracy"] == pytest.approx((1 + 1 / 3 + 1) / 3)
    assert record["organ_balanced_accuracy"] == pytest.approx(balanced_accuracy_score(organ_labels, [0, 1, 2, 0, 2]))
    assert record["cancer_roc_auc"] == pytest.approx(roc_auc_score(cancer_labels, cancer[:, 1] - cancer[:, 0])) == 1.0
    one_class = calibration.validation_scores({"cancer": cancer[:2]}, {"cancer": np.array([0, 0])}, tasks=("cancer",))
    assert one_class == {"cancer_roc_auc": None}


def test_fit_temperature_returns_one_when_there_is_nothing_to_fit(caplog):
    logits, labels = overconfident_logits(100, factor=3.0)
    with caplog.at_level(logging.WARNING, logger="multitask.calibration"):
        assert fit_temperature(logits[:5], labels[:5]) == 1.0
        assert fit_temperature(logits, np.zeros(100, int)) == 1.0
    assert "temperature scaling skipped" in caplog.text
    with pytest.raises(ValueError, match="label ids"):
        fit_temperature(logits, np.full(100, 5))


# ----------------------------------------------------------------------------------------------- calibration


def test_ece_of_calibrated_probabilities_is_small():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet([1.0, 1.0, 1.0], size=20_000)
    assert expected_calibration_error(probs, sample_labels(probs, rng)) < 0.02


def test_ece_of_an_always_certain_model_is_its_error_rate():
    labels = np.array([0, 1, 2] * 100)
    predicted = labels.copy()
    predicted[:90] = (labels[:90] + 1) % 3  # 30% wrong, all at confidence 1.0
    probs = np.eye(3)[predicted]
    assert expected_calibration_error(probs, labels) == pytest.approx(0.30)


def test_reliability_table_bins_by_top_confidence():
    # Confidences 0.95 (right), 0.95 (wrong), 0.55 (right), 1.0 (right): bins (0.533, 0.6], (0.933, 1.0].
    p_first = np.array([0.95, 0.95, 0.55, 1.0])
    probs = np.stack([p_first, 1 - p_first], axis=1)
    labels = [0, 1, 0, 0]
    table = reliability_table(probs, labels)
    assert len(table) == 15 and table["count"].sum() == 4
    assert table["count"].tolist() == [0] * 8 + [1] + [0] * 5 + [3]
    assert table.loc[14, "confidence"] == pytest.approx((0.95 + 0.95 + 1.0) / 3)
    assert table.loc[14, "accuracy"] == pytest.approx(2 / 3) and table.loc[8, "accuracy"] == 1.0
    assert np.isnan(table.loc[0, "accuracy"])
    expected = (3 * abs(2 / 3 - 2.9 / 3) + 1 * abs(1 - 0.55)) / 4
    assert expected_calibration_error(probs, labels) == pytest.approx(expected)
    # Bins are right-closed, (lo, hi] as in Guo et al.: a confidence of exactly 0.6 = 9/15 falls in bin 8.
    assert reliability_table([[0.6, 0.4]], [0])["count"].tolist()[8] == 1


def test_reliability_figure_draws_each_table_and_the_diagonal(tmp_path):
    logits, labels = overconfident_logits(500, factor=3.0)
    tables = {"uncalibrated": reliability_table(softmax(logits), labels),
              "calibrated": reliability_table(softmax(logits, 3.0), labels)}
    fig = reliability_figure(tables, title="organ")
    curve, counts = fig.axes
    assert len(curve.lines) == 3  # diagonal + two curves
    legend = [text.get_text() for text in curve.get_legend().get_texts()]
    assert legend[1].startswith("uncalibrated (ECE 0.") and legend[2].startswith("calibrated (ECE 0.")
    assert len(counts.patches) == 30
    fig.savefig(tmp_path / "reliability.png")
    assert (tmp_path / "reliability.png").stat().st_size > 1000


def test_brier_score_binary_matches_sklearn_and_multiclass_matches_hand_values():
    assert brier_score(np.eye(3)[[0, 2, 1]], [0, 2, 1]) == 0.0
    assert brier_score(np.full((4, 2), 0.5), [0, 1, 1, 0]) == pytest.approx(0.25)
    rng = np.random.default_rng(0)
    p_malignant = rng.random(200)
    malignant = rng.random(200) < 0.6
    probs = np.stack([1 - p_malignant, p_malignant], axis=1)
    assert brier_score(probs, malignant) == pytest.approx(brier_score_loss(malignant, p_malignant))
    # (0.7-1)^2 + 0.2^2 + 0.1^2 = 0.14 and 0.2^2 + (0.5-1)^2 + 0.3^2 = 0.38
    assert brier_score([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3]], [0, 1]) == pytest.approx((0.14 + 0.38) / 2)


# ----------------------------------------------------------------------------------------------- operating point

# Positives 0.9 0.8 0.7 0.6 0.3, negatives 0.5 0.4 0.2: the first four positives form one vertical ROC segment.
SCORES = np.array([0.9, 0.8, 0.7, 0.6, 0.3, 0.5, 0.4, 0.2])
POSITIVE = np.array([1, 1, 1, 1, 1, 0, 0, 0], bool)


@pytest.mark.parametrize(("target", "expected"), [(0.8, 0.6), (0.5, 0.7), (0.95, 0.3), (1.0, 0.3), (0.2, 0.9)])
def test_choose_threshold_is_the_highest_reaching_the_target(target, expected):
    threshold = choose_threshold(SCORES, POSITIVE, target_sensitivity=target)
    assert threshold == expected
    assert sensitivity_specificity(SCORES, POSITIVE, threshold)[0] >= target
    next_higher = SCORES[threshold < SCORES].min(initial=np.inf)
    if np.isfinite(next_higher):
        assert sensitivity_specificity(SCORES, POSITIVE, next_higher)[0] < target


def test_choose_threshold_rejects_impossible_requests():
    with pytest.raises(DataError, match="none of the 3 images is positive"):
        choose_threshold([0.1, 0.5, 0.9], [0, 0, 0])
    with pytest.raises(ConfigError, match="target sensitivity"):
        choose_threshold(SCORES, POSITIVE, target_sensitivity=0.0)
    assert choose_threshold([0.4, 0.7], [1, 1], target_sensitivity=1.0) == 0.4  # no negatives: still defined


def test_sensitivity_specificity_at_a_threshold():
    assert sensitivity_specificity(SCORES, POSITIVE, 0.41) == pytest.approx((4 / 5, 2 / 3))
    assert sensitivity_specificity(SCORES, POSITIVE, 0.4) == pytest.approx((4 / 5, 1 / 3))  # p >= t is positive
    assert sensitivity_specificity([0.2, 0.8], [0, 0], 0.5) == (None, 0.5)


def test_thresholds_by_group_fall_back_to_the_global_one_for_small_groups():
    rng = np.random.default_rng(0)
    truth = np.tile([True, False], 60)
    groups = np.repeat(["Lung", "Brain", "Mouth"], [60, 50, 10])
    scores = np.where(truth, 0.6, 0.2) + rng.uniform(-0.1, 0.1, 120)
    scores[groups == "Brain"] += 0.3  # Brain's scores run higher, so its own threshold is higher
    table = choose_thresholds_by_group(scores, truth, groups, target_sensitivity=0.9, min_per_class=10)
    overall = choose_threshold(scores, truth, target_sensitivity=0.9)
    assert table.loc["Mouth"].to_dict() == {"n_positive": 5, "n_negative": 5, "threshold": overall, "own": False}
    assert table.loc["Lung", "own"] and table.loc["Brain", "own"]
    assert table.loc["Brain", "threshold"] > table.loc["Lung", "threshold"] + 0.2
    for organ in ("Lung", "Brain"):
        rows = groups == organ
        assert sensitivity_specificity(scores[rows], truth[rows], table.loc[organ, "threshold"])[0] >= 0.9


# ----------------------------------------------------------------------------------------------- intervals


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_classification_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    y_true = rng.choice([0, 1, 2, 4, 5, 6, 7, 8], size=300)  # class 3 never true
    probs = rng.dirichlet(np.ones(9), size=300)
    m = classification_metrics(y_true, probs)
    predicted = probs.argmax(axis=1)
    assert m["accuracy"] == pytest.approx(np.mean(predicted == y_true))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y_true, predicted))
    assert m["macro_f1"] == pytest.approx(f1_score(y_true, predicted, average="macro"))
    assert m["ece"] == expected_calibration_error(probs, y_true)
    assert m["brier"] == pytest.approx(brier_score(probs, y_true), rel=1e-12)  # a weighted sum vs a mean
    assert set(m) == {"accuracy", "balanced_accuracy", "macro_f1", "ece", "brier"}

    malignant = rng.random(300) < 0.6
    p_malignant = np.round(np.clip(malignant * 0.3 + rng.random(300) * 0.7, 0, 1), 2)  # ties on purpose
    binary = np.stack([1 - p_malignant, p_malignant], axis=1)
    m = classification_metrics(malignant, binary, threshold=0.4)
    assert m["roc_auc"] == pytest.approx(roc_auc_score(malignant, p_malignant))
    assert (m["sensitivity"], m["specificity"]) == pytest.approx(sensitivity_specificity(p_malignant, malignant, 0.4))
    assert m["accuracy"] == pytest.approx(np.mean((p_malignant >= 0.4) == malignant))
    assert m["roc_auc"] == classification_metrics(malignant, binary)["roc_auc"]  # the threshold moves decisions only
    benign_as_positive = classification_metrics(~malignant, binary[:, ::-1], positive=0, threshold=0.4)
    assert benign_as_positive["sensitivity"] == m["sensitivity"]
    only_malignant = classification_metrics(np.ones(300, int), binary)
    assert only_malignant["roc_auc"] is None and only_malignant["specificity"] is None


def test_stratified_indices_keep_every_stratum_and_its_size():
    strata = np.array(["Benign"] * 7 + ["Malignant"] * 13 + ["Benign"] * 5)
    indices = stratified_indices(strata, n_resamples=50, rng=np.random.default_rng(0))
    assert indices.shape == (50, 25)
    for row in indices:
        assert (strata[row] == "Benign").sum() == 12 and (strata[row] == "Malignant").sum() == 13
    assert len(np.unique(indices)) == 25  # every image is drawn somewhere
    assert any(len(np.unique(row)) < 25 for row in indices)  # with replacement


def bernoulli_accuracy(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels and probabilities of a two-class model that is right 80% of the time."""
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 2, n)
    right = rng.random(n) < 0.8
    predicted = np.where(right, y_true, 1 - y_true)
    return y_true, np.eye(2)[predicted] * 0.6 + 0.2


def test_bootstrap_intervals_contain_the_estimate_shrink_with_n_and_repeat():
    y_true, probs = bernoulli_accuracy(200, seed=0)
    small = classification_intervals(y_true, probs, seed=0)
    for name, value in classification_metrics(y_true, probs).items():
        lo, hi = small[name]
        assert lo <= value <= hi, name
    assert small == classification_intervals(y_true, probs, seed=0)
    assert small != classification_intervals(y_true, probs, seed=1)
    large = classification_intervals(*bernoulli_accuracy(3200, seed=1), seed=0)
    ratio = np.diff(small["accuracy"])[0] / np.diff(large["accuracy"])[0]
    assert 3.0 < ratio < 5.5  # sqrt(3200 / 200) = 4
    assert 0.08 < np.diff(small["accuracy"])[0] < 0.14  # 2 * 1.96 * sqrt(0.8 * 0.2 / 200) = 0.111


@pytest.mark.parametrize("threshold", [None, 0.3])
def test_vectorised_intervals_equal_the_loop_over_resamples(threshold):
    rng = np.random.default_rng(0)
    malignant = rng.random(150) < 0.6
    p_malignant = np.round(np.clip(malignant * 0.3 + rng.random(150) * 0.7, 0, 1), 2)  # ties on purpose
    probs = np.stack([1 - p_malignant, p_malignant], axis=1)
    organs = rng.integers(0, 3, 150)  # strata other than the class, too
    loop = bootstrap_intervals(partial(classification_metrics, threshold=threshold), malignant, probs,
                               strata=organs * 2 + malignant, n_resamples=300, seed=3)
    vectorised = classification_intervals(malignant, probs, threshold=threshold, strata=organs * 2 + malignant,
                                          n_resamples=300, seed=3)
    assert loop.keys() == vectorised.keys() == classification_metrics(malignant, probs).keys()
    for name in loop:
        assert vectorised[name] == pytest.approx(loop[name], abs=1e-12), name


def test_bootstrap_intervals_are_paired_across_metrics_and_columns():
    y_true, probs = bernoulli_accuracy(300, seed=0)
    _, other = bernoulli_accuracy(300, seed=1)

    def difference(y, p, q):  # a paired difference is only as wide as its own spread if both see one resample
        return {"a": float(np.mean(p.argmax(1) == y)), "a_minus_a": float(np.mean(p.argmax(1) == y))
                - float(np.mean(p.argmax(1) == y)), "b": float(np.mean(q.argmax(1) == y))}

    intervals = bootstrap_intervals(difference, y_true, probs, other, n_resamples=200)
    assert intervals["a_minus_a"] == [0.0, 0.0]
    by_name = bootstrap_intervals({"a": lambda y, p, q: difference(y, p, q)["a"]}, y_true, probs, other,
                                  n_resamples=200)
    assert by_name["a"] == intervals["a"]  # a mapping of functions draws the same resamples


def test_bootstrap_intervals_skip_metrics_undefined_on_most_resamples():
    y_true = np.array([0] * 40 + [1] * 2)
    strata = np.zeros(42)  # unstratified: most resamples drop one of the two positives... or both
    fns = {"mean": lambda y: float(y.mean()), "always_none": lambda y: None,
           "positives_all_kept": lambda y: 1.0 if y.sum() == 2 else None}
    intervals = bootstrap_intervals(fns, y_true, strata=strata, n_resamples=200)
    assert intervals["always_none"] is None and intervals["positives_all_kept"] is None
    assert intervals["mean"][0] == 0.0
    stratified = bootstrap_intervals(fns, y_true, n_resamples=200)  # by class: the two positives stay two
    assert stratified["positives_all_kept"] == [1.0, 1.0] and stratified["mean"] == [2 / 42, 2 / 42]


def test_format_interval():
    assert format_interval(0.97, 0.955, 0.9824) == "0.970 (0.955-0.982)"
    assert format_interval(0.5) == "0.500"
    assert format_interval(None, 0.1, 0.2) == "n/a"
