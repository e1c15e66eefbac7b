"""DICOM writing (simulation) and reading (sites): CT series and RT dose round trips, LPS vs RAS."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from psp_model.errors import InputError
from psp_model.preprocess.dicom import read_ct_series, read_frame_of_reference
from psp_model.preprocess.dose import rtdose_to_nifti
from simulation.dicom_writer import make_uid, write_ct_series, write_rtdose

# i -> RAS -x (0.8 mm), j -> RAS +y (1.1 mm), k -> RAS +z (2.5 mm): flips and a non-zero origin.
FLIPPED = np.array([[-0.8, 0, 0, 30.0], [0, 1.1, 0, -20.0], [0, 0, 2.5, 15.0], [0, 0, 0, 1]])
# The usual DICOM layout: ImageOrientationPatient [1, 0, 0, 0, 1, 0], slice normal +z (LPS and RAS).
STANDARD = np.array([[-2.0, 0, 0, 40.0], [0, -1.5, 0, 25.0], [0, 0, 2.5, -10.0], [0, 0, 0, 1]])


def _oblique() -> np.ndarray:
    a, b = np.deg2rad(20), np.deg2rad(10)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    affine = np.eye(4)
    affine[:3, :3] = rz @ rx @ np.diag([-0.9, 1.2, -2.0])
    affine[:3, 3] = [-12.0, 40.0, 7.5]
    return affine


AFFINES = pytest.mark.parametrize("affine", [FLIPPED, STANDARD, _oblique()], ids=["flipped", "standard", "oblique"])
FLIP_K = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, -1, 3], [0, 0, 0, 1]])  # k -> 3 - k for 4 slices
UIDS = dict(frame_of_reference_uid=make_uid("for"), study_uid=make_uid("study"), patient_id="SIM-001")


def _hu(shape=(6, 5, 4)) -> np.ndarray:
    return np.random.default_rng(0).integers(-1024, 2000, shape).astype(float)


def _write_ct(folder: Path, affine=FLIPPED, hu=None) -> list[Path]:
    return write_ct_series(_hu() if hu is None else hu, affine, folder, uid_seed="ct", **UIDS)


def _write_dose(path: Path, dose: np.ndarray, affine=STANDARD, bits=16) -> Path:
    return write_rtdose(dose, affine, path, uid_seed="dose", bits=bits, **UIDS)


def _edit(path: Path, **attributes) -> None:
    ds = pydicom.dcmread(path)
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.save_as(path)


def test_make_uid_is_deterministic_and_valid():
    assert make_uid("a") == make_uid("a") != make_uid("b")
    assert pydicom.uid.UID(make_uid("a")).is_valid


RIGHT_HANDED = [STANDARD, _oblique(), np.diag([0.9, 1.1, 2.5, 1])]


@pytest.mark.parametrize("affine", RIGHT_HANDED, ids=["standard", "oblique", "ras"])
def test_ct_round_trip(tmp_path, affine):
    hu = _hu()
    _write_ct(tmp_path, affine, hu)
    image = read_ct_series(tmp_path)
    assert image.dataobj.dtype == np.float32
    np.testing.assert_array_equal(image.get_fdata(), hu)
    np.testing.assert_allclose(image.affine, affine, atol=1e-9)
    assert read_frame_of_reference(tmp_path) == UIDS["frame_of_reference_uid"]


def test_ct_round_trip_of_left_handed_affine_reverses_slices(tmp_path):
    """Slices come back in increasing order along row x column, so k flips when det(affine) < 0."""
    hu = _hu()
    _write_ct(tmp_path, FLIPPED, hu)
    image = read_ct_series(tmp_path)
    np.testing.assert_array_equal(image.get_fdata(), hu[..., ::-1])
    np.testing.assert_allclose(image.affine @ FLIP_K, FLIPPED, atol=1e-9)


def test_ct_marker_lands_at_hand_computed_lps_position(tmp_path):
    hu = np.full((6, 5, 4), -1000.0)
    hu[2, 3, 1] = 1500.0  # RAS (30 - 1.6, -20 + 3.3, 15 + 2.5)
    paths = _write_ct(tmp_path, FLIPPED, hu)
    ds = pydicom.dcmread(paths[1])
    np.testing.assert_allclose([float(v) for v in ds.ImagePositionPatient], [-30.0, 20.0, 17.5])  # voxel (0, 0, 1)
    np.testing.assert_allclose([float(v) for v in ds.ImageOrientationPatient], [1, 0, 0, 0, -1, 0])
    np.testing.assert_allclose([float(v) for v in ds.PixelSpacing], [1.1, 0.8])
    assert ds.Modality == "CT" and ds.PatientID == "SIM-001"
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    pixels = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert pixels[3, 2] == 1500.0 and (pixels == 1500.0).sum() == 1  # row j = 3, column i = 2
    row_step, column_step = 0.8 * np.array([1, 0, 0]), 1.1 * np.array([0, -1, 0])  # LPS, from the IOP above
    lps_of_marker = np.array([float(v) for v in ds.ImagePositionPatient]) + 2 * row_step + 3 * column_step
    np.testing.assert_allclose(lps_of_marker, [-28.4, 16.7, 17.5])  # = RAS (28.4, -16.7, 17.5) with x, y negated
    image = read_ct_series(tmp_path)
    marker = np.argwhere(image.get_fdata() == 1500.0)[0]
    np.testing.assert_allclose(image.affine @ [*marker, 1], [28.4, -16.7, 17.5, 1])


def test_ct_writer_is_deterministic(tmp_path):
    first = [p.read_bytes() for p in _write_ct(tmp_path / "a")]
    second = [p.read_bytes() for p in _write_ct(tmp_path / "b")]
    assert first == second and len(set(first)) == 4


def test_ct_slices_sorted_by_position_not_file_name_or_instance_number(tmp_path):
    hu = _hu()
    paths = _write_ct(tmp_path, STANDARD, hu)
    for n, path in zip([3, 1, 4, 2], paths):
        _edit(path, InstanceNumber=n)
    for name, path in zip(["z", "b", "y", "a"], paths):
        path.rename(tmp_path / f"{name}.dcm")
    image = read_ct_series(tmp_path)
    np.testing.assert_array_equal(image.get_fdata(), hu)
    np.testing.assert_allclose(image.affine, STANDARD, atol=1e-9)


def test_ct_small_reads_as_one_slice_series(tmp_path):
    shutil.copy(get_testdata_file("CT_small.dcm"), tmp_path)
    image = read_ct_series(tmp_path)
    assert image.shape == (128, 128, 1)
    np.testing.assert_allclose(np.diag(image.affine), [-0.661468, -0.661468, 5.0, 1])
    np.testing.assert_allclose(image.affine[:3, 3], [158.135803, 179.035797, -75.699997])
    raw = pydicom.dcmread(get_testdata_file("CT_small.dcm")).pixel_array
    np.testing.assert_array_equal(image.get_fdata()[:, :, 0], raw.T - 1024.0)


def _shift_position(path: Path, delta) -> None:
    ds = pydicom.dcmread(path)
    _edit(path, ImagePositionPatient=[float(v) + d for v, d in zip(ds.ImagePositionPatient, delta)])


CT_DEFECTS = {
    "mixed frames": (
        lambda p: _edit(p[2], FrameOfReferenceUID="1.2.3.4"),
        r"2 different FrameOfReferenceUIDs: .*1\.2\.3\.4 \(1 files\)",
    ),
    "two series": (lambda p: _edit(p[2], SeriesInstanceUID="1.2.3.5"), "2 different SeriesInstanceUIDs"),
    "not CT": (lambda p: _edit(p[0], Modality="MR"), r"Modality is 'MR', expected 'CT'"),
    "missing slice": (lambda p: p[2].unlink(), "uneven slice spacing"),
    "duplicate slice": (lambda p: shutil.copy(p[1], p[1].with_name("copy.dcm")), "at the same position"),
    "gantry tilt": (lambda p: _shift_position(p[3], [0.0, 3.0, 0.0]), "shifted 3.000 mm off the slice normal"),
    "orientation": (
        lambda p: _edit(p[1], ImageOrientationPatient=[0, 1, 0, 1, 0, 0]),
        "ImageOrientationPatient .* differs",
    ),
    "pixel spacing": (lambda p: _edit(p[1], PixelSpacing=[1, 1]), "PixelSpacing .* differs"),
    "no position": (lambda p: _edit(p[1], ImagePositionPatient=None), "ImagePositionPatient is missing"),
    "garbage file": (lambda p: p[0].with_name("notes.txt").write_text("not dicom"), "notes.txt: not a DICOM file"),
    "truncated": (lambda p: p[1].write_bytes(p[1].read_bytes()[:-20]), "CT_0001.dcm: pixel data cannot be decoded"),
}


@pytest.mark.parametrize("defect", CT_DEFECTS)
def test_ct_defects_raise_input_error(tmp_path, defect):
    damage, message = CT_DEFECTS[defect]
    damage(_write_ct(tmp_path))
    with pytest.raises(InputError, match=message):
        read_ct_series(tmp_path)


def test_ct_empty_or_missing_folder(tmp_path):
    with pytest.raises(InputError, match="no files"):
        read_ct_series(tmp_path)
    with pytest.raises(InputError, match="does not exist"):
        read_ct_series(tmp_path / "nope")


def test_frame_of_reference_of_mixed_folder_and_of_a_file(tmp_path):
    paths = _write_ct(tmp_path)
    _edit(paths[0], FrameOfReferenceUID="1.2.3.4")
    assert read_frame_of_reference(paths[1]) == UIDS["frame_of_reference_uid"]
    with pytest.raises(InputError, match="2 different FrameOfReferenceUIDs"):
        read_frame_of_reference(tmp_path)


def _dose(shape=(7, 6, 5)) -> np.ndarray:
    return np.random.default_rng(1).uniform(0, 70, shape)


@AFFINES
@pytest.mark.parametrize("bits", [16, 32])
def test_rtdose_round_trip(tmp_path, affine, bits):
    dose = _dose()
    path = _write_dose(tmp_path / "RD.dcm", dose, affine, bits)
    ds = pydicom.dcmread(path)
    assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (bits, bits, bits - 1, 0)
    assert ds.pixel_array.max() == 2**bits - 2  # the maximum dose uses the range
    assert (ds.DoseUnits, ds.DoseType, ds.DoseSummationType) == ("GY", "PHYSICAL", "PLAN")
    assert ds.FrameIncrementPointer == 0x3004000C and float(ds.GridFrameOffsetVector[0]) == 0
    assert ds.FrameOfReferenceUID == UIDS["frame_of_reference_uid"] and ds.NumberOfFrames == 5
    image = rtdose_to_nifti(path)
    quantum = dose.max() / (2**bits - 2)
    np.testing.assert_allclose(image.get_fdata(), dose, atol=quantum / 2 + 1e-6 * (bits == 32))
    np.testing.assert_allclose(image.affine, affine, atol=1e-9)


def test_rtdose_grid_scaling_applied_and_writer_deterministic(tmp_path):
    path = _write_dose(tmp_path / "RD.dcm", _dose())
    assert path.read_bytes() == _write_dose(tmp_path / "again.dcm", _dose()).read_bytes()
    _edit(path, DoseGridScaling=float(pydicom.dcmread(path).DoseGridScaling) * 2)
    np.testing.assert_allclose(rtdose_to_nifti(path).get_fdata(), _dose() * 2, atol=2 * 70 / 65534)


def test_rtdose_marker_at_hand_computed_lps_position(tmp_path):
    dose = np.zeros((7, 6, 5))
    dose[2, 3, 1] = 60.0
    ds = pydicom.dcmread(_write_dose(tmp_path / "RD.dcm", dose))
    np.testing.assert_allclose([float(v) for v in ds.ImagePositionPatient], [-40.0, -25.0, -10.0])
    np.testing.assert_allclose([float(v) for v in ds.ImageOrientationPatient], [1, 0, 0, 0, 1, 0])
    np.testing.assert_allclose([float(v) for v in ds.PixelSpacing], [1.5, 2.0])
    np.testing.assert_allclose([float(v) for v in ds.GridFrameOffsetVector], [0, 2.5, 5, 7.5, 10])
    assert np.argwhere(ds.pixel_array).tolist() == [[1, 3, 2]]  # (frame, row, column)
    flipped = pydicom.dcmread(_write_dose(tmp_path / "flipped.dcm", dose, FLIPPED))
    np.testing.assert_allclose([float(v) for v in flipped.ImageOrientationPatient], [1, 0, 0, 0, -1, 0])
    # The normal is row x column = -z, so frames going up in z have decreasing offsets.
    np.testing.assert_allclose([float(v) for v in flipped.GridFrameOffsetVector], [0, -2.5, -5, -7.5, -10])


def test_rtdose_decreasing_offsets(tmp_path):
    """Same geometry stored inferior to superior -> superior to inferior (negative step)."""
    dose = _dose()
    path = _write_dose(tmp_path / "RD.dcm", dose)
    ds = pydicom.dcmread(path)
    frames = ds.pixel_array[::-1].copy()
    ipp = [float(v) for v in ds.ImagePositionPatient]
    ds.ImagePositionPatient = [ipp[0], ipp[1], ipp[2] + 4 * 2.5]
    ds.GridFrameOffsetVector = [0, -2.5, -5, -7.5, -10]
    ds.PixelData = frames.tobytes()
    ds.save_as(path)
    image = rtdose_to_nifti(path)
    np.testing.assert_allclose(image.get_fdata()[..., ::-1], dose, atol=70 / 65534)
    flip_k = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, -1, 4], [0, 0, 0, 1]])  # k -> 4 - k for 5 frames
    np.testing.assert_allclose(image.affine @ flip_k, STANDARD, atol=1e-9)


def test_rtdose_absolute_offsets(tmp_path):
    dose = _dose()
    path = _write_dose(tmp_path / "RD.dcm", dose)
    _edit(path, GridFrameOffsetVector=[-10.0, -7.5, -5.0, -2.5, 0.0])  # z of each frame; IPP z = -10
    image = rtdose_to_nifti(path)
    np.testing.assert_allclose(image.affine, STANDARD, atol=1e-9)
    np.testing.assert_allclose(image.get_fdata(), dose, atol=70 / 65534)


def test_pydicom_rtdose_is_relative_and_read_on_request():
    path = get_testdata_file("rtdose.dcm")
    with pytest.raises(InputError, match=r"DoseUnits is 'RELATIVE', expected 'GY'"):
        rtdose_to_nifti(path)
    image = rtdose_to_nifti(path, accept_relative=True)
    assert image.shape == (10, 10, 15)
    expected = [[-10, 0, 0, -189.43125], [0, -10, 0, -199.43125], [0, 0, 5, -761.87], [0, 0, 0, 1]]
    np.testing.assert_allclose(image.affine, expected)  # IPP (189.4, 199.4, -761.9) LPS, x and y negated
    raw = pydicom.dcmread(path).pixel_array  # (frames, rows, columns)
    np.testing.assert_allclose(image.get_fdata(), np.transpose(raw, (2, 1, 0)) * 1e-6, rtol=1e-6)


RTDOSE_DEFECTS = {
    "offsets length": (dict(GridFrameOffsetVector=[0, 2.5, 5]), "has 3 values for 5 frame"),
    "uneven offsets": (dict(GridFrameOffsetVector=[0, 2.5, 5, 8, 10]), "not evenly spaced"),
    "offset origin": (dict(GridFrameOffsetVector=[3, 5.5, 8, 10.5, 13]), r"neither relative .* -10\.000 mm"),
    "units": (dict(DoseUnits="CGY"), "DoseUnits is 'CGY'"),
    "scaling": (dict(DoseGridScaling=None), "DoseGridScaling is missing"),
    "modality": (dict(Modality="CT"), "Modality is 'CT', expected 'RTDOSE'"),
}


@pytest.mark.parametrize("defect", RTDOSE_DEFECTS)
def test_rtdose_defects_raise_input_error(tmp_path, defect):
    edits, message = RTDOSE_DEFECTS[defect]
    path = _write_dose(tmp_path / "RD.dcm", _dose())
    _edit(path, **edits)
    with pytest.raises(InputError, match=message):
        rtdose_to_nifti(path)


def test_pydicom_rtdose_1frame_is_malformed():
    with pytest.raises(InputError, match=r"rtdose_1frame\.dcm: GridFrameOffsetVector has 15 values for 1 frame"):
        rtdose_to_nifti(get_testdata_file("rtdose_1frame.dcm"), accept_relative=True)


def test_single_frame_dose_needs_slice_thickness(tmp_path):
    path = _write_dose(tmp_path / "RD.dcm", _dose((7, 6, 1)))
    assert rtdose_to_nifti(path).affine[2, 2] == 2.5
    _edit(path, SliceThickness=None)
    with pytest.raises(InputError, match="SliceThickness is missing"):
        rtdose_to_nifti(path)


def test_garbage_and_truncated_dose(tmp_path):
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(np.random.default_rng(0).bytes(600))
    with pytest.raises(InputError, match="garbage.dcm: not a DICOM file"):
        rtdose_to_nifti(garbage)
    path = _write_dose(tmp_path / "RD.dcm", _dose())
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(InputError, match="RD.dcm: pixel data cannot be decoded"):
        rtdose_to_nifti(path)


def test_dciodvfy_if_installed(tmp_path):
    """dicom3tools' validator (not installed by us; dicom3tools crashes on 32-bit dose, so 16-bit only)."""
    dciodvfy = shutil.which("dciodvfy")
    if dciodvfy is None:
        pytest.skip("dciodvfy not installed")
    for path in [_write_ct(tmp_path / "ct")[0], _write_dose(tmp_path / "RD.dcm", _dose())]:
        result = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True)
        assert "Error" not in result.stdout + result.stderr, result.stdout + result.stderr


