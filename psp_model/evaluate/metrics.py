"""Classification metrics, computed either from scores or from what sites may share: score histograms.

A test site never ships per-patient predictions; it sends, per class, how many of its cases fall in
each of ``N_BINS`` equal score bins on [0, 1]. Summing histograms over sites gives the pooled ROC.
Ties across classes inside one bin count one half (as ``roc_auc_score`` counts equal scores), so the
AUC from histograms (and its DeLong interval) equals the exact one whenever no two cases of different
classes share a bin.

Every metric comes with a confidence interval (keys ``<metric>_ci_low`` / ``<metric>_ci_high``); a
metric or interval the data cannot define (a class with no case, too few cases) is NaN, never 0.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import binomtest, norm
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    brier_score_loss,
    confusion_matrix,
    recall_score,
    roc_auc_score,
)

__all__ = [
    "N_BINS",
    "calibration_from_histograms",
    "delong_auc_ci",
    "metrics_from_histograms",
    "metrics_from_scores",
    "roc_from_histograms",
    "score_histograms",
    "wilson_ci",
]

N_BINS = 1000
NAN = float("nan")


def score_histograms(scores: np.ndarray, labels: np.ndarray, *, n_bins: int = N_BINS) -> np.ndarray:
    """Counts per class and score bin, shape ``(2, n_bins)``: row 0 PsP (label 0), row 1 TP (label 1)."""
    scores = np.asarray(scores, dtype=float)
    labels = np.asarray(labels).astype(int)
    if scores.shape != labels.shape or scores.ndim != 1:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} must be 1-D and the same length")
    if np.any((scores < 0) | (scores > 1)) or not np.all(np.isfinite(scores)):
        raise ValueError("scores must be probabilities in [0, 1]")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"labels must be 0 (PsP) or 1 (TP), got {sorted(set(labels.tolist()))}")
    bins = np.minimum((scores * n_bins).astype(int), n_bins - 1)
    hist = np.zeros((2, n_bins), dtype=np.int64)
    np.add.at(hist, (labels, bins), 1)
    return hist


def delong_auc_ci(hist: np.ndarray, *, level: float = 0.95) -> tuple[float, float]:
    """DeLong normal interval for the AUC of ``(2, n_bins)`` counts whose columns are ordered by score.

    Placement values are per bin: a TP case's is the fraction of PsP cases below its bin plus half of
    those inside it (and symmetrically for PsP cases), so on raw scores (one column per distinct score)
    this is DeLong et al., Biometrics 1988. The interval is clipped to [0, 1]; it is NaN when either
    class has fewer than two cases (no variance), and zero-width for a perfect separation.
    """
    hist = _check_hist(hist)
    _check_level(level)
    negatives, positives = hist
    n_neg, n_pos = negatives.sum(), positives.sum()
    if n_neg < 2 or n_pos < 2:
        return NAN, NAN
    neg_below = np.cumsum(negatives) - negatives
    pos_above = n_pos - np.cumsum(positives)
    v10 = (neg_below + 0.5 * negatives) / n_neg  # for each TP case in the bin
    v01 = (pos_above + 0.5 * positives) / n_pos  # for each PsP case in the bin
    auc = (positives * v10).sum() / n_pos
    s10 = (positives * (v10 - auc) ** 2).sum() / (n_pos - 1)
    s01 = (negatives * (v01 - auc) ** 2).sum() / (n_neg - 1)
    half = norm.ppf(0.5 + level / 2) * math.sqrt(s10 / n_pos + s01 / n_neg)
    return float(max(auc - half, 0.0)), float(min(auc + half, 1.0))


def wilson_ci(successes: int, trials: int, *, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion (scipy's), NaN when there is no trial."""
    _check_level(level)
    if trials == 0:
        return NAN, NAN
    ci = binomtest(int(successes), int(trials)).proportion_ci(confidence_level=level, method="wilson")
    return float(ci.low), float(ci.high)


