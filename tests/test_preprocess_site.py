"""``psp-client preprocess`` on a copy of the tiny cohort's training site with one broken case per kind of
bad input: each is reported with its id and reason, and every other case goes on."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from typer.testing import CliRunner

from client.cli import app
from psp_model.errors import CaseError
from psp_model.preprocess.pipeline import PreprocessSettings, preprocess_site
from psp_model.sites import load_site_config

pytestmark = pytest.mark.slow

GOOD = ("Burdenko-GBM-001", "Burdenko-GBM-002")


def _rows(site_root: Path) -> list[dict[str, str]]:
    with (site_root / "clinical.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def _write_rows(site_root: Path, rows: list[dict[str, str]]) -> None:
    with (site_root / "clinical.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _edit_nifti(path: Path, change) -> None:
    image = nib.load(path)
    data = change(np.asarray(image.dataobj, dtype=np.float32))
    nib.save(nib.Nifti1Image(data, image.affine), path)


def _shift_dicom(paths, mm: float) -> None:
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.ImagePositionPatient = [float(v) + mm for v in ds.ImagePositionPatient]
        ds.save_as(path)


BREAKAGES = {
    "Burdenko-GBM-003": ("truncated", lambda case: case.joinpath("t1ce.nii.gz").write_bytes(
        case.joinpath("t1ce.nii.gz").read_bytes()[:2000])),
    "Burdenko-GBM-004": ("NaN/inf", lambda case: _edit_nifti(
        case / "flair.nii.gz", lambda d: np.where(d > d.mean(), np.nan, d))),
    "Burdenko-GBM-005": ("flair", lambda case: (case / "flair.nii.gz").unlink()),
    "Burdenko-GBM-006": ("grid", lambda case: nib.save(nib.Nifti1Image(
        np.asarray(nib.load(case / "flair.nii.gz").dataobj)[:-2], nib.load(case / "flair.nii.gz").affine),
        case / "flair.nii.gz")),
    "Burdenko-GBM-007": ("empty lesion", lambda case: _edit_nifti(case / "lesion.nii.gz", np.zeros_like)),
    "Burdenko-GBM-008": ("lies inside the dose grid, below the bound", lambda case: _shift_dicom([case / "rtdose.dcm"], 300.0)),
    "Burdenko-GBM-009": ("GridFrameOffsetVector", lambda case: _malformed_dose(case / "rtdose.dcm")),
    "Burdenko-GBM-010": ("different FrameOfReferenceUIDs", lambda case: _mixed_frames(case / "ct")),
    "Burdenko-GBM-011": ("rotation|overlap|registration", lambda case: [
        _edit_nifti(case / name, lambda d: d[:, :, ::-1]) for name in ("t1ce.nii.gz", "flair.nii.gz", "lesion.nii.gz")]),
    # Garbage files: each must become this case's QC row, never an exception that stops the site.
    "Burdenko-GBM-016": ("t1ce is not a readable NIfTI file.*Empty file",
                         lambda case: (case / "t1ce.nii.gz").write_bytes(b"")),
    "Burdenko-GBM-017": ("flair is not a readable NIfTI file.*not a gzip file",
                         lambda case: (case / "flair.nii.gz").write_bytes(_noise(5000))),
    "Burdenko-GBM-018": (r"CT_\d+\.dcm: pixel data cannot be decoded .*less than expected",
                         lambda case: _cut(_middle_ct(case), -3001)),
    "Burdenko-GBM-019": (r"CT_\d+\.dcm: not a DICOM file", lambda case: _middle_ct(case).write_bytes(_noise(4000))),
    "Burdenko-GBM-020": ("rtdose.dcm: Modality is 'CT', expected 'RTDOSE'",
                         lambda case: shutil.copy(_middle_ct(case), case / "rtdose.dcm")),
    "Burdenko-GBM-021": (r"CT_\d+\.dcm: pixel data cannot be decoded .*less than expected",
                         lambda case: _halve_pixel_data(_middle_ct(case))),
    "Burdenko-GBM-022": (r"CT_\d+\.dcm: .* is missing", lambda case: _cut(_middle_ct(case), 1000)),
}


def _noise(n_bytes: int) -> bytes:
    return np.random.default_rng(7).integers(0, 256, n_bytes, dtype=np.uint8).tobytes()


def _middle_ct(case: Path) -> Path:
    slices = sorted((case / "ct").iterdir())
    return slices[len(slices) // 2]


def _cut(path: Path, end: int) -> None:
    """Keep the bytes before ``end`` (a copy interrupted in the header, or inside the pixel data)."""
    path.write_bytes(path.read_bytes()[:end])


def _halve_pixel_data(path: Path) -> None:
    """A well-formed file whose PixelData holds half of Rows * Columns pixels."""
    ds = pydicom.dcmread(path)
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    ds.save_as(path)


def _malformed_dose(path: Path) -> None:
    """pydicom's rtdose_1frame.dcm (15 frame offsets for 1 frame), in Gy and in this case's frame."""
    frame = pydicom.dcmread(path).FrameOfReferenceUID
    ds = pydicom.dcmread(get_testdata_file("rtdose_1frame.dcm"))
    ds.DoseUnits, ds.FrameOfReferenceUID = "GY", frame
    ds.save_as(path)


def _mixed_frames(ct_dir: Path) -> None:
    first = sorted(ct_dir.iterdir())[0]
    ds = pydicom.dcmread(first)
    ds.FrameOfReferenceUID = pydicom.uid.generate_uid()
    ds.save_as(first)


CLINICAL_BREAKAGES = {
    "Burdenko-GBM-012": ("not a number", {"age": "abc"}),
    "Burdenko-GBM-013": ("did you mean 'mutant'", {"idh": "Mutant"}),
    "Burdenko-GBM-014": ("no row", None),
    "Burdenko-GBM-015": ("appears 2 times", "duplicate"),
}


@pytest.fixture(scope="module")
def broken_site(tiny_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of burdenko with 2 good cases, one broken case per bad input, and a ghost clinical row."""
    out = tmp_path_factory.mktemp("broken")
    source = tiny_cohort / "burdenko"
    keep = set(GOOD) | set(BREAKAGES) | set(CLINICAL_BREAKAGES)
    root = out / "burdenko"
    root.mkdir()
    for case in sorted(keep):
        shutil.copytree(source / case, root / case)
    rows = [r for r in _rows(source) if r["case_id"] in keep]
    for case_id, (_, breakage) in BREAKAGES.items():
        breakage(root / case_id)
    for case_id, (_, change) in CLINICAL_BREAKAGES.items():
        row = next(r for r in rows if r["case_id"] == case_id)
        if change is None:
            rows.remove(row)
        elif change == "duplicate":
            rows.append(dict(row))
        else:
            row.update(change)
    rows.append({**rows[0], "case_id": "GHOST-001"})
    _write_rows(root, rows)
    config = out / "burdenko.yaml"
    config.write_text(f"name: burdenko\nroles: [train]\nlayout: psp-case\nroot: {root}\nwork_dir: {out / 'work'}\n")
    return config


