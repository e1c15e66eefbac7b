"""Classification metrics, computed either from scores or from what sites may share: score histograms.

A test site never ships per-patient predictions; it sends, per class, how many of its cases fall in
each of ``N_BINS`` equal score bins on [0, 1]. Summing histograms over sites gives the pooled ROC.
Ties across classes inside one bin count one half (as ``roc_auc_score`` counts equal scores), so the
AUC from histograms equals the exact AUC whenever no two cases of different classes share a bin.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, balanced_accuracy_score, brier_score_loss, recall_score, roc_auc_score

N_BINS = 1000


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


def metrics_from_histograms(hist: np.ndarray, *, threshold: float = 0.5) -> dict[str, float]:
    """AUC, accuracy, sensitivity, specificity, balanced accuracy at ``threshold`` from ``(2, n_bins)`` counts.

    A class with no case leaves AUC/sensitivity or specificity undefined: they are NaN and
    ``defined`` is 0 — counts are always reported so a reader can tell why.
    """
    hist = np.asarray(hist, dtype=float)
    negatives, positives = hist[0], hist[1]
    n_neg, n_pos = negatives.sum(), positives.sum()
    n_bins = hist.shape[1]
    cut = int(np.ceil(threshold * n_bins - 1e-9))
    tp, tn = positives[cut:].sum(), negatives[:cut].sum()
    defined = n_pos > 0 and n_neg > 0
    if defined:
        below = np.concatenate([[0.0], np.cumsum(negatives)[:-1]])
        auc = float((positives * (below + 0.5 * negatives)).sum() / (n_pos * n_neg))
    else:
        auc = float("nan")
    sensitivity = tp / n_pos if n_pos else float("nan")
    specificity = tn / n_neg if n_neg else float("nan")
    return {
        "auc": auc,
        "accuracy": float((tp + tn) / (n_pos + n_neg)) if n_pos + n_neg else float("nan"),
        "sensitivity": float(sensitivity),
        "specificity": float(specificity),
        "balanced_accuracy": float((sensitivity + specificity) / 2) if defined else float("nan"),
        "n_pos": float(n_pos),
        "n_neg": float(n_neg),
        "defined": float(defined),
    }


def metrics_from_scores(scores: np.ndarray, labels: np.ndarray, *, threshold: float = 0.5) -> dict[str, float]:
    """The same metrics from per-case scores (where they are allowed: inside one site), via scikit-learn."""
    scores = np.asarray(scores, dtype=float)
    labels = np.asarray(labels).astype(int)
    predicted = (scores >= threshold).astype(int)
    n_pos, n_neg = int(labels.sum()), int((1 - labels).sum())
    defined = n_pos > 0 and n_neg > 0
    return {
        "auc": float(roc_auc_score(labels, scores)) if defined else float("nan"),
        "accuracy": float(accuracy_score(labels, predicted)),
        "sensitivity": float(recall_score(labels, predicted, pos_label=1, zero_division=np.nan)),
        "specificity": float(recall_score(labels, predicted, pos_label=0, zero_division=np.nan)),
        "balanced_accuracy": float(balanced_accuracy_score(labels, predicted)) if defined else float("nan"),
        "brier": float(brier_score_loss(labels, scores)),
        "n_pos": float(n_pos),
        "n_neg": float(n_neg),
        "defined": float(defined),
    }
