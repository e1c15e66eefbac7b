"""RT dose: lesion dose statistics (D98 and friends)."""

from __future__ import annotations

import numpy as np

DOSE_FEATURES: tuple[str, ...] = ("mean", "min", "median", "d98")
"""Lesion dose features in Gy, in the order they enter the model."""


def lesion_dose_statistics(doses: np.ndarray, weights: np.ndarray | None = None) -> dict[str, float]:
    """Volume-weighted dose statistics (Gy) of the lesion voxels.

    D98 is the highest dose d such that at least 98 % of the lesion volume receives >= d
    (shared/notes/imaging.md): the inverted cumulative dose-volume histogram, no interpolation.
    ``np.percentile(d, 2)`` interpolates and differs for small lesions; numpy's weighted
    ``inverted_cdf`` quantile at 0.02 is one voxel lower when 2 % falls exactly on a voxel boundary.

    Args:
        doses: dose at each lesion voxel, shape (V,).
        weights: volume of each voxel (any unit), shape (V,); equal volumes if None.

    Returns:
        ``mean``, ``min``, ``median`` (volume-weighted, inverted CDF) and ``d98``; all NaN for an
        empty lesion (the caller reports why — never 0 Gy).
    """
    doses = np.asarray(doses, dtype=float).ravel()
    weights = np.ones_like(doses) if weights is None else np.asarray(weights, dtype=float).ravel()
    if doses.shape != weights.shape:
        raise ValueError(f"doses {doses.shape} and weights {weights.shape} must have the same shape")
    keep = weights > 0
    doses, weights = doses[keep], weights[keep]
    if doses.size == 0:
        return {name: float("nan") for name in DOSE_FEATURES}
    return {
        "mean": float(np.average(doses, weights=weights)),
        "min": float(doses.min()),
        "median": float(np.quantile(doses, 0.5, weights=weights, method="inverted_cdf")),
        "d98": dose_at_volume_fraction(doses, weights, 0.98),
    }


def dose_at_volume_fraction(doses: np.ndarray, weights: np.ndarray, fraction: float) -> float:
    """D_x: the highest dose received by at least ``fraction`` of the (weighted) volume."""
    order = np.argsort(doses)[::-1]
    covered = np.cumsum(weights[order]) / weights.sum()
    index = int(np.searchsorted(covered, fraction - 1e-12, side="left"))
    return float(doses[order][min(index, doses.size - 1)])
