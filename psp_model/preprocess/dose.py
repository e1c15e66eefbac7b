"""RT dose: read RTDOSE files and compute lesion dose statistics (D98 and friends)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.affines import apply_affine
from pydicom.dataset import Dataset
from scipy.ndimage import map_coordinates

from psp_model.errors import InputError
from psp_model.preprocess.dicom import (
    dicom_affine_ras,
    frames_to_volume,
    pixel_frames,
    read_dicom,
    required_floats,
    slice_normal,
)

FRAME_OFFSET_TOLERANCE = 0.01
"""Largest deviation (mm) of a GridFrameOffsetVector step from the mean step, or of an absolute first
offset from ImagePositionPatient along the normal."""

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


def rtdose_to_nifti(path: Path, *, accept_relative: bool = False) -> nib.Nifti1Image:
    """An RT Dose file -> dose volume (float32, ``pixel value * DoseGridScaling``) with its RAS affine.

    GridFrameOffsetVector may be relative (first value 0) or absolute (first value = the position of
    ImagePositionPatient along the slice normal), increasing or decreasing; offsets must be evenly
    spaced. A single-frame file takes its thickness from SliceThickness.

    Args:
        path: one RT Dose Storage file.
        accept_relative: DoseUnits RELATIVE (fraction of the prescription) is refused by default because
            the model's features are in Gy; True reads it as is (parser checks, never model input).
    """
    path = Path(path)
    ds = read_dicom(path)
    if ds.get("Modality") != "RTDOSE":
        raise InputError(f"{path}: Modality is {ds.get('Modality')!r}, expected 'RTDOSE'")
    units = str(ds.get("DoseUnits", ""))
    if units != "GY" and not (units == "RELATIVE" and accept_relative):
        raise InputError(
            f"{path}: DoseUnits is {units!r}, expected 'GY' (physical dose in Gy); export the plan dose in Gy"
        )
    scaling = float(required_floats(ds, "DoseGridScaling", 1, path)[0])
    if scaling <= 0:
        raise InputError(f"{path}: DoseGridScaling is {scaling}, expected > 0")
    orientation = required_floats(ds, "ImageOrientationPatient", 6, path)
    spacing = required_floats(ds, "PixelSpacing", 2, path)
    position = required_floats(ds, "ImagePositionPatient", 3, path)
    frames = pixel_frames(ds, path)
    step = _frame_step(ds, len(frames), position @ slice_normal(orientation), path)
    dose = frames_to_volume(frames.astype(np.float64) * scaling).astype(np.float32)
    image = nib.Nifti1Image(dose, dicom_affine_ras(position, orientation, spacing, step))
    image.header.set_xyzt_units("mm")
    return image


def _frame_step(ds: Dataset, n_frames: int, first_along_normal: float, path: Path) -> float:
    """Signed distance (mm) between frames along the normal, from GridFrameOffsetVector."""
    if "GridFrameOffsetVector" not in ds and n_frames == 1:
        offsets = np.zeros(1)
    else:
        offsets = required_floats(ds, "GridFrameOffsetVector", None, path)
    if offsets.size != n_frames:
        raise InputError(
            f"{path}: GridFrameOffsetVector has {offsets.size} values for {n_frames} frame(s); "
            "expected one offset per frame"
        )
    if offsets[0] != 0 and abs(offsets[0] - first_along_normal) > FRAME_OFFSET_TOLERANCE:
        raise InputError(
            f"{path}: GridFrameOffsetVector starts at {offsets[0]} mm: neither relative (0) nor absolute "
            f"(ImagePositionPatient along the normal is {first_along_normal:.3f} mm)"
        )
    if n_frames == 1:
        thickness = float(required_floats(ds, "SliceThickness", 1, path)[0])
        if thickness <= 0:
            raise InputError(f"{path}: single-frame dose with SliceThickness {thickness}; expected > 0 mm")
        return thickness
    gaps = np.diff(offsets)
    step = float((offsets[-1] - offsets[0]) / (n_frames - 1))
    if abs(step) < FRAME_OFFSET_TOLERANCE or np.abs(gaps - step).max() > FRAME_OFFSET_TOLERANCE:
        raise InputError(
            f"{path}: GridFrameOffsetVector is not evenly spaced (gaps {np.unique(gaps.round(3)).tolist()} "
            "mm); expected a constant non-zero step"
        )
    return step


def dose_features(
    dose_img: nib.Nifti1Image,
    lesion_img: nib.Nifti1Image,
    *,
    labels: Sequence[int] = (1, 4),
    lesion_to_dose: np.ndarray | None = None,
    min_coverage: float = 0.95,
) -> dict[str, float | str | None]:
    """Lesion dose statistics (Gy) with the dose sampled trilinearly at each lesion voxel centre.

    Sampling the dose at the lesion voxels keeps the lesion's resolution (the most accurate of the
    methods compared in shared/notes/imaging.md). A voxel is covered when its centre lies within the
    dose grid's outermost voxel centres; statistics use covered voxels only.

    Args:
        dose_img: dose in Gy, 3-D, e.g. from :func:`rtdose_to_nifti`.
        lesion_img: label map, 3-D; lesion voxels have a value in ``labels``.
        labels: lesion label values (BraTS 2021: 1 necrosis, 4 enhancing; use the site's labels).
        lesion_to_dose: 4x4 RAS transform, ``x_dose_world = lesion_to_dose @ x_lesion_world``
            (e.g. follow-up MR to planning CT); identity if None.
        min_coverage: smallest accepted fraction of lesion voxels inside the dose grid.

    Returns:
        ``mean``, ``min``, ``median``, ``d98`` (see :func:`lesion_dose_statistics`), ``coverage``
        (fraction of lesion voxels inside the dose grid) and ``reason``: None, or why the doses are
        NaN (empty lesion).

    Raises:
        InputError: less than ``min_coverage`` of the lesion lies inside the dose grid.
    """
    if not 0 <= min_coverage <= 1:
        raise ValueError(f"min_coverage must be in [0, 1], got {min_coverage}")
    transform = np.eye(4) if lesion_to_dose is None else np.asarray(lesion_to_dose, dtype=float)
    if transform.shape != (4, 4):
        raise ValueError(f"lesion_to_dose must be a 4x4 matrix, got shape {transform.shape}")
    dose = np.asarray(dose_img.dataobj, dtype=np.float64)
    lesion = np.asanyarray(lesion_img.dataobj)
    for name, array in (("dose_img", dose), ("lesion_img", lesion)):
        if array.ndim != 3:
            raise ValueError(f"{name} must be 3-D, got shape {array.shape}")

    voxels = np.argwhere(np.isin(lesion, np.asarray(labels)))
    if len(voxels) == 0:
        stats: dict[str, float | str | None] = dict(lesion_dose_statistics(np.array([])))
        stats.update(coverage=float("nan"), reason=f"empty lesion: no voxel with label in {tuple(labels)}")
        return stats

    to_dose_voxels = np.linalg.inv(dose_img.affine) @ transform @ lesion_img.affine
    points = apply_affine(to_dose_voxels, voxels)
    tolerance = 1e-6
    covered = np.all((points >= -tolerance) & (points <= np.array(dose.shape) - 1 + tolerance), axis=1)
    coverage = float(covered.mean())
    if coverage < min_coverage:
        raise InputError(
            f"only {coverage:.1%} of the lesion ({covered.sum()} of {len(covered)} voxels) lies inside the "
            f"dose grid, below the bound {min_coverage:.0%}; check the dose file and the lesion-to-dose "
            "registration"
        )
    samples = map_coordinates(dose, points[covered].T, order=1, mode="nearest")
    stats = dict(lesion_dose_statistics(samples))
    stats.update(coverage=coverage, reason=None)
    return stats
