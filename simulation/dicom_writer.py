"""Write a synthetic planning CT series and RT dose as DICOM, the way a treatment planning system would.

Geometry (LPS) comes from :mod:`psp_model.preprocess.dicom`, the only module that knows LPS <-> RAS.
Output is a pure function of the inputs and seeds: UIDs derive from ``uid_seed``, no clock is read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, RTDoseStorage, RTPlanStorage, generate_uid
from pydicom.valuerep import format_number_as_ds

from psp_model.preprocess.dicom import geometry_from_affine_ras, slice_positions, volume_to_frames

__all__ = ["make_uid", "write_ct_series", "write_rtdose"]

CT_RESCALE_INTERCEPT = -1024
"""Stored CT value = HU + 1024 (signed 16 bit): covers -33792 .. 31743 HU."""


def make_uid(seed: str) -> str:
    """A DICOM UID that is the same for the same seed (pydicom's prefix + a hash of the seed)."""
    return generate_uid(entropy_srcs=[seed])


def _ds(values: np.ndarray | float) -> list[str] | str:
    """DS strings of at most 16 characters (pydicom refuses longer ones on write), no ``-0.0``."""
    if np.ndim(values) == 0:
        return format_number_as_ds(float(values) + 0.0)
    return [format_number_as_ds(float(v) + 0.0) for v in np.asarray(values, dtype=float).ravel()]


def _base_dataset(
    sop_class_uid: str,
    sop_instance_uid: str,
    *,
    modality: str,
    series_uid: str,
    frame_of_reference_uid: str,
    study_uid: str,
    patient_id: str,
) -> Dataset:
    """Patient, study, series, frame of reference, equipment and SOP common modules with file meta."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_instance_uid
    ds.PatientName = patient_id
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = ""
    ds.StudyTime = ""
    ds.ReferringPhysicianName = ""
    ds.StudyID = ""
    ds.AccessionNumber = ""
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 1
    ds.FrameOfReferenceUID = frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = "psp-fl simulation"
    return ds


def _plane(ds: Dataset, geometry: dict, position: np.ndarray) -> None:
    ds.ImagePositionPatient = _ds(position)
    ds.ImageOrientationPatient = _ds(geometry["orientation"])
    ds.PixelSpacing = _ds(geometry["pixel_spacing"])
    ds.SliceThickness = _ds(abs(geometry["slice_step"]))


def write_ct_series(
    hu: np.ndarray,
    affine_ras: np.ndarray,
    out_dir: Path,
    *,
    frame_of_reference_uid: str,
    study_uid: str,
    patient_id: str,
    uid_seed: str,
) -> list[Path]:
    """Write one CT Image Storage file per slice, ``out_dir/CT_%04d.dcm``.

    Args:
        hu: Hounsfield units, shape ``(I, J, K)`` indexed like nibabel (K along the slice normal);
            rounded to integers.
        affine_ras: 4x4 RAS affine of ``hu`` (no shear).
        out_dir: created if missing; existing files of the same names are overwritten.
        frame_of_reference_uid, study_uid, patient_id: shared with the RT dose of the same plan.
        uid_seed: seeds the series and SOP instance UIDs.

    Returns:
        The written paths, slice 0 first.

    :func:`psp_model.preprocess.dicom.read_ct_series` gives back ``hu`` and ``affine_ras`` exactly when
    ``det(affine_ras) > 0`` (any RAS+ affine): slices are read in increasing order along row x column.
    Otherwise it returns the same image with the k axis reversed.
    """
    hu = np.asarray(hu)
    if hu.ndim != 3:
        raise ValueError(f"hu must be a 3-D volume (I, J, K), got shape {hu.shape}")
    stored = np.rint(hu.astype(np.float64)) - CT_RESCALE_INTERCEPT
    info = np.iinfo(np.int16)
    if stored.min() < info.min or stored.max() > info.max:
        raise ValueError(
            f"hu range {hu.min()} .. {hu.max()} does not fit 16-bit CT with intercept {CT_RESCALE_INTERCEPT}"
        )
    frames = volume_to_frames(stored.astype(np.int16))
    geometry = geometry_from_affine_ras(affine_ras)
    positions = slice_positions(
        geometry["first_position"], geometry["orientation"], geometry["slice_step"], len(frames)
    )
    series_uid = make_uid(f"{uid_seed}/ct/series")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    paths = []
    for k, (frame, position) in enumerate(zip(frames, positions)):
        ds = _base_dataset(
            CTImageStorage,
            make_uid(f"{uid_seed}/ct/{k}"),
            modality="CT",
            series_uid=series_uid,
            frame_of_reference_uid=frame_of_reference_uid,
            study_uid=study_uid,
            patient_id=patient_id,
        )
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.InstanceNumber = k + 1
        ds.AcquisitionNumber = 1
        ds.KVP = ""
        _plane(ds, geometry, position)
        ds.RescaleIntercept = str(CT_RESCALE_INTERCEPT)
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.set_pixel_data(np.ascontiguousarray(frame), "MONOCHROME2", 16, generate_instance_uid=False)
        path = out_dir / f"CT_{k:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_rtdose(
    dose_gy: np.ndarray,
    affine_ras: np.ndarray,
    path: Path,
    *,
    frame_of_reference_uid: str,
    study_uid: str,
    patient_id: str,
    uid_seed: str,
    bits: Literal[16, 32] = 16,
) -> Path:
    """Write a multi-frame RT Dose Storage file (physical plan dose in Gy, relative frame offsets).

    Args:
        dose_gy: dose, shape ``(I, J, K)`` indexed like nibabel, >= 0.
        affine_ras: 4x4 RAS affine of ``dose_gy`` (no shear); frames follow its K axis.
        path: output file; its folder is created if missing.
        frame_of_reference_uid, study_uid, patient_id: those of the planning CT.
        uid_seed: seeds the series, SOP instance and referenced RT plan UIDs.
        bits: 16 or 32-bit unsigned storage; DoseGridScaling maps the maximum dose near the top
            of the range, so the quantisation step is max / (2**bits - 2).
    """
    if bits not in (16, 32):
        raise ValueError(f"bits must be 16 or 32, got {bits!r}")
    dose = np.asarray(dose_gy, dtype=np.float64)
    if dose.ndim != 3:
        raise ValueError(f"dose_gy must be a 3-D volume (I, J, K), got shape {dose.shape}")
    if not np.isfinite(dose).all() or dose.min() < 0:
        raise ValueError(f"dose_gy must be finite and >= 0, got range {np.nanmin(dose)} .. {np.nanmax(dose)}")
    dtype = np.uint16 if bits == 16 else np.uint32
    # One count of headroom: the 16-character DS string may round the scaling down.
    scaling = _ds(dose.max() / (np.iinfo(dtype).max - 1)) if dose.max() > 0 else "1"
    frames = volume_to_frames(np.rint(dose / float(scaling)).astype(dtype))
    geometry = geometry_from_affine_ras(affine_ras)

    ds = _base_dataset(
        RTDoseStorage,
        make_uid(f"{uid_seed}/rtdose/instance"),
        modality="RTDOSE",
        series_uid=make_uid(f"{uid_seed}/rtdose/series"),
        frame_of_reference_uid=frame_of_reference_uid,
        study_uid=study_uid,
        patient_id=patient_id,
    )
    ds.OperatorsName = ""
    ds.InstanceNumber = 1
    _plane(ds, geometry, geometry["first_position"])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.NumberOfFrames = len(frames)
    ds.FrameIncrementPointer = 0x3004000C
    ds.Rows, ds.Columns = frames.shape[1], frames.shape[2]
    ds.BitsAllocated = bits
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    ds.DoseUnits = "GY"
    ds.DoseType = "PHYSICAL"
    ds.DoseSummationType = "PLAN"
    ds.GridFrameOffsetVector = _ds(np.arange(len(frames)) * geometry["slice_step"])
    ds.DoseGridScaling = scaling
    plan = Dataset()
    plan.ReferencedSOPClassUID = RTPlanStorage
    plan.ReferencedSOPInstanceUID = make_uid(f"{uid_seed}/rtplan/instance")
    ds.ReferencedRTPlanSequence = [plan]
    ds.PixelData = np.ascontiguousarray(frames).astype(f"<u{bits // 8}", copy=False).tobytes()
    ds["PixelData"].VR = "OW"

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