@pytest.fixture(scope="module")
def first_run(broken_site: Path):
    site = load_site_config(broken_site)
    return site, preprocess_site(site, PreprocessSettings(profile="tiny"), progress=False)


def test_each_bad_input_is_reported_and_the_others_go_on(first_run) -> None:
    site, run = first_run
    by_id = {r.case_id: r for r in run.results}
    for case_id in GOOD:
        assert by_id[case_id].status == "ok", by_id[case_id].reason
    expected = {case_id: pattern for case_id, (pattern, _) in {**BREAKAGES, **CLINICAL_BREAKAGES}.items()}
    expected["GHOST-001"] = "no folder"
    for case_id, pattern in expected.items():
        result = by_id[case_id]
        assert result.status == "error", case_id
        assert __import__("re").search(pattern, result.reason), f"{case_id}: {result.reason!r} lacks {pattern!r}"
    qc = json.loads(run.qc_json.read_text())
    assert qc["summary"] == {"cases": len(run.results), "ok": len(GOOD), "error": len(expected)}
    table = run.qc_markdown.read_text()
    assert all(case_id in table for case_id in expected)
    with run.features_csv.open(newline="") as handle:
        features = {row["case_id"]: row for row in csv.DictReader(handle)}
    assert set(features) == set(GOOD)
    assert all(float(features[c]["dose_d98"]) > 0 for c in GOOD)


def test_a_rerun_skips_cases_whose_inputs_did_not_change(first_run, broken_site: Path) -> None:
    site, _ = first_run
    good = site.root / GOOD[0]
    _edit_nifti(good / "flair.nii.gz", lambda d: d * 1.01)
    rerun = preprocess_site(site, PreprocessSettings(profile="tiny"), progress=False)
    cached = {r.case_id: r.cached for r in rerun.results if r.stage != "layout"}
    assert cached[GOOD[0]] is False
    assert cached[GOOD[1]] is True and cached["Burdenko-GBM-003"] is True


def test_strict_makes_any_case_error_fatal(first_run) -> None:
    site, _ = first_run
    with pytest.raises(CaseError, match="--strict"):
        preprocess_site(site, PreprocessSettings(profile="tiny"), progress=False, strict=True)


def test_cli_exit_status(broken_site: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    ok = runner.invoke(app, ["preprocess", "--site-config", str(broken_site), "--profile", "tiny"])
    assert ok.exit_code == 0, ok.output
    assert "Burdenko-GBM-005" in ok.output and "QC report" in ok.output
    bad_config = tmp_path / "bad.yaml"
    bad_config.write_text("name: x\nroles: [train]\nlayout: psp-case\nroot: /nonexistent\ncolour: blue\n")
    config_error = runner.invoke(app, ["preprocess", "--site-config", str(bad_config)])
    assert config_error.exit_code == 2
    assert "colour" in config_error.output and "root" in config_error.output
    empty_root = tmp_path / "empty"
    empty_root.mkdir()
    (empty_root / "clinical.csv").write_text("case_id,label,age,sex,idh,mgmt,days_since_rt\n")
    nothing = tmp_path / "nothing.yaml"
    nothing.write_text(f"name: x\nroles: [train]\nlayout: psp-case\nroot: {empty_root}\n"
                       f"work_dir: {tmp_path / 'work'}\n")
    none_usable = runner.invoke(app, ["preprocess", "--site-config", str(nothing), "--profile", "tiny"])
    assert none_usable.exit_code == 1 and "no case could be processed" in none_usable.output
