"""Metrics from scores (scikit-learn) and from the score histograms that test sites share."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from psp_model.evaluate.metrics import N_BINS, metrics_from_histograms, metrics_from_scores, score_histograms


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