def metrics_from_histograms(hist: np.ndarray, *, threshold: float = 0.5, brier_sum: float | None = None,
                            level: float = 0.95) -> dict[str, float]:
    """AUC, accuracy, sensitivity, specificity, balanced accuracy at ``threshold``, with ``level`` CIs.

    ``hist`` is ``(2, n_bins)`` counts over equal score bins on [0, 1]; a score counts as TP when
    ``score >= threshold``. ``brier_sum`` is the sites' summed ``(p - y) ** 2``; ``brier`` is NaN
    without it. A class with no case leaves AUC/sensitivity or specificity undefined: they are NaN
    and ``defined`` is 0 — counts are always reported so a reader can tell why.
    """
    hist = _check_hist(hist)
    negatives, positives = hist
    n_neg, n_pos = negatives.sum(), positives.sum()
    cut = int(np.ceil(threshold * hist.shape[1] - 1e-9))
    tp, tn = positives[cut:].sum(), negatives[:cut].sum()
    defined = n_pos > 0 and n_neg > 0
    if defined:
        below = np.cumsum(negatives) - negatives
        auc = float((positives * (below + 0.5 * negatives)).sum() / (n_pos * n_neg))
    else:
        auc = NAN
    sensitivity = tp / n_pos if n_pos else NAN
    specificity = tn / n_neg if n_neg else NAN
    n = n_pos + n_neg
    point = {
        "auc": auc,
        "accuracy": float((tp + tn) / n) if n else NAN,
        "sensitivity": float(sensitivity),
        "specificity": float(specificity),
        "balanced_accuracy": float((sensitivity + specificity) / 2) if defined else NAN,
    }
    brier = NAN if brier_sum is None or not n else float(brier_sum) / n
    return _with_intervals(point, hist, tp=tp, tn=tn, level=level, brier=brier)


def metrics_from_scores(scores: np.ndarray, labels: np.ndarray, *, threshold: float = 0.5,
                        level: float = 0.95) -> dict[str, float]:
    """The same metrics and intervals from per-case scores (where they are allowed: inside one site).

    Point values come from scikit-learn; the intervals from the same code as for histograms, with one
    column per distinct score, so both agree exactly when no bin mixes classes.
    """
    scores = np.asarray(scores, dtype=float)
    labels = np.asarray(labels).astype(int)
    predicted = (scores >= threshold).astype(int)
    n_pos, n_neg = int(labels.sum()), int((1 - labels).sum())
    defined = n_pos > 0 and n_neg > 0
    point = {
        "auc": float(roc_auc_score(labels, scores)) if defined else NAN,
        "accuracy": float(accuracy_score(labels, predicted)),
        "sensitivity": float(recall_score(labels, predicted, pos_label=1, zero_division=np.nan)),
        "specificity": float(recall_score(labels, predicted, pos_label=0, zero_division=np.nan)),
        "balanced_accuracy": float(balanced_accuracy_score(labels, predicted)) if defined else NAN,
    }
    (tn, _fp), (_fn, tp) = confusion_matrix(labels, predicted, labels=[0, 1])
    distinct, column = np.unique(scores, return_inverse=True)
    hist = np.zeros((2, distinct.size), dtype=np.int64)
    np.add.at(hist, (labels, column), 1)
    brier = float(brier_score_loss(labels, scores, labels=[0, 1])) if labels.size else NAN
    return _with_intervals(point, hist, tp=tp, tn=tn, level=level, brier=brier)


