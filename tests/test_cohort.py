"""The synthetic cohort generator: determinism, geometry, truth and the files it writes."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from nibabel.affines import apply_affine
from scipy.spatial.transform import Rotation
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from psp_model import schema
from psp_model.layouts import read_site
from psp_model.preprocess.dicom import read_ct_series, read_frame_of_reference
from psp_model.preprocess.dose import dose_features, rtdose_to_nifti
from psp_model.sites import load_site_config
from simulation import phantom
from simulation.cli import app
from simulation.cohort import generate_cohort, truth_mr_to_ct
from simulation.profiles import PROFILES, Profile

TINY = PROFILES["tiny"]
MINI = Profile("mini", voxel_mm=3.0, sites=(
    replace(TINY.site("burdenko"), n_cases=2),
    replace(TINY.site("brats2021"), n_cases=1),
    replace(TINY.site("ucsf_pdgm"), n_cases=1, ucsf_brats_duplicates=1),
))
"""Test-only sub-profile: a psp-case site (CT, dose, labels) and one BraTS phantom repeated by UCSF."""


def _truth(cohort: Path) -> list[dict]:
    with (cohort / "truth.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_files_other_seed_other_cohort(tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        generate_cohort(tmp_path / name, seed=seed, profile=MINI, progress=False)
    first, again, other = (_files(tmp_path / name) for name in "abc")
    assert len(first) > 20 and first.keys() == again.keys() == other.keys()
    assert [k for k in first if first[k] != again[k]] == []
    changed = [k for k in first if first[k] != other[k]]
    assert "truth.csv" in changed and "burdenko/Burdenko-GBM-001/t1ce.nii.gz" in changed
    assert "burdenko/Burdenko-GBM-001/rtdose.dcm" in changed


def test_every_site_config_loads_and_lists_all_cases(tiny_cohort):
    configs = sorted((tiny_cohort / "site_configs").glob("*.yaml"))
    assert [p.stem for p in configs] == sorted(s.name for s in TINY.sites)
    for path in configs:
        site = load_site_config(path)
        spec = TINY.site(site.name)
        assert site.root == (tiny_cohort / spec.name).resolve()
        assert (site.layout, site.roles, site.enhancing_labels) == (spec.layout, spec.roles, (1, 4))
        listing = read_site(site)
        assert listing.problems == [] and len(listing.cases) == spec.n_cases
        for case in listing.cases:
            assert all(p.is_file() for p in case.mr.values())
            if site.layout == "psp-case":
                assert case.lesion.is_file() and case.rtdose.is_file() and case.ct_dir.is_dir()
                assert case.clinical is not None and case.clinical["label"] in schema.LABELS


def test_clinical_csv_matches_truth(tiny_cohort):
    truth = {row["case_id"]: row for row in _truth(tiny_cohort)}
    names = {v: k for k, v in schema.LABELS.items()}
    for site in ("burdenko", "uker"):
        with (tiny_cohort / site / schema.CLINICAL_FILE).open(newline="") as handle:
            reader = csv.DictReader(handle)
            assert tuple(reader.fieldnames) == schema.CLINICAL_COLUMNS
            for row in reader:
                expected = truth[row["case_id"]]
                assert row["label"] == names[int(expected["label"])]
                for column in ("age", "sex", "idh", "mgmt", "days_since_rt"):
                    assert row[column] == expected[column]
                for name, allowed in schema.CATEGORICAL.items():
                    assert row[name] in allowed


def test_summary_counts_and_bayes_auc(tiny_cohort):
    summary = json.loads((tiny_cohort / "truth_summary.json").read_text())
    truth = _truth(tiny_cohort)
    assert summary["profile"] == "tiny" and summary["seed"] == 0
    for site in ("burdenko", "uker"):
        rows = [r for r in truth if r["site"] == site]
        labels = [int(r["label"]) for r in rows]
        entry = summary["sites"][site]
        assert (entry["n"], entry["n_tp"]) == (len(rows), sum(labels))
        if entry["bayes_auc"] is not None:
            assert entry["bayes_auc"] == pytest.approx(roc_auc_score(labels, [float(r["p_tp"]) for r in rows]))
    assert summary["sites"]["ucsf_pdgm"]["same_phantom_as"] == {
        "UCSF-PDGM-0004": "BraTS2021_00000", "UCSF-PDGM-0005": "BraTS2021_00002"}


def test_rigid_offsets_within_bounds_and_match_their_parameters(tiny_cohort):
    for row in _truth(tiny_cohort):
        matrix = truth_mr_to_ct(row)
        rotvec = np.array([float(row[k]) for k in ("rot_x_deg", "rot_y_deg", "rot_z_deg")])
        shift = np.array([float(row[k]) for k in ("tx_mm", "ty_mm", "tz_mm")])
        assert 0 < np.linalg.norm(rotvec) <= 10.0 and np.linalg.norm(shift) <= 15.0
        np.testing.assert_allclose(matrix[:3, :3], Rotation.from_rotvec(rotvec, degrees=True).as_matrix(), atol=1e-12)
        np.testing.assert_allclose(matrix[:3, 3], shift)
        np.testing.assert_array_equal(matrix[3], [0, 0, 0, 1])


def test_lesion_inside_the_brain_and_where_truth_says_in_every_orientation(tiny_cohort):
    """Lesion labels sit on brain voxels; their centroid mapped by mr_to_ct is the truth's lesion centre."""
    for row in _truth(tiny_cohort):
        folder = tiny_cohort / row["site"] / row["case_id"]
        lesion = nib.load(folder / schema.LESION_FILE)
        expected_axes = "".join(TINY.site(row["site"]).orientation)
        assert "".join(nib.aff2axcodes(lesion.affine)) == expected_axes
        labels = np.asanyarray(lesion.dataobj)
        t1ce = np.asanyarray(nib.load(folder / schema.T1CE_FILE).dataobj)
        assert set(np.unique(labels)) <= {0, 1, 2, 4} and (labels == 4).any()
        assert np.all(t1ce[labels > 0] > 0)
        core = np.argwhere(np.isin(labels, (1, 4)))
        centroid_ct = apply_affine(truth_mr_to_ct(row) @ lesion.affine, core).mean(axis=0)
        centre = np.array([float(row[k]) for k in ("lesion_x_mm", "lesion_y_mm", "lesion_z_mm")])
        assert np.linalg.norm(centroid_ct - centre) < 4.0, row["case_id"]


