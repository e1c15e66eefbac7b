"""Layout readers on the generated sites (and broken copies of them); site config validation errors."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml

from psp_model import schema
from psp_model.errors import ConfigError
from psp_model.layouts import read_site
from psp_model.layouts.psp_case import read_psp_case
from psp_model.layouts.public import read_brats2021, read_ucsf_pdgm, read_upenn_gbm
from psp_model.sites import load_site_config


def _psp_skeleton(cohort: Path, site: str, target: Path) -> Path:
    """clinical.csv plus empty case folders: all the psp-case reader looks at."""
    target.mkdir()
    shutil.copy(cohort / site / schema.CLINICAL_FILE, target / schema.CLINICAL_FILE)
    for folder in (cohort / site).iterdir():
        if folder.is_dir():
            (target / folder.name).mkdir()
    return target


def test_psp_case_reader_on_the_generated_sites(tiny_cohort):
    for site, n in (("burdenko", 24), ("uker", 12)):
        listing = read_psp_case(tiny_cohort / site)
        assert listing.problems == [] and len(listing.cases) == n
        case = listing.cases[0]
        assert case.mr == {"t1ce": case.folder / schema.T1CE_FILE, "flair": case.folder / schema.FLAIR_FILE}
        assert (case.lesion, case.ct_dir, case.rtdose) == (
            case.folder / schema.LESION_FILE, case.folder / schema.CT_DIR, case.folder / schema.RTDOSE_FILE)
        assert set(case.clinical) == set(schema.CLINICAL_COLUMNS) and case.clinical["case_id"] == case.case_id


def test_clinical_row_without_folder_is_a_problem(tiny_cohort, tmp_path):
    root = _psp_skeleton(tiny_cohort, "burdenko", tmp_path / "site")
    (root / "Burdenko-GBM-003").rmdir()
    listing = read_psp_case(root)
    assert [p.case_id for p in listing.problems] == ["Burdenko-GBM-003"]
    assert re.search(r"has a row in clinical\.csv but no folder .*Burdenko-GBM-003", listing.problems[0].reason)
    assert len(listing.cases) == 23


def test_duplicate_case_ids_are_a_problem(tiny_cohort, tmp_path):
    root = _psp_skeleton(tiny_cohort, "uker", tmp_path / "site")
    lines = (root / schema.CLINICAL_FILE).read_text().splitlines()
    duplicate = next(line for line in lines if line.startswith("UKER-002,"))
    (root / schema.CLINICAL_FILE).write_text("\n".join([*lines, duplicate]) + "\n")
    listing = read_psp_case(root)
    assert [(p.case_id, p.reason) for p in listing.problems] == [
        ("UKER-002", "appears 2 times in clinical.csv; case ids must be unique")]
    assert "UKER-002" not in {c.case_id for c in listing.cases} and len(listing.cases) == 11


def test_folder_without_clinical_row_is_listed_without_clinical(tiny_cohort, tmp_path):
    root = _psp_skeleton(tiny_cohort, "uker", tmp_path / "site")
    (root / "UKER-099").mkdir()
    extra = next(c for c in read_psp_case(root).cases if c.case_id == "UKER-099")
    assert extra.clinical is None


def test_missing_clinical_column_names_file_and_fix(tiny_cohort, tmp_path):
    root = _psp_skeleton(tiny_cohort, "uker", tmp_path / "site")
    lines = (root / schema.CLINICAL_FILE).read_text().splitlines()
    (root / schema.CLINICAL_FILE).write_text("\n".join(line.rsplit(",", 1)[0] for line in lines) + "\n")
    with pytest.raises(ConfigError, match=re.escape(f"{root / schema.CLINICAL_FILE}: missing column(s) "
                                                    "['days_since_rt']. Fix: the header must be")):
        read_psp_case(root)


def test_public_readers_on_the_generated_sites(tiny_cohort):
    brats = read_brats2021(tiny_cohort / "brats2021")
    assert brats.problems == [] and len(brats.cases) == 6
    assert all(c.lesion.is_file() and set(c.mr) == {"t1", "t1ce", "t2", "flair"} for c in brats.cases)
    upenn = read_upenn_gbm(tiny_cohort / "upenn_gbm")
    assert upenn.problems == [] and [c.case_id for c in upenn.cases][:2] == ["UPENN-GBM-00001_11", "UPENN-GBM-00002_11"]
    assert [c.lesion is not None for c in upenn.cases] == [True, False, True, False, True]  # some have no segmentation
    ucsf = read_ucsf_pdgm(tiny_cohort / "ucsf_pdgm")
    assert ucsf.problems == [] and len(ucsf.cases) == 5
    brats_ids = {c.case_id for c in brats.cases}
    aliases = {c.case_id: c.also_known_as for c in ucsf.cases}
    assert aliases == {"UCSF-PDGM-0004": ("BraTS2021_00000",), "UCSF-PDGM-0005": ("BraTS2021_00002",),
                       "UCSF-PDGM-0006": (), "UCSF-PDGM-0007": (), "UCSF-PDGM-0008": ()}
    assert {a for names in aliases.values() for a in names} <= brats_ids


def test_missing_mr_file_is_a_problem(tiny_cohort, tmp_path):
    root = tmp_path / "brats2021"
    shutil.copytree(tiny_cohort / "brats2021", root)
    (root / "BraTS2021_00004" / "BraTS2021_00004_flair.nii.gz").unlink()
    listing = read_brats2021(root)
    assert [p.case_id for p in listing.problems] == ["BraTS2021_00004"]
    assert re.fullmatch(r"missing MR file\(s\) for \['flair'\] in .*BraTS2021_00004", listing.problems[0].reason)
    assert len(listing.cases) == 5


def test_empty_public_site_is_a_problem(tmp_path):
    listing = read_ucsf_pdgm(tmp_path)
    assert [(p.case_id, p.reason) for p in listing.problems] == [
        ("<site>", f"no case folders named like UCSF-PDGM-XXXX_nifti under {tmp_path}")]


def _config(cohort: Path, tmp_path: Path, site: str, **changes) -> Path:
    """A generated site config with ``changes`` (None removes a key), written under ``tmp_path``."""
    raw = yaml.safe_load((cohort / "site_configs" / f"{site}.yaml").read_text())
    raw["root"] = str((cohort / "site_configs" / raw["root"]).resolve())
    raw.update(changes)  # a relative root among the changes resolves against tmp_path
    raw = {k: v for k, v in raw.items() if v is not None}
    path = tmp_path / f"{site}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_site_config_unknown_key_names_file_key_and_fix(tiny_cohort, tmp_path):
    path = _config(tiny_cohort, tmp_path, "burdenko", colour="blue")
    expected = f"{path}: key 'colour': unknown key. Fix: remove it or use one of"
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_site_config(path)


def test_site_config_missing_root_names_file_key_and_fix(tiny_cohort, tmp_path):
    path = _config(tiny_cohort, tmp_path, "uker", root=None)
    with pytest.raises(ConfigError, match=re.escape(f"{path}: key 'root': missing. Fix: add 'root:'")):
        load_site_config(path)
    path = _config(tiny_cohort, tmp_path, "uker", root="../no-such-site")
    expected = (re.escape(f"{path}: key 'root': folder ") + r".*no-such-site does not exist\. "
                + re.escape("Fix: point 'root' at the site's data folder"))
    with pytest.raises(ConfigError, match=expected):
        load_site_config(path)


def test_site_config_wrong_role_names_file_key_and_fix(tiny_cohort, tmp_path):
    path = _config(tiny_cohort, tmp_path, "brats2021", roles=["train"])
    with pytest.raises(ConfigError, match=re.escape(
            f"{path}: key 'roles': layout 'brats2021' has no RT dose or labels, so it can only have role 'ssl'. "
            "Fix: set 'roles: [ssl]'")):
        load_site_config(path)
    path = _config(tiny_cohort, tmp_path, "uker", roles=["testing"])
    with pytest.raises(ConfigError, match=re.escape(f"{path}: key 'roles': unknown role 'testing'. Fix: use any of")):
        load_site_config(path)
    path = _config(tiny_cohort, tmp_path, "uker", roles=["train", "test"])
    with pytest.raises(ConfigError, match=re.escape(f"{path}: key 'roles': a site cannot both train and test")):
        load_site_config(path)


def test_all_problems_are_reported_together(tiny_cohort, tmp_path):
    path = _config(tiny_cohort, tmp_path, "burdenko", colour="blue", layout="dicom")
    with pytest.raises(ConfigError) as caught:
        load_site_config(path)
    assert [p.split(": key ")[1].split("'")[1] for p in caught.value.problems] == ["colour", "layout"]


def test_read_site_dispatches_on_the_layout(tiny_cohort):
    site = load_site_config(tiny_cohort / "site_configs" / "ucsf_pdgm.yaml")
    assert [c.case_id for c in read_site(site).cases] == [f"UCSF-PDGM-{i:04d}" for i in range(4, 9)]