def roc_from_histograms(hist: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(fpr, tpr)``, from (0, 0) to (1, 1), one point per bin holding a case, thresholds from the top.

    The trapezoid area under it equals ``metrics_from_histograms(hist)["auc"]``.
    """
    hist = _check_hist(hist)
    n_neg, n_pos = hist.sum(axis=1)
    if n_neg == 0 or n_pos == 0:
        raise ValueError(f"an ROC curve needs both classes, got {int(n_neg)} PsP and {int(n_pos)} TP cases")
    from_top = hist[:, ::-1]
    occupied = from_top[:, from_top.sum(axis=0) > 0]
    fpr = np.concatenate([[0.0], np.cumsum(occupied[0]) / n_neg])
    tpr = np.concatenate([[0.0], np.cumsum(occupied[1]) / n_pos])
    return fpr, tpr


def calibration_from_histograms(hist: np.ndarray, n_bins: int = 10
                                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reliability curve ``(mean_predicted, fraction_tp, counts)`` over ``n_bins`` equal bins on [0, 1].

    A case's predicted value is its score bin's midpoint (what a histogram keeps), so ``mean_predicted``
    matches ``sklearn.calibration.calibration_curve`` within half a score bin. Empty bins are dropped.
    """
    hist = _check_hist(hist)
    if not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    fine = hist.shape[1]
    midpoints = (np.arange(fine) + 0.5) / fine
    coarse = np.minimum((midpoints * n_bins).astype(int), n_bins - 1)
    per_bin = np.zeros((2, n_bins))
    np.add.at(per_bin, (slice(None), coarse), hist)
    weighted = np.zeros(n_bins)
    np.add.at(weighted, coarse, hist.sum(axis=0) * midpoints)
    counts = per_bin.sum(axis=0)
    keep = counts > 0
    return weighted[keep] / counts[keep], per_bin[1, keep] / counts[keep], counts[keep].astype(np.int64)


def _with_intervals(point: dict[str, float], hist: np.ndarray, *, tp: int, tn: int, level: float,
                    brier: float) -> dict[str, float]:
    """``point`` plus AUC (DeLong), Wilson and balanced-accuracy intervals, Brier score and counts.

    Balanced accuracy (sensitivity + specificity) / 2 gets the MOVER interval built from the two
    Wilson intervals (Newcombe 1998; Zou & Donner 2008): the lower half-width is
    ``sqrt((se - se_low)**2 + (sp - sp_low)**2) / 2`` (upper alike), which stays inside [0, 1] and,
    unlike the plain Wald combination, keeps a width when sensitivity or specificity is 0 or 1.
    """
    n_neg, n_pos = (int(v) for v in hist.sum(axis=1))
    tp, tn = int(tp), int(tn)
    intervals = {
        "auc": delong_auc_ci(hist, level=level),
        "accuracy": wilson_ci(tp + tn, n_pos + n_neg, level=level),
        "sensitivity": wilson_ci(tp, n_pos, level=level),
        "specificity": wilson_ci(tn, n_neg, level=level),
    }
    se, sp = point["sensitivity"], point["specificity"]
    (se_low, se_high), (sp_low, sp_high) = intervals["sensitivity"], intervals["specificity"]
    intervals["balanced_accuracy"] = (
        point["balanced_accuracy"] - math.hypot(se - se_low, sp - sp_low) / 2,
        point["balanced_accuracy"] + math.hypot(se_high - se, sp_high - sp) / 2,
    )
    result = dict(point)
    for name, (low, high) in intervals.items():
        result[f"{name}_ci_low"], result[f"{name}_ci_high"] = float(low), float(high)
    result.update({"brier": float(brier), "n_pos": float(n_pos), "n_neg": float(n_neg),
                   "defined": float(n_pos > 0 and n_neg > 0)})
    return result


def _check_hist(hist: np.ndarray) -> np.ndarray:
    array = np.asarray(hist, dtype=float)
    if array.ndim != 2 or array.shape[0] != 2 or array.shape[1] < 1:
        raise ValueError(f"hist must be a (2, n_bins) array of counts (row 0 PsP, row 1 TP), "
                         f"got shape {array.shape}")
    if not np.all(np.isfinite(array)) or np.any(array < 0):
        raise ValueError("hist must hold finite, non-negative counts")
    return array


def _check_level(level: float) -> None:
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), e.g. 0.95, got {level!r}")