def test_lesion_pattern_follows_u(tiny_cohort):
    """Nodular (high u) lesions have a larger enhancing fraction than thin-rimmed (low u) ones."""
    rows = _truth(tiny_cohort)
    fractions, us = [], []
    for row in rows:
        labels = np.asanyarray(nib.load(tiny_cohort / row["site"] / row["case_id"] / schema.LESION_FILE).dataobj)
        fractions.append((labels == 4).sum() / np.isin(labels, (1, 4)).sum())
        us.append(float(row["u"]))
    assert np.corrcoef(us, fractions)[0, 1] > 0.6


def test_truth_dose_features_are_consistent_and_match_the_pipeline_function(tiny_cohort):
    rows = _truth(tiny_cohort)
    coverages = [float(r["dose_coverage"]) for r in rows]
    assert all(0.0 <= c <= 1.0 for c in coverages) and np.mean(np.equal(coverages, 1.0)) >= 0.8
    for row in rows:
        d = {k: float(row[f"dose_{k}"]) for k in ("mean", "min", "median", "d98")}
        assert d["min"] <= d["d98"] <= d["median"] <= 1.05 * float(row["prescription_gy"])
        assert d["min"] <= d["mean"] <= 1.05 * float(row["prescription_gy"])
    for row in rows[:4]:  # an independent implementation agrees (both read the written files)
        folder = tiny_cohort / row["site"] / row["case_id"]
        features = dose_features(rtdose_to_nifti(folder / schema.RTDOSE_FILE), nib.load(folder / schema.LESION_FILE),
                                 labels=(1, 4), lesion_to_dose=truth_mr_to_ct(row), min_coverage=0.0)
        for key in ("mean", "min", "median", "d98", "coverage"):
            assert features[key] == pytest.approx(float(row[f"dose_{key}"]), abs=1e-6)


def test_dicom_ct_and_dose_read_back_with_one_frame_of_reference_and_the_written_geometry(tiny_cohort):
    template = phantom.load_template(TINY.voxel_mm)
    for site, bits in (("burdenko", 16), ("uker", 32)):
        row = next(r for r in _truth(tiny_cohort) if r["site"] == site)
        folder = tiny_cohort / site / row["case_id"]
        assert read_frame_of_reference(folder / schema.CT_DIR) == read_frame_of_reference(folder / schema.RTDOSE_FILE)
        ct = read_ct_series(folder / schema.CT_DIR)
        np.testing.assert_allclose(ct.affine, template.ct_affine, atol=1e-4)
        assert ct.header.get_zooms() == pytest.approx((3.0, 3.0, 4.5))
        hu = ct.get_fdata()
        np.testing.assert_allclose(hu, template.hu, atol=25)  # + noise, rounding
        assert hu[0, 0, 0] == -1000 and hu.max() > 1000
        dose = rtdose_to_nifti(folder / schema.RTDOSE_FILE)
        spacing = np.linalg.norm(dose.affine[:3, :3], axis=0)
        assert spacing == pytest.approx([TINY.dose_voxel_mm] * 3)
        assert nib.aff2axcodes(dose.affine) == ("L", "P", "S")
        assert all(n < s for n, s in zip(dose.shape, ct.shape))  # a box around the PTV, not the head
        ptv = np.array([float(row[k]) for k in ("ptv_x_mm", "ptv_y_mm", "ptv_z_mm")])
        centre_voxel = np.round(apply_affine(np.linalg.inv(dose.affine), ptv)).astype(int)
        assert dose.get_fdata()[tuple(centre_voxel)] == pytest.approx(float(row["prescription_gy"]), rel=0.05)
        assert pydicom.dcmread(folder / schema.RTDOSE_FILE, stop_before_pixels=True).BitsAllocated == bits