def test_corrupt_element_is_unreadable(tmp_path):
    path = _write_ct(tmp_path)[0]
    tag = b"\x20\x00\x32\x00DS"  # ImagePositionPatient, explicit VR little endian
    assert tag in path.read_bytes()
    path.write_bytes(path.read_bytes().replace(tag, b"\x20\x00\x32\x00ZZ"))
    with pytest.raises(InputError, match=r"CT_0000\.dcm: unreadable DICOM \(NotImplementedError"):
        read_ct_series(tmp_path)


@pytest.mark.filterwarnings("ignore:Invalid value for VR DS")
@pytest.mark.parametrize(
    "value, message",
    [
        (["1", "2"], r"ImagePositionPatient has 2 values \[1\.0, 2\.0\], expected 3"),
        (["1", "nan", "2"], r"ImagePositionPatient = \[1\.0, nan, 2\.0\] is not finite"),
    ],
)
def test_bad_numeric_attribute(tmp_path, value, message):
    _edit(_write_ct(tmp_path)[1], ImagePositionPatient=value)
    with pytest.raises(InputError, match=message):
        read_ct_series(tmp_path)


def test_missing_frame_of_reference_in_one_file(tmp_path):
    _edit(_write_ct(tmp_path)[2], FrameOfReferenceUID=None)
    with pytest.raises(InputError, match=r"FrameOfReferenceUID is missing in 1 file\(s\): \['CT_0002\.dcm'\]"):
        read_ct_series(tmp_path)


