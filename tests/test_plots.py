"""Report figures: each writes a readable PNG of the expected size and rejects bad input clearly."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.image
import numpy as np
import pytest

from psp_model.evaluate.metrics import N_BINS, score_histograms
from psp_model.evaluate.plots import (
    plot_calibration,
    plot_feature_ranking,
    plot_roc,
    plot_training_curves,
)

FEATURES = ["days_since_rt", "dose_min", "dose_d98", "age", "dose_mean", "idh"]


def _hist(seed: int, n: int = 30) -> np.ndarray:
    rng = np.random.default_rng(seed)
    labels = np.repeat([0, 1], n // 2)
    scores = 1 / (1 + np.exp(-(rng.normal(0, 1, n) + 1.5 * labels - 0.75)))
    return score_histograms(scores, labels)


def _curves() -> dict[str, np.ndarray]:
    return {**{f"fold {k}": _hist(k) for k in range(1, 4)}, "clinical-only": _hist(8), "ensemble": _hist(9)}


def _rounds() -> list[dict]:
    rounds = [{"phase": "ssl", "fold": None, "round": r, "metrics": {"train-loss": 1 / r}} for r in range(1, 6)]
    for fold in range(2):
        rounds += [{"phase": "finetune", "fold": fold, "round": r,
                    "metrics": {"train-loss": 0.7 / r, "val-loss": None if r == 2 else 0.8 / r}} for r in range(1, 5)]
    return rounds


def _read_png(path: Path) -> np.ndarray:
    assert path.is_file() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind
    return matplotlib.image.imread(path)


@pytest.mark.parametrize(("draw", "size"), [
    (lambda path: plot_roc(_curves(), path, title="External test"), (900, 900)),
    (lambda path: plot_calibration(_curves(), path, title="External test"), (1050, 900)),
    (lambda path: plot_training_curves(_rounds(), path), (675, 1800)),
])
def test_each_plot_writes_a_readable_png_of_the_expected_size(tmp_path: Path, draw, size) -> None:
    path = tmp_path / "figure.png"
    before = dict(matplotlib.rcParams)
    assert draw(path) == path
    image = _read_png(path)
    assert image.shape[:2] == size
    assert image[..., :3].std() > 0.05  # something is drawn, not a blank page
    assert dict(matplotlib.rcParams) == before  # styling stays inside the call


def test_feature_ranking_grows_with_the_number_of_features(tmp_path: Path) -> None:
    few = _read_png(plot_feature_ranking(FEATURES[:2], [0.2, 0.1], tmp_path / "a" / "few.png", title="SHAP"))
    many = _read_png(plot_feature_ranking(FEATURES, [0.05, 0.2, 0.1, 0.07, 0.01, 0.0], tmp_path / "b" / "many.png",
                                          title="SHAP", highlight={"dose_min", "age"}))
    assert few.shape[1] == many.shape[1] == 975
    assert many.shape[0] > few.shape[0]


def test_a_single_class_site_is_listed_without_a_curve_instead_of_failing_the_figure(tmp_path: Path) -> None:
    only_tp = score_histograms(np.array([0.3, 0.6, 0.9]), np.array([1, 1, 1]))
    _read_png(plot_roc({"site A": only_tp, "ensemble": _hist(0)}, tmp_path / "roc.png", title="t"))


def test_a_rewrite_replaces_the_figure(tmp_path: Path) -> None:
    path = tmp_path / "roc.png"
    plot_roc({"ensemble": _hist(1)}, path, title="first")
    first = path.read_bytes()
    plot_roc({"ensemble": _hist(2)}, path, title="second")
    assert path.read_bytes() != first


@pytest.mark.parametrize(("draw", "message"), [
    (lambda p: plot_roc({}, p, title="t"), "curves is empty"),
    (lambda p: plot_roc({"fold 1": np.zeros(N_BINS)}, p, title="t"), r"'fold 1'.*\(2, n_bins\).*got shape \(1000,\)"),
    (lambda p: plot_roc({"site A": np.zeros((2, N_BINS))}, p, title="t"), "'site A' must hold .* at least one case"),
    (lambda p: plot_roc({"site A": -np.ones((2, N_BINS))}, p, title="t"), "non-negative counts"),
    (lambda p: plot_calibration({}, p, title="t"), "curves is empty"),
    (lambda p: plot_calibration({"ensemble": np.zeros((3, 5))}, p, title="t"), r"got shape \(3, 5\)"),
    (lambda p: plot_calibration({"ensemble": np.zeros((2, N_BINS))}, p, title="t"), "'ensemble' must hold .* got 0 in total"),
    (lambda p: plot_feature_ranking([], [], p, title="t"), "at least one feature"),
    (lambda p: plot_feature_ranking(["age", "idh"], [0.1], p, title="t"), r"one per feature \(2\)"),
    (lambda p: plot_feature_ranking(["age"], [-0.1], p, title="t"), "non-negative"),
    (lambda p: plot_feature_ranking(["age"], [0.1], p, title="t", highlight={"sex"}), r"not in the list: \['sex'\]"),
    (lambda p: plot_training_curves([], p), "got none"),
    (lambda p: plot_training_curves([{"round": 1}], p), r"rounds\[0\] must be a dict with 'phase' and 'round'"),
    (lambda p: plot_training_curves([{"phase": "evaluate", "round": 1}], p), "'evaluate' is not one of"),
])
def test_bad_input_is_rejected_before_anything_is_written(tmp_path: Path, draw, message) -> None:
    path = tmp_path / "figure.png"
    with pytest.raises(ValueError, match=message):
        draw(path)
    assert not path.exists()