def test_ucsf_duplicate_shows_the_same_phantom_as_its_brats_case(tiny_cohort):
    brats = nib.as_closest_canonical(nib.load(tiny_cohort / "brats2021/BraTS2021_00000/BraTS2021_00000_seg.nii.gz"))
    ucsf = nib.as_closest_canonical(nib.load(
        tiny_cohort / "ucsf_pdgm/UCSF-PDGM-0004_nifti/UCSF-PDGM-0004_tumor_segmentation.nii.gz"))
    np.testing.assert_allclose(ucsf.affine, brats.affine)
    np.testing.assert_array_equal(np.asanyarray(ucsf.dataobj), np.asanyarray(brats.dataobj))
    other = nib.as_closest_canonical(nib.load(
        tiny_cohort / "ucsf_pdgm/UCSF-PDGM-0006_nifti/UCSF-PDGM-0006_tumor_segmentation.nii.gz"))
    assert not np.array_equal(np.asanyarray(other.dataobj), np.asanyarray(brats.dataobj))


def test_sites_differ_like_scanners(tiny_cohort):
    def brain_median(path: Path) -> float:
        data = np.asanyarray(nib.load(path).dataobj)
        return float(np.median(data[data > 0]))

    burdenko = brain_median(tiny_cohort / "burdenko/Burdenko-GBM-001/t1ce.nii.gz")
    uker = brain_median(tiny_cohort / "uker/UKER-001/t1ce.nii.gz")
    assert burdenko / uker == pytest.approx(1000 / 350, rel=0.3)
    assert nib.load(tiny_cohort / "burdenko/Burdenko-GBM-001/t1ce.nii.gz").get_data_dtype() == np.int16


def test_refuses_a_non_empty_folder_that_is_not_a_cohort(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"is not empty and holds no previous cohort .*pass --force"):
        generate_cohort(tmp_path, profile=MINI, progress=False)
    result = CliRunner().invoke(app, ["cohort", "--out", str(tmp_path)])
    assert result.exit_code == 1 and "holds no previous cohort" in result.output
    (tmp_path / "file").write_text("")
    with pytest.raises(FileExistsError, match=r"file is a file; give a folder"):
        generate_cohort(tmp_path / "file", profile=MINI, progress=False)


def test_rewrites_a_previous_cohort_and_force_keeps_other_files(tmp_path):
    small = Profile("one", 3.0, sites=(replace(TINY.site("brats2021"), n_cases=1),))
    generate_cohort(tmp_path, profile=small, progress=False)
    (tmp_path / "brats2021" / "stale.txt").write_text("")
    generate_cohort(tmp_path, profile=small, progress=False)  # a previous cohort: no --force needed
    assert not (tmp_path / "brats2021" / "stale.txt").exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("")
    generate_cohort(other, profile=small, force=True, progress=False)
    assert (other / "keep.txt").is_file() and (other / "truth_summary.json").is_file()


def test_bad_options_are_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "cohort"
    with pytest.raises(ValueError, match=r"unknown profile 'huge'; use one of \['tiny', 'demo', 'full'\]"):
        generate_cohort(out, profile="huge")
    with pytest.raises(ValueError, match=r"workers must be >= 1, got 0"):
        generate_cohort(out, workers=0)
    lonely = Profile("lonely", 3.0, sites=(TINY.site("ucsf_pdgm"),))
    with pytest.raises(ValueError, match=r"site ucsf_pdgm: 2 BraTS duplicates need a brats2021 site"):
        generate_cohort(out, profile=lonely)
    assert not out.exists()


