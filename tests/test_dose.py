"""Lesion dose statistics (D98 definition) and dose features sampled at lesion voxels."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pydicom
import pytest

from psp_model.errors import InputError
from psp_model.preprocess.dose import dose_features, lesion_dose_statistics, rtdose_to_nifti
from simulation.dicom_writer import make_uid, write_rtdose

# Dose grid: 2 mm in-plane, 2.5 mm slices, x and y flipped; covers RAS x, y in [-40, 40], z in [-20, 20].
DOSE_AFFINE = np.array([[-2.0, 0, 0, 40], [0, -2.0, 0, 40], [0, 0, 2.5, -20], [0, 0, 0, 1]])
DOSE_SHAPE = (41, 41, 17)


def _ramp(x, y, z):
    return 30 + 0.5 * x + 0.2 * y + 0.1 * z


def _ramp_dose() -> nib.Nifti1Image:
    ijk = np.stack(np.meshgrid(*map(np.arange, DOSE_SHAPE), indexing="ij"), axis=-1)
    xyz = nib.affines.apply_affine(DOSE_AFFINE, ijk)
    return nib.Nifti1Image(_ramp(*np.moveaxis(xyz, -1, 0)).astype(np.float32), DOSE_AFFINE)


def _lesion(origin, shape=(10, 10, 10), label=1) -> nib.Nifti1Image:
    """A 1 mm lesion filling its whole grid, first voxel centre at ``origin`` (RAS)."""
    affine = np.eye(4)
    affine[:3, 3] = origin
    return nib.Nifti1Image(np.full(shape, label, dtype=np.uint8), affine)


def _lesion_centres(lesion: nib.Nifti1Image) -> np.ndarray:
    return nib.affines.apply_affine(lesion.affine, np.argwhere(lesion.get_fdata() > 0))


def test_d98_hand_computed():
    assert lesion_dose_statistics(np.arange(100.0))["d98"] == 2.0  # 98 of 100 voxels get >= 2 Gy
    assert lesion_dose_statistics(np.arange(1000.0))["d98"] == 20.0
    # Volumes 1, 1, 1, 96, 1 (of 100): 99 % receive >= 2 Gy, only 3 % >= 3 Gy.
    assert lesion_dose_statistics(np.array([5.0, 4, 3, 2, 1]), np.array([1.0, 1, 1, 96, 1]))["d98"] == 2.0
    stats = lesion_dose_statistics(np.array([10.0, 20, 30, 60]), np.array([1.0, 1, 1, 1]))
    assert stats == {"mean": 30.0, "min": 10.0, "median": 20.0, "d98": 10.0}


@pytest.mark.parametrize("seed", range(20))
def test_d98_matches_brute_force_definition(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 300))
    doses = rng.uniform(0, 60, n).round(1)  # ties included
    weights = rng.integers(1, 6, n).astype(float)
    brute = max(d for d in doses if 100 * weights[doses >= d].sum() >= 98 * weights.sum())
    assert lesion_dose_statistics(doses, weights)["d98"] == brute


def test_linear_ramp_is_sampled_exactly():
    lesion = _lesion((-12.0, 5.0, -3.0), (9, 7, 5))
    expected = _ramp(*_lesion_centres(lesion).T)
    features = dose_features(_ramp_dose(), lesion)
    assert features["coverage"] == 1.0 and features["reason"] is None
    assert features["mean"] == pytest.approx(expected.mean(), abs=1e-4)
    assert features["min"] == pytest.approx(expected.min(), abs=1e-4)
    reference = lesion_dose_statistics(expected)
    assert features["median"] == pytest.approx(reference["median"], abs=1e-4)
    assert features["d98"] == pytest.approx(reference["d98"], abs=1e-4)


def test_only_lesion_labels_count():
    data = np.zeros((10, 10, 10), dtype=np.uint8)
    data[:5] = 4  # x = -20 .. -16
    data[5:] = 2  # oedema, x = -15 .. -11: excluded by the default labels (1, 4)
    lesion = nib.Nifti1Image(data, nib.affines.from_matvec(np.eye(3), [-20.0, 0, 0]))
    features = dose_features(_ramp_dose(), lesion)
    assert features["mean"] == pytest.approx(_ramp(-18.0, 4.5, 4.5), abs=1e-4)
    both = dose_features(_ramp_dose(), lesion, labels=(2, 4))
    assert both["mean"] == pytest.approx(_ramp(-15.5, 4.5, 4.5), abs=1e-4)


def test_lesion_to_dose_translation_shifts_the_dose():
    lesion = _lesion((0.0, 0.0, 0.0))
    moved = dose_features(_ramp_dose(), lesion, lesion_to_dose=nib.affines.from_matvec(np.eye(3), [6.0, 0, 0]))
    assert moved["mean"] - dose_features(_ramp_dose(), lesion)["mean"] == pytest.approx(0.5 * 6.0, abs=1e-4)


def test_empty_lesion_gives_nan_and_reason():
    features = dose_features(_ramp_dose(), _lesion((0.0, 0, 0), label=2))
    assert all(np.isnan(features[name]) for name in ("mean", "min", "median", "d98", "coverage"))
    assert features["reason"] == "empty lesion: no voxel with label in (1, 4)"


def test_partial_coverage_raises_with_the_fraction():
    lesion = _lesion((36.0, 0, 0))  # x = 36 .. 45, the dose grid ends at x = 40
    with pytest.raises(InputError, match=r"only 50\.0% of the lesion \(500 of 1000 voxels\) .* below the bound 95%"):
        dose_features(_ramp_dose(), lesion)
    features = dose_features(_ramp_dose(), lesion, min_coverage=0.5)
    assert features["coverage"] == 0.5
    assert features["min"] == pytest.approx(_ramp(36.0, 0, 0), abs=1e-4)  # covered voxels only, no 0 Gy
    assert features["mean"] == pytest.approx(_ramp(38.0, 4.5, 4.5), abs=1e-4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(min_coverage=1.5), "min_coverage must be in"),
        (dict(lesion_to_dose=np.eye(3)), r"lesion_to_dose must be a 4x4 matrix, got shape \(3, 3\)"),
    ],
)
def test_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        dose_features(_ramp_dose(), _lesion((0.0, 0, 0)), **kwargs)


def test_dose_must_be_3d():
    dose = nib.Nifti1Image(np.zeros((4, 4, 4, 2), dtype=np.float32), np.eye(4))
    with pytest.raises(ValueError, match=r"dose_img must be 3-D, got shape \(4, 4, 4, 2\)"):
        dose_features(dose, _lesion((0.0, 0, 0)))


def _hand_made_rtdose(path) -> None:
    """An RT dose whose geometry is typed in LPS by hand, not by psp_model: 60 Gy in the patient's
    left-posterior quadrant (LPS x > 0 and y > 0), 5 Gy elsewhere."""
    write_rtdose(np.zeros((2, 2, 2)), np.eye(4), path, frame_of_reference_uid=make_uid("f"),
                 study_uid=make_uid("s"), patient_id="P", uid_seed="guard")  # valid file to overwrite
    ds = pydicom.dcmread(path)
    rows = cols = 51
    x_lps = -50 + 2.0 * np.arange(cols)  # along a row
    y_lps = -50 + 2.0 * np.arange(rows)  # down a column
    frame = np.where((y_lps[:, None] > 0) & (x_lps[None, :] > 0), 60000, 5000).astype(np.uint16)
    ds.ImagePositionPatient = [-50, -50, -20]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [2, 2]
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, cols, 21
    ds.GridFrameOffsetVector = [2.0 * k for k in range(21)]
    ds.DoseGridScaling = 0.001
    ds.PixelData = np.repeat(frame[None], 21, axis=0).tobytes()
    ds.save_as(path)


def test_lps_to_ras_guard(tmp_path):
    """Reading the dose as if DICOM were RAS would mirror x and y and give 5 Gy instead of 60 Gy."""
    path = tmp_path / "RD.dcm"
    _hand_made_rtdose(path)
    dose = rtdose_to_nifti(path)
    left_posterior = _lesion((-34.0, -34.0, -4.0), (9, 9, 9), label=4)  # RAS x, y < 0: LPS x, y > 0
    assert dose_features(dose, left_posterior)["mean"] == pytest.approx(60.0)
    right_anterior = _lesion((26.0, 26.0, -4.0), (9, 9, 9), label=4)
    assert dose_features(dose, right_anterior)["mean"] == pytest.approx(5.0)
    left_anterior = _lesion((-34.0, 26.0, -4.0), (9, 9, 9), label=4)
    assert dose_features(dose, left_anterior)["mean"] == pytest.approx(5.0)


def test_lesion_must_be_3d():
    lesion = nib.Nifti1Image(np.ones((4, 4, 4, 1), dtype=np.uint8), np.eye(4))
    with pytest.raises(ValueError, match=r"lesion_img must be 3-D, got shape \(4, 4, 4, 1\)"):
        dose_features(_ramp_dose(), lesion)
