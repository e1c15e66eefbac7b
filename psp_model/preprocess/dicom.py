"""DICOM patient geometry. The only place that knows DICOM is LPS and NIfTI/nibabel/MONAI are RAS.

A volume here is indexed ``[column, row, slice]`` (nibabel order: i along a DICOM row, j along a
column, k along the slice normal), so that ``affine @ [i, j, k, 1]`` is the RAS position in mm.
"""

from __future__ import annotations

import numpy as np

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
"""Flips x and y. Its own inverse, so it also maps RAS to LPS."""


def lps_to_ras(affine_lps: np.ndarray) -> np.ndarray:
    """Turn an affine into DICOM patient space (LPS) into one into RAS (and back: it is an involution)."""
    return LPS_TO_RAS @ np.asarray(affine_lps, dtype=float)


def ras_to_lps(affine_ras: np.ndarray) -> np.ndarray:
    """Turn an affine into RAS into one into DICOM patient space (LPS)."""
    return LPS_TO_RAS @ np.asarray(affine_ras, dtype=float)


def slice_normal(orientation: np.ndarray) -> np.ndarray:
    """Unit normal of an ImageOrientationPatient (row direction x column direction)."""
    orientation = np.asarray(orientation, dtype=float)
    normal = np.cross(orientation[:3], orientation[3:])
    return normal / np.linalg.norm(normal)


def dicom_affine_ras(
    first_position: np.ndarray,
    orientation: np.ndarray,
    pixel_spacing: np.ndarray,
    slice_step: float,
) -> np.ndarray:
    """RAS affine of a ``[column, row, slice]`` volume built from DICOM slices or frames.

    Args:
        first_position: ImagePositionPatient (LPS, mm) of slice 0, the centre of its first pixel.
        orientation: ImageOrientationPatient, 6 values (row direction, then column direction).
        pixel_spacing: PixelSpacing = [spacing between rows, spacing between columns]; the step
            along a row (the i axis) is ``pixel_spacing[1]``.
        slice_step: signed distance (mm) along the slice normal from slice k to k + 1.
    """
    orientation = np.asarray(orientation, dtype=float)
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = orientation[:3] * float(pixel_spacing[1])
    affine_lps[:3, 1] = orientation[3:] * float(pixel_spacing[0])
    affine_lps[:3, 2] = slice_normal(orientation) * float(slice_step)
    affine_lps[:3, 3] = np.asarray(first_position, dtype=float)
    return lps_to_ras(affine_lps)


def frames_to_volume(frames: np.ndarray) -> np.ndarray:
    """DICOM pixel data ``(slices, rows, columns)`` -> volume ``[column, row, slice]``."""
    return np.transpose(frames, (2, 1, 0))


def volume_to_frames(volume: np.ndarray) -> np.ndarray:
    """Volume ``[column, row, slice]`` -> DICOM pixel data ``(slices, rows, columns)``."""
    return np.transpose(volume, (2, 1, 0))


def geometry_from_affine_ras(affine_ras: np.ndarray) -> dict[str, np.ndarray | float]:
    """Inverse of :func:`dicom_affine_ras`: the DICOM geometry attributes of a RAS volume affine.

    Returns ``orientation`` (6), ``pixel_spacing`` ([row spacing, column spacing]), ``slice_step``
    and ``first_position`` (LPS); slice k starts at ``first_position + k * slice_step * normal``.
    """
    affine_lps = ras_to_lps(affine_ras)
    columns = affine_lps[:3, :3]
    spacing = np.linalg.norm(columns, axis=0)
    row_dir, col_dir = columns[:, 0] / spacing[0], columns[:, 1] / spacing[1]
    normal = np.cross(row_dir, col_dir)
    slice_step = float(columns[:, 2] @ normal)
    if not np.allclose(columns[:, 2], normal * slice_step, atol=1e-6 * max(1.0, abs(slice_step))):
        raise ValueError(f"affine is sheared: slice axis {columns[:, 2]} is not along the normal {normal}")
    return {
        "orientation": np.concatenate([row_dir, col_dir]),
        "pixel_spacing": np.array([spacing[1], spacing[0]]),
        "slice_step": slice_step,
        "first_position": affine_lps[:3, 3].copy(),
    }