def test_profiles_as_specified():
    counts = {name: {s.name: s.n_cases for s in p.sites} for name, p in PROFILES.items()}
    assert counts["tiny"] == {"burdenko": 24, "uker": 12, "brats2021": 6, "upenn_gbm": 5, "ucsf_pdgm": 5}
    assert counts["demo"] == {"burdenko": 59, "uker": 20, "brats2021": 16, "upenn_gbm": 12, "ucsf_pdgm": 12}
    assert counts["full"] == {"burdenko": 59, "uker": 20, "brats2021": 40, "upenn_gbm": 30, "ucsf_pdgm": 30}
    assert [p.voxel_mm for p in PROFILES.values()] == [3.0, 2.0, 1.0]
    assert [p.dose_voxel_mm for p in PROFILES.values()] == [6.0, 4.0, 2.5]


def test_cli_help_explains_the_profiles():
    result = CliRunner().invoke(app, ["cohort", "--help"])
    assert result.exit_code == 0
    for word in ("tiny", "demo", "full", "--seed", "--force"):
        assert word in result.output


def test_random_rigid_stays_within_its_bounds():
    rng = np.random.default_rng(3)
    for _ in range(200):
        matrix, params = phantom.sample_rigid(rng, max_angle_deg=10.0, max_shift_mm=15.0)
        assert np.linalg.norm(params[:3]) <= 10.0 and np.linalg.norm(params[3:]) <= 15.0
        np.testing.assert_allclose(matrix[:3, :3] @ matrix[:3, :3].T, np.eye(3), atol=1e-12)


def test_partial_dose_grid_cuts_through_a_lesion_away_from_the_ptv():
    template = phantom.load_template(TINY.voxel_mm)
    rng = np.random.default_rng(0)
    plan = phantom.Plan(centre=np.array([-30.0, 0.0, 20.0]), radii_mm=np.full(3, 30.0), prescription_gy=60.0,
                        penumbra_mm=5.0, bath_fraction=0.3, bath_mm=30.0)
    lesion = replace(phantom.sample_lesion(rng, template, 0.5), centre=np.array([40.0, 0.0, 20.0]))
    for partial in (False, True):
        affine, shape = phantom.dose_grid(rng, plan, lesion, spacing_mm=6.0, partial=partial)
        corners = apply_affine(affine, np.array([[0, 0, 0], np.array(shape) - 1]))
        upper_x = corners[:, 0].max()
        if partial:
            assert upper_x < lesion.centre[0] + lesion.extent_mm
        else:
            assert upper_x >= lesion.centre[0] + lesion.extent_mm


def test_ct_brain_follows_the_mr_template_t1():
    """The CT's brain HU is a function of the T1 the MR shows (one anatomy for both), CSF < WM < GM.

    Built from the separate GM/WM maps instead, it sat ~0.15 mm off the T1 and biased MR-to-CT
    registration by as much (bench/README.md). Compared where CT voxels coincide with phantom voxels.
    """
    template = phantom.load_template(TINY.voxel_mm)
    ct_ijk = np.argwhere(np.ones(template.hu.shape, dtype=bool))
    ijk = apply_affine(np.linalg.inv(template.affine) @ template.ct_affine, ct_ijk)
    on_grid = np.all(np.abs(ijk - np.round(ijk)) < 1e-6, axis=1)
    ct_ijk, ijk = ct_ijk[on_grid], np.round(ijk[on_grid]).astype(int)
    deep = template.depth[tuple(ijk.T)] >= 3 * TINY.voxel_mm
    hu = template.hu[tuple(ct_ijk[deep].T)]
    t1 = template.t1[tuple(ijk[deep].T)]
    order = np.argsort(t1)
    close = np.diff(t1[order]) < 1e-4
    assert close.sum() > 1000
    assert np.abs(np.diff(hu[order]))[close].max() < 0.5  # same T1, same HU (from the GM/WM maps: up to 12 HU)
    tissues = {name: np.asarray(getattr(template, name))[tuple(ijk[deep].T)] for name in ("csf", "gm", "wm")}
    dominant = np.argmax(np.stack(list(tissues.values())), axis=0)
    csf, gm, wm = (hu[dominant == k].mean() for k in range(3))
    assert csf < wm < gm


def test_labelled_sites_have_the_published_class_balance(tiny_cohort):
    import csv

    from simulation.cohort import assign_labels

    rows = list(csv.DictReader((tiny_cohort / "truth.csv").open()))
    for site, n, fraction in (("burdenko", 24, 34 / 59), ("uker", 12, 11 / 20)):
        labels = [int(r["label"]) for r in rows if r["site"] == site]
        assert len(labels) == n and sum(labels) == round(fraction * n)
    rng = np.random.default_rng(3)
    many = [{"logit": float(x), "label_draw": float(d)} for x, d in zip(rng.normal(0, 2, 400), rng.uniform(size=400))]
    assign_labels(many, 0.3)
    assert sum(r["label"] for r in many) == 120
    assert abs(np.mean([r["p_tp"] for r in many]) - 0.3) < 1e-6