def test_multiframe_ct_is_refused(tmp_path):
    _edit(_write_ct(tmp_path)[0], NumberOfFrames=2)
    with pytest.raises(InputError, match="multi-frame CT .* not supported"):
        read_ct_series(tmp_path)


@pytest.mark.parametrize(
    "edits, message",
    [
        (dict(DoseGridScaling=0), "DoseGridScaling is 0.0, expected > 0"),
        (dict(SamplesPerPixel=3), "SamplesPerPixel is 3, expected 1"),
    ],
)
def test_more_rtdose_defects(tmp_path, edits, message):
    path = _write_dose(tmp_path / "RD.dcm", _dose())
    _edit(path, **edits)
    with pytest.raises(InputError, match=message):
        rtdose_to_nifti(path)


def test_non_numeric_attribute(tmp_path):
    path = _write_dose(tmp_path / "RD.dcm", _dose())
    ds = pydicom.dcmread(path)
    del ds.PixelSpacing
    ds.add_new(0x00280030, "LO", "two mm")  # text where numbers belong
    ds.save_as(path)
    with pytest.raises(InputError, match="PixelSpacing = 'two mm' is not numeric"):
        rtdose_to_nifti(path)


def test_single_frame_dose_with_zero_thickness(tmp_path):
    path = _write_dose(tmp_path / "RD.dcm", _dose((7, 6, 1)))
    _edit(path, SliceThickness=0)
    with pytest.raises(InputError, match="single-frame dose with SliceThickness 0.0; expected > 0 mm"):
        rtdose_to_nifti(path)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda d: _write_dose(d / "RD.dcm", _dose(), bits=8), "bits must be 16 or 32, got 8"),
        (lambda d: _write_dose(d / "RD.dcm", _dose()[0]), r"dose_gy must be a 3-D volume .* \(6, 5\)"),
        (lambda d: _write_dose(d / "RD.dcm", -_dose()), "dose_gy must be finite and >= 0"),
        (lambda d: _write_ct(d, hu=_hu()[0]), r"hu must be a 3-D volume .* \(5, 4\)"),
        (lambda d: _write_ct(d, hu=_hu() * 100), "does not fit 16-bit CT"),
    ],
)
def test_writer_rejects_bad_input(tmp_path, call, message):
    with pytest.raises(ValueError, match=message):
        call(tmp_path)
