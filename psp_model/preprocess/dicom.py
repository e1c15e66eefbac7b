"""DICOM patient geometry. The only place that knows DICOM is LPS and NIfTI/nibabel/MONAI are RAS.

A volume here is indexed ``[column, row, slice]`` (nibabel order: i along a DICOM row, j along a
column, k along the slice normal), so that ``affine @ [i, j, k, 1]`` is the RAS position in mm.

Readers raise :class:`~psp_model.errors.InputError` naming the file, what is wrong and what was expected.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_rescale

from psp_model.errors import InputError

SLICE_SPACING_TOLERANCE = 0.01
"""Largest relative deviation of one slice gap from the mean gap (1 %, at least 0.01 mm)."""

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


def slice_positions(
    first_position: np.ndarray, orientation: np.ndarray, slice_step: float, n_slices: int
) -> np.ndarray:
    """ImagePositionPatient (LPS, mm) of slices ``0 .. n_slices - 1``, shape ``(n_slices, 3)``."""
    steps = np.arange(n_slices, dtype=float)[:, None] * float(slice_step)
    return np.asarray(first_position, dtype=float)[None, :] + steps * slice_normal(orientation)[None, :]


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


def read_dicom(path: Path, *, stop_before_pixels: bool = False) -> Dataset:
    """Read and parse every element of one DICOM file, so a corrupt file fails here and not later."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
        for _ in ds:  # converts each raw element; bad values raise now
            pass
    except InvalidDicomError as err:
        raise InputError(f"{path}: not a DICOM file ({err}); expected a DICOM Part 10 file") from err
    except Exception as err:  # pydicom raises many error types for corrupt content
        raise InputError(f"{path}: unreadable DICOM ({type(err).__name__}: {err})") from err
    return ds


def required_floats(ds: Dataset, keyword: str, count: int | None, path: Path) -> np.ndarray:
    """A numeric attribute as floats, checking it is present and has ``count`` values (any if None)."""
    value = ds.get(keyword)
    if value is None or value == "":
        raise InputError(f"{path}: {keyword} is missing or empty; it is required to place the image")
    try:
        values = np.asarray(value, dtype=float).ravel()
    except (TypeError, ValueError) as err:
        raise InputError(f"{path}: {keyword} = {value!r} is not numeric") from err
    if count is not None and values.size != count:
        raise InputError(f"{path}: {keyword} has {values.size} values {values.tolist()}, expected {count}")
    if not np.isfinite(values).all():
        raise InputError(f"{path}: {keyword} = {values.tolist()} is not finite")
    return values


def pixel_frames(ds: Dataset, path: Path) -> np.ndarray:
    """Stored pixel values, shape ``(frames, rows, columns)``, for single- and multi-frame images."""
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise InputError(f"{path}: SamplesPerPixel is {ds.SamplesPerPixel}, expected 1 (greyscale)")
    try:
        frames = ds.pixel_array
    except Exception as err:  # truncated or undecodable pixel data: pydicom raises several types
        raise InputError(f"{path}: pixel data cannot be decoded ({type(err).__name__}: {err})") from err
    n_frames = int(ds.get("NumberOfFrames") or 1)
    return frames.reshape(n_frames, int(ds.Rows), int(ds.Columns))


def single_value(paths: list[Path], datasets: list[Dataset], keyword: str, where: Path) -> str:
    """The one value of ``keyword`` shared by all files; several values or a missing one -> InputError."""
    values = [str(ds.get(keyword, "")) for ds in datasets]
    counts = Counter(values)
    if "" in counts:
        missing = [p.name for p, v in zip(paths, values) if v == ""]
        raise InputError(f"{where}: {keyword} is missing in {len(missing)} file(s): {missing[:5]}")
    if len(counts) > 1:
        listed = "; ".join(f"{value} ({n} files)" for value, n in counts.most_common())
        raise InputError(f"{where}: {len(counts)} different {keyword}s: {listed}; expected exactly one")
    return values[0]


