"""Figures for a run's report: ROC, calibration, feature ranking and per-round losses, as PNG files.

Everything is drawn on ``matplotlib.figure.Figure`` objects with an Agg canvas (no pyplot, so no
global figure state and no display needed) and written atomically. Curves come from the ``(2, n_bins)``
score histograms sites share (row 0 PsP, row 1 TP; see ``psp_model.evaluate.metrics``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from psp_model.evaluate.metrics import (
    calibration_from_histograms,
    metrics_from_histograms,
    roc_from_histograms,
)
from psp_model.io import atomic_write

__all__ = ["plot_calibration", "plot_feature_ranking", "plot_roc", "plot_training_curves"]

DPI = 150
STYLE = {"font.size": 10, "axes.titlesize": 12, "axes.labelsize": 10.5, "legend.fontsize": 8.5,
         "xtick.labelsize": 9, "ytick.labelsize": 9, "axes.spines.top": False, "axes.spines.right": False}
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
OTHER_PALETTE = ("#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
ENSEMBLE_COLOR = "#111111"
NAN = float("nan")
PHASES = ("ssl", "finetune")
LOSSES = {"train-loss": ("train", "-"), "val-loss": ("validation", "--")}


def plot_roc(curves: Mapping[str, np.ndarray], path: Path, *, title: str) -> Path:
    """ROC curves, one per ``label -> (2, n_bins)`` histogram, with AUC and its DeLong 95% CI in the legend.

    Labels starting with "fold" are drawn thin and light, "ensemble" bold, anything else in colour. A
    curve whose cases are all one class (a small site) has no ROC: the legend says so, with its counts.
    """
    checked = _check_curves(curves)
    with matplotlib.rc_context(STYLE):
        figure = _figure((6.0, 6.0))
        ax = figure.add_subplot()
        ax.plot([0, 1], [0, 1], linestyle="--", color="#999999", linewidth=1, label="chance")
        for label, hist, style in _styled(checked):
            n_psp, n_tp = (int(n) for n in hist.sum(axis=1))
            if n_psp == 0 or n_tp == 0:
                ax.plot([], [], label=f"{label} (no ROC: {n_psp} PsP, {n_tp} TP)", **{**style, "linestyle": ":"})
                continue
            fpr, tpr = roc_from_histograms(hist)
            ax.plot(fpr, tpr, label=f"{label} ({_auc_text(metrics_from_histograms(hist))})", **style)
        ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), aspect="equal", title=title,
               xlabel="1 − specificity (false-positive rate)", ylabel="sensitivity (true-positive rate, TP)")
        ax.grid(alpha=0.25)
        ax.legend(loc="lower right", frameon=True, framealpha=0.9, title="AUC [95% CI, DeLong]",
                  title_fontsize=8.5)
        return _save(figure, path)


def plot_calibration(curves: Mapping[str, np.ndarray], path: Path, *, title: str, n_bins: int = 10) -> Path:
    """Reliability diagram (fraction TP per bin of predicted P(TP)) over a histogram of the predictions."""
    checked = _check_curves(curves)
    with matplotlib.rc_context(STYLE):
        figure = _figure((6.0, 7.0))
        top, bottom = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": (3, 1)})
        top.plot([0, 1], [0, 1], linestyle="--", color="#999999", linewidth=1, label="perfectly calibrated")
        for label, hist, style in _styled(checked):
            mean_predicted, fraction_tp, _ = calibration_from_histograms(hist, n_bins)
            top.plot(mean_predicted, fraction_tp, marker="o", markersize=2 + style["linewidth"],
                     label=f"{label} (n = {int(hist.sum())})", **style)
            midpoints = (np.arange(hist.shape[1]) + 0.5) / hist.shape[1]
            bottom.hist(midpoints, bins=np.linspace(0, 1, n_bins + 1), weights=hist.sum(axis=0),
                        histtype="step", **{**style, "linewidth": 0.6 * style["linewidth"]})
        top.set(xlim=(0, 1), ylim=(-0.02, 1.02), title=title, ylabel="observed fraction TP")
        top.grid(alpha=0.25)
        top.legend(loc="upper left", frameon=True, framealpha=0.9)
        bottom.set(xlabel="predicted probability of TP", ylabel="cases")
        bottom.yaxis.get_major_locator().set_params(integer=True)
        bottom.grid(alpha=0.25)
        return _save(figure, path)


def plot_feature_ranking(features: Sequence[str], values: Sequence[float], path: Path, *, title: str,
                         highlight: set[str] | frozenset[str] = frozenset()) -> Path:
    """Horizontal bars of mean |SHAP| per feature, largest on top; ``highlight`` (e.g. selected) in colour."""
    features, values = list(features), np.asarray(values, dtype=float)
    if not features:
        raise ValueError("plot_feature_ranking needs at least one feature, got none")
    if values.shape != (len(features),):
        raise ValueError(f"values has shape {values.shape}, expected one per feature ({len(features)})")
    if not np.all(np.isfinite(values)) or np.any(values < 0):
        raise ValueError(f"values must be finite and non-negative (mean |SHAP|), got {values.tolist()}")
    if unknown := set(highlight) - set(features):
        raise ValueError(f"highlight names features not in the list: {sorted(unknown)}")
    order = np.argsort(values, kind="stable")  # ascending: barh draws the first at the bottom
    names = [features[i] for i in order]
    colors = [PALETTE[0] if name in highlight or not highlight else "#b0b0b0" for name in names]
    with matplotlib.rc_context(STYLE):
        figure = _figure((6.5, max(2.5, 1.3 + 0.32 * len(features))))
        ax = figure.add_subplot()
        bars = ax.barh(names, values[order], color=colors, height=0.7)
        ax.bar_label(bars, labels=[f"{v:.3g}" for v in values[order]], padding=3, fontsize=8.5)
        ax.set(title=title, xlabel="mean |SHAP value|")
        ax.set_xlim(0, values.max() * 1.15 or 1)
        ax.margins(y=0.02)
        ax.grid(axis="x", alpha=0.25)
        if highlight:
            ax.legend(handles=[Line2D([], [], color=PALETTE[0], linewidth=8, label="selected"),
                               Line2D([], [], color="#b0b0b0", linewidth=8, label="not selected")],
                      loc="lower right")
        return _save(figure, path)


def plot_training_curves(rounds: Sequence[Mapping], path: Path) -> Path:
    """Per-round federated train (solid) and validation (dashed) loss: SSL left, fine-tuning per fold right.

    ``rounds`` are ``rounds.json`` entries ``{phase, fold, round, metrics: {train-loss, val-loss}}``;
    a missing or NaN loss leaves a gap.
    """
    if not rounds:
        raise ValueError("plot_training_curves needs rounds.json entries, got none")
    series: dict[tuple[str, int | None, str], list[tuple[int, float]]] = {}
    for position, entry in enumerate(rounds):
        if not isinstance(entry, Mapping) or "phase" not in entry or "round" not in entry:
            raise ValueError(f"rounds[{position}] must be a dict with 'phase' and 'round', got {entry!r}")
        if entry["phase"] not in PHASES:
            raise ValueError(f"rounds[{position}]: phase {entry['phase']!r} is not one of {list(PHASES)}")
        metrics = entry.get("metrics") or {}
        for key in LOSSES:
            value = metrics.get(key)
            points = series.setdefault((entry["phase"], entry.get("fold"), key), [])
            points.append((int(entry["round"]), NAN if value is None else float(value)))
    with matplotlib.rc_context(STYLE):
        figure = _figure((12.0, 4.5))
        panels = dict(zip(PHASES, figure.subplots(1, 2)))
        titles = {"ssl": "self-supervised pre-training", "finetune": "fine-tuning (one line per fold)"}
        for phase, ax in panels.items():
            ax.set(title=titles[phase], xlabel="federated round", ylabel="loss")
            ax.grid(alpha=0.25)
            folds = sorted({fold for (p, fold, _) in series if p == phase}, key=lambda f: -1 if f is None else f)
            if not folds:
                ax.text(0.5, 0.5, "no rounds", transform=ax.transAxes, ha="center", va="center", color="#777777")
                ax.set(xticks=[], yticks=[])
                continue
            drawn = set()
            for index, fold in enumerate(folds):
                color = PALETTE[index % len(PALETTE)]
                for key, (_, linestyle) in LOSSES.items():
                    points = sorted(series.get((phase, fold, key), []))
                    if points and not all(math.isnan(v) for _, v in points):
                        x, y = zip(*points)
                        ax.plot(x, y, linestyle=linestyle, color=color, marker="o", markersize=2.5, linewidth=1.4)
                        drawn.add(key)
            handles = [Line2D([], [], color="#444444", linestyle=linestyle, label=name)
                       for key, (name, linestyle) in LOSSES.items() if key in drawn]
            if folds != [None]:
                handles += [Line2D([], [], color=PALETTE[i % len(PALETTE)], label=f"fold {fold}")
                            for i, fold in enumerate(folds)]
            outside = folds != [None]
            ax.legend(handles=handles, frameon=True, framealpha=0.9,
                      **({"loc": "upper left", "bbox_to_anchor": (1.01, 1.0)} if outside else {"loc": "best"}))
            ax.xaxis.get_major_locator().set_params(integer=True)
        return _save(figure, path)



def _figure(size: tuple[float, float]) -> Figure:
    figure = Figure(figsize=size, dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: Path) -> Path:
    return atomic_write(Path(path), lambda tmp: figure.savefig(tmp, format="png", dpi=DPI))


def _check_curves(curves: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    if not curves:
        raise ValueError("curves is empty: pass at least one label -> (2, n_bins) histogram")
    checked = {}
    for label, hist in curves.items():
        array = np.asarray(hist, dtype=float)
        if array.ndim != 2 or array.shape[0] != 2 or array.shape[1] < 1:
            raise ValueError(f"curve '{label}': expected a (2, n_bins) histogram (row 0 PsP, row 1 TP), "
                             f"got shape {array.shape}")
        if not np.all(np.isfinite(array)) or np.any(array < 0) or array.sum() == 0:
            raise ValueError(f"curve '{label}' must hold finite, non-negative counts of at least one case, "
                             f"got {int(array.sum()) if np.all(np.isfinite(array)) else 'non-finite'} in total")
        checked[str(label)] = array
    return checked


def _styled(curves: dict[str, np.ndarray]) -> list[tuple[str, np.ndarray, dict]]:
    """Folds first (thin, shades of blue, underneath), then other curves, the ensemble last (bold, black, on top)."""
    def is_fold(label: str) -> bool:
        return label.lower().startswith("fold")

    fold_colors = iter(matplotlib.colormaps["Blues"](np.linspace(0.45, 0.8, sum(map(is_fold, curves)))))
    styled, others = [], 0
    for label, hist in sorted(curves.items(), key=lambda item: (not is_fold(item[0]), item[0] == "ensemble")):
        if label == "ensemble":
            style = {"color": ENSEMBLE_COLOR, "linewidth": 2.6, "alpha": 1.0, "zorder": 4}
        elif is_fold(label):
            style = {"color": next(fold_colors), "linewidth": 1.1, "alpha": 0.8, "zorder": 2}
        else:
            style = {"color": OTHER_PALETTE[others % len(OTHER_PALETTE)], "linewidth": 1.8, "alpha": 0.95,
                     "zorder": 3}
            others += 1
        styled.append((label, hist, style))
    return styled


def _auc_text(metrics: dict[str, float]) -> str:
    if math.isnan(metrics["auc_ci_low"]):
        return f"AUC {metrics['auc']:.2f}, CI n/a"
    return f"AUC {metrics['auc']:.2f} [{metrics['auc_ci_low']:.2f}–{metrics['auc_ci_high']:.2f}]"
