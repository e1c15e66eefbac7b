"""Metrics from scores (scikit-learn) and from the score histograms that test sites share."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from sklearn.calibration import calibration_curve
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    brier_score_loss,
    recall_score,
    roc_auc_score,
    roc_curve,
)

from psp_model.evaluate.metrics import (
    N_BINS,
    calibration_from_histograms,
    delong_auc_ci,
    metrics_from_histograms,
    metrics_from_scores,
    roc_from_histograms,
    score_histograms,
)


def test_pooled_auc_from_site_histograms_equals_the_auc_of_pooled_scores() -> None:
    rng = np.random.default_rng(0)
    # scores on the bin grid: no two cases of different classes can share a bin without sharing a score
    sites = [(rng.integers(0, N_BINS, n) / N_BINS, rng.integers(0, 2, n)) for n in (23, 41, 9)]
    pooled_hist = sum(score_histograms(s, y) for s, y in sites)
    scores = np.concatenate([s for s, _ in sites])
    labels = np.concatenate([y for _, y in sites])
    from_aggregates = metrics_from_histograms(pooled_hist)
    assert from_aggregates["auc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    direct = metrics_from_scores(scores, labels)
    for key in ("accuracy", "sensitivity", "specificity", "balanced_accuracy"):
        assert from_aggregates[key] == pytest.approx(direct[key], abs=1e-12), key


def test_scores_match_scikit_learn() -> None:
    labels = np.array([0, 0, 1, 1, 1, 0])
    scores = np.array([0.1, 0.6, 0.7, 0.4, 0.9, 0.2])
    metrics = metrics_from_scores(scores, labels)
    assert metrics["auc"] == pytest.approx(roc_auc_score(labels, scores))
    assert metrics["sensitivity"] == pytest.approx(2 / 3) and metrics["specificity"] == pytest.approx(2 / 3)
    assert metrics["brier"] == pytest.approx(np.mean((scores - labels) ** 2))


def test_a_single_class_site_is_flagged_not_averaged() -> None:
    metrics = metrics_from_histograms(score_histograms(np.array([0.2, 0.8]), np.array([1, 1])))
    assert metrics["defined"] == 0.0 and math.isnan(metrics["auc"]) and math.isnan(metrics["specificity"])
    assert metrics["n_pos"] == 2 and metrics["sensitivity"] == 0.5


@pytest.mark.parametrize(("scores", "labels", "message"), [
    (np.array([0.2, 1.2]), np.array([0, 1]), "probabilities in"),
    (np.array([0.2, 0.3]), np.array([0, 2]), "labels must be 0"),
    (np.array([0.2]), np.array([0, 1]), "same length"),
])
def test_histograms_reject_bad_input(scores, labels, message) -> None:
    with pytest.raises(ValueError, match=message):
        score_histograms(scores, labels)


# --- confidence intervals, ROC and calibration -------------------------------------------------------

CI_METRICS = ("auc", "accuracy", "sensitivity", "specificity", "balanced_accuracy")


def _grid_cases(seed: int, n: int = 60) -> tuple[np.ndarray, np.ndarray]:
    """Scores on the bin grid (cases sharing a bin share a score), labels informative about them."""
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, N_BINS, n) / N_BINS
    labels = (rng.random(n) < 0.2 + 0.6 * scores).astype(int)
    return scores, labels


def _textbook_delong(scores: np.ndarray, labels: np.ndarray, level: float = 0.95) -> tuple[float, float, float]:
    """DeLong, DeLong & Clarke-Pearson (1988) with the O(m n) kernel psi = 1, 1/2, 0."""
    x, y = scores[labels == 1], scores[labels == 0]
    psi = (x[:, None] > y[None, :]) + 0.5 * (x[:, None] == y[None, :])
    auc = psi.mean()
    v10, v01 = psi.mean(axis=1), psi.mean(axis=0)
    variance = v10.var(ddof=1) / x.size + v01.var(ddof=1) / y.size
    z = stats.norm.ppf(0.5 + level / 2)
    return auc, max(auc - z * np.sqrt(variance), 0.0), min(auc + z * np.sqrt(variance), 1.0)


@pytest.mark.parametrize("seed", range(5))
def test_every_metric_matches_scikit_learn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    scores = rng.random(80)
    labels = (rng.random(80) < scores).astype(int)
    predicted = (scores >= 0.5).astype(int)
    expected = {
        "auc": roc_auc_score(labels, scores),
        "accuracy": accuracy_score(labels, predicted),
        "sensitivity": recall_score(labels, predicted, pos_label=1),
        "specificity": recall_score(labels, predicted, pos_label=0),
        "balanced_accuracy": balanced_accuracy_score(labels, predicted),
        "brier": brier_score_loss(labels, scores),
    }
    from_scores = metrics_from_scores(scores, labels)
    grid = np.floor(scores * N_BINS) / N_BINS  # what a histogram keeps; the same predictions at 0.5
    from_hist = metrics_from_histograms(score_histograms(scores, labels), brier_sum=float(((scores - labels) ** 2).sum()))
    for key, value in expected.items():
        assert from_scores[key] == pytest.approx(value, abs=1e-12), key
        if key != "auc":
            assert from_hist[key] == pytest.approx(value, abs=1e-12), key
    assert from_hist["auc"] == pytest.approx(roc_auc_score(labels, grid), abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_histograms_and_scores_agree_on_every_key_when_bins_hold_one_score(seed: int) -> None:
    scores, labels = _grid_cases(seed)
    from_scores = metrics_from_scores(scores, labels)
    from_hist = metrics_from_histograms(score_histograms(scores, labels),
                                        brier_sum=float(((scores - labels) ** 2).sum()))
    assert set(from_scores) == set(from_hist)
    for name in CI_METRICS:
        assert {f"{name}_ci_low", f"{name}_ci_high"} <= set(from_hist)
    for key, value in from_scores.items():
        assert from_hist[key] == pytest.approx(value, abs=1e-12), key


@pytest.mark.parametrize("seed", range(5))
def test_delong_interval_equals_the_textbook_one_on_raw_scores(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 70)
    # continuous scores, PsP cases only in even bins and TP cases only in odd ones: bins separate classes
    bins = 2 * rng.integers(0, N_BINS // 2, 70) + labels
    bins = np.where(labels == 1, np.maximum(bins, 2 * rng.integers(0, N_BINS // 2, 70) + 1), bins)  # informative
    scores = (bins + rng.uniform(0.1, 0.9, 70)) / N_BINS
    auc, low, high = _textbook_delong(scores, labels)
    hist = score_histograms(scores, labels)
    assert not (hist[0] > 0)[hist[1] > 0].any()
    assert delong_auc_ci(hist) == pytest.approx((low, high), abs=1e-12)
    from_scores = metrics_from_scores(scores, labels)
    assert (from_scores["auc"], from_scores["auc_ci_low"], from_scores["auc_ci_high"]) == pytest.approx(
        (auc, low, high), abs=1e-12)


def test_delong_interval_handles_ties_like_the_textbook_kernel() -> None:
    scores, labels = _grid_cases(3, n=200)
    scores = np.round(scores, 1)  # many ties across classes
    distinct, column = np.unique(scores, return_inverse=True)
    hist = np.zeros((2, distinct.size))
    np.add.at(hist, (labels, column), 1)
    _, low, high = _textbook_delong(scores, labels, level=0.9)
    assert delong_auc_ci(hist, level=0.9) == pytest.approx((low, high), abs=1e-12)


def test_delong_interval_covers_the_true_auc_about_95_percent_of_the_time() -> None:
    rng = np.random.default_rng(2024)
    shift = 1.0
    true_auc = stats.norm.cdf(shift / np.sqrt(2))  # binormal, unit variances
    repeats, covered = 300, 0
    for _ in range(repeats):
        latent = np.concatenate([rng.normal(0, 1, 30), rng.normal(shift, 1, 30)])
        labels = np.repeat([0, 1], 30)
        scores = 1 / (1 + np.exp(-latent))  # monotone: same AUC, scores in [0, 1]
        low, high = delong_auc_ci(score_histograms(scores, labels))
        covered += low <= true_auc <= high
    assert 0.88 <= covered / repeats <= 0.99


def test_proportion_intervals_are_scipy_wilson_and_balanced_accuracy_combines_them() -> None:
    scores, labels = _grid_cases(7, n=45)
    metrics = metrics_from_histograms(score_histograms(scores, labels), level=0.9)
    tp = int(((scores >= 0.5) & (labels == 1)).sum())
    tn = int(((scores < 0.5) & (labels == 0)).sum())
    n_pos, n_neg = int(labels.sum()), int((1 - labels).sum())
    for name, k, n in (("sensitivity", tp, n_pos), ("specificity", tn, n_neg), ("accuracy", tp + tn, n_pos + n_neg)):
        ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.9, method="wilson")
        assert (metrics[f"{name}_ci_low"], metrics[f"{name}_ci_high"]) == pytest.approx((ci.low, ci.high)), name
        assert metrics[f"{name}_ci_low"] <= metrics[name] <= metrics[f"{name}_ci_high"]
    se, sp = metrics["sensitivity"], metrics["specificity"]
    lower = np.hypot(se - metrics["sensitivity_ci_low"], sp - metrics["specificity_ci_low"]) / 2
    assert metrics["balanced_accuracy_ci_low"] == pytest.approx(metrics["balanced_accuracy"] - lower)
    assert 0 <= metrics["balanced_accuracy_ci_low"] < metrics["balanced_accuracy"] < metrics["balanced_accuracy_ci_high"] <= 1


def test_a_perfect_classifier_keeps_a_balanced_accuracy_interval_and_a_clipped_auc_one() -> None:
    metrics = metrics_from_scores(np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9]), np.array([0, 0, 0, 1, 1, 1]))
    assert metrics["balanced_accuracy"] == 1.0 and metrics["balanced_accuracy_ci_high"] == pytest.approx(1.0)
    assert metrics["balanced_accuracy_ci_low"] < 0.8  # three cases per class prove little
    assert (metrics["auc_ci_low"], metrics["auc_ci_high"]) == (1.0, 1.0)  # DeLong has no variance here


def test_undefined_metrics_and_intervals_are_nan_never_zero() -> None:
    one_class = metrics_from_histograms(score_histograms(np.array([0.2, 0.8, 0.9]), np.array([1, 1, 1])))
    for key in ("auc", "auc_ci_low", "specificity", "specificity_ci_high", "balanced_accuracy",
                "balanced_accuracy_ci_low", "brier"):
        assert math.isnan(one_class[key]), key
    assert one_class["sensitivity_ci_low"] > 0 and one_class["accuracy_ci_high"] <= 1
    one_each = metrics_from_histograms(score_histograms(np.array([0.2, 0.8]), np.array([0, 1])))
    assert one_each["auc"] == 1.0 and math.isnan(one_each["auc_ci_low"]) and math.isnan(one_each["auc_ci_high"])
    empty = metrics_from_histograms(np.zeros((2, N_BINS)), brier_sum=0.0)
    assert empty["n_pos"] == empty["n_neg"] == 0 and empty["defined"] == 0
    assert all(math.isnan(empty[key]) for key in empty if key not in ("n_pos", "n_neg", "defined"))
    single = metrics_from_scores(np.array([0.2, 0.7]), np.array([0, 0]))
    assert math.isnan(single["auc_ci_low"]) and math.isnan(single["sensitivity_ci_low"])


def test_roc_points_match_scikit_learn_and_enclose_the_auc() -> None:
    scores, labels = _grid_cases(11)
    fpr, tpr = roc_from_histograms(score_histograms(scores, labels))
    expected_fpr, expected_tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, expected_fpr, atol=1e-12)
    np.testing.assert_allclose(tpr, expected_tpr, atol=1e-12)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert np.trapezoid(tpr, fpr) == pytest.approx(metrics_from_scores(scores, labels)["auc"], abs=1e-12)


def test_calibration_matches_scikit_learn_on_bin_midpoints() -> None:
    rng = np.random.default_rng(5)
    scores = (rng.integers(0, N_BINS, 300) + 0.5) / N_BINS
    labels = (rng.random(300) < scores**2).astype(int)
    mean_predicted, fraction_tp, counts = calibration_from_histograms(score_histograms(scores, labels), n_bins=8)
    expected_fraction, expected_mean = calibration_curve(labels, scores, n_bins=8)
    np.testing.assert_allclose(mean_predicted, expected_mean, atol=1e-12)
    np.testing.assert_allclose(fraction_tp, expected_fraction, atol=1e-12)
    assert counts.sum() == 300 and np.all(counts > 0)


def test_calibration_drops_empty_bins() -> None:
    hist = score_histograms(np.array([0.05, 0.06, 0.95]), np.array([0, 1, 1]))
    mean_predicted, fraction_tp, counts = calibration_from_histograms(hist)
    assert counts.tolist() == [2, 1] and fraction_tp.tolist() == [0.5, 1.0]
    assert mean_predicted == pytest.approx([0.0555, 0.9505])


@pytest.mark.parametrize(("call", "message"), [
    (lambda: metrics_from_histograms(np.zeros((3, 10))), r"\(2, n_bins\).*got shape \(3, 10\)"),
    (lambda: metrics_from_histograms(None), r"got shape \(\)"),
    (lambda: delong_auc_ci(-np.ones((2, 4))), "non-negative counts"),
    (lambda: delong_auc_ci(np.ones((2, 4)), level=95), "level must be in"),
    (lambda: roc_from_histograms(np.array([[0, 0], [1, 2]])), "needs both classes, got 0 PsP and 3 TP"),
    (lambda: calibration_from_histograms(np.ones((2, 4)), n_bins=0), "n_bins must be a positive integer"),
])
def test_histogram_functions_reject_bad_input(call, message) -> None:
    with pytest.raises(ValueError, match=message):
        call()