def _ct_files(folder: Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: CT series folder does not exist or is not a folder")
    paths = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not paths:
        raise InputError(f"{folder}: no files; expected the DICOM files of one CT series")
    return paths


def _check_ct(paths: list[Path], datasets: list[Dataset], folder: Path) -> str:
    """Checks shared by the header-only and the full read; returns the FrameOfReferenceUID."""
    for path, ds in zip(paths, datasets):
        if ds.get("Modality") != "CT":
            raise InputError(
                f"{path}: Modality is {ds.get('Modality')!r}, expected 'CT' (one CT series per folder)"
            )
        if int(ds.get("NumberOfFrames") or 1) != 1:
            raise InputError(
                f"{path}: multi-frame CT ({ds.NumberOfFrames} frames) is not supported; "
                "export single-frame slices"
            )
    frame_of_reference = single_value(paths, datasets, "FrameOfReferenceUID", folder)
    single_value(paths, datasets, "SeriesInstanceUID", folder)
    return frame_of_reference


def read_frame_of_reference(path: Path) -> str:
    """FrameOfReferenceUID of a CT series folder (exactly one enforced) or of one DICOM file.

    The planning CT and the RT dose must share it; compare them before using the dose.
    """
    path = Path(path)
    if not path.is_dir():
        return single_value([path], [read_dicom(path, stop_before_pixels=True)], "FrameOfReferenceUID", path)
    paths = _ct_files(path)
    return _check_ct(paths, [read_dicom(p, stop_before_pixels=True) for p in paths], path)


def read_ct_series(folder: Path) -> nib.Nifti1Image:
    """One CT series folder -> HU volume (float32, ``stored * RescaleSlope + RescaleIntercept``) in RAS.

    Slices are ordered by the projection of ImagePositionPatient on the slice normal (InstanceNumber is
    ignored). Every file must be a single-frame CT slice of one series in one frame of reference, with
    the same orientation, pixel spacing and size, evenly spaced (:data:`SLICE_SPACING_TOLERANCE`) and
    stacked along the normal (no gantry tilt). Files whose name starts with ``.`` are ignored. Get the
    FrameOfReferenceUID with :func:`read_frame_of_reference`.
    """
    folder = Path(folder)
    paths = _ct_files(folder)
    datasets = [read_dicom(p) for p in paths]
    _check_ct(paths, datasets, folder)
    shared = {
        keyword: required_floats(datasets[0], keyword, count, paths[0])
        for keyword, count in [("ImageOrientationPatient", 6), ("PixelSpacing", 2), ("Rows", 1), ("Columns", 1)]
    }
    for path, ds in zip(paths, datasets):
        for keyword, expected in shared.items():
            value = required_floats(ds, keyword, expected.size, path)
            if not np.allclose(value, expected, rtol=1e-4, atol=1e-4):
                raise InputError(
                    f"{path}: {keyword} {value.tolist()} differs from {paths[0].name}'s {expected.tolist()}; "
                    "expected one geometry for the whole series"
                )
        for keyword in ("RescaleSlope", "RescaleIntercept"):
            required_floats(ds, keyword, 1, path)
    orientation, spacing = shared["ImageOrientationPatient"], shared["PixelSpacing"]
    positions = np.stack(
        [required_floats(ds, "ImagePositionPatient", 3, path) for path, ds in zip(paths, datasets)]
    )
    order, step = _stack_order(positions, orientation, spacing, [p.name for p in paths], folder)
    if len(paths) == 1:
        step = float(required_floats(datasets[0], "SliceThickness", 1, paths[0])[0])
    slices = [apply_rescale(pixel_frames(datasets[i], paths[i])[0], datasets[i]) for i in order]
    volume = frames_to_volume(np.stack(slices).astype(np.float32))
    affine = dicom_affine_ras(positions[order[0]], orientation, spacing, step)
    image = nib.Nifti1Image(volume, affine)
    image.header.set_xyzt_units("mm")
    return image


def _stack_order(
    positions: np.ndarray, orientation: np.ndarray, spacing: np.ndarray, names: list[str], folder: Path
) -> tuple[np.ndarray, float]:
    """Slice order along the normal and the mean step (mm); rejects tilt, duplicates and uneven gaps."""
    normal = slice_normal(orientation)
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    if len(order) == 1:
        return order, 0.0
    sideways = positions[order] - positions[order[0]] - np.outer(along[order] - along[order[0]], normal)
    worst = int(np.argmax(np.linalg.norm(sideways, axis=1)))
    if np.linalg.norm(sideways[worst]) > 0.05 * spacing.min():
        raise InputError(
            f"{folder}: slice {names[order[worst]]} is shifted {np.linalg.norm(sideways[worst]):.3f} mm off "
            f"the slice normal {normal.round(4).tolist()}; expected slices stacked along it (no gantry tilt)"
        )
    gaps = np.diff(along[order])
    step = float((along[order[-1]] - along[order[0]]) / (len(order) - 1))
    if gaps.min() <= 1e-3:
        k = int(np.argmin(gaps))
        raise InputError(
            f"{folder}: slices {names[order[k]]} and {names[order[k + 1]]} are at the same position "
            f"{along[order[k]]:.3f} mm along the normal; expected one slice per position"
        )
    if np.abs(gaps - step).max() > max(0.01, SLICE_SPACING_TOLERANCE * step):
        raise InputError(
            f"{folder}: uneven slice spacing, gaps from {gaps.min():.3f} to {gaps.max():.3f} mm "
            f"(mean {step:.3f}); expected equal gaps within {SLICE_SPACING_TOLERANCE:.0%} (missing slice?)"
        )
    return order, step
