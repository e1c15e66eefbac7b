"""Readers of the public glioma MRI sets used for self-supervised pretraining, in their own naming.

BraTS 2021:  ``BraTS2021_XXXXX/BraTS2021_XXXXX_{t1,t1ce,t2,flair,seg}.nii.gz``
UPenn-GBM:   ``images_structural/UPENN-GBM-00001_11/UPENN-GBM-00001_11_{T1,T1GD,T2,FLAIR}.nii.gz``
             (segmentations, where present: ``automated_segm/UPENN-GBM-00001_11_automated_approx_segm.nii.gz``)
UCSF-PDGM:   ``UCSF-PDGM-0004_nifti/UCSF-PDGM-0004_{T1,T1c,T2,FLAIR,tumor_segmentation}.nii.gz``;
             ``UCSF-PDGM-metadata_v2.csv`` (3-digit ids, with a ``BraTS21 ID`` column) marks overlap with BraTS.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

from psp_model.layouts.case import Case, CaseProblem, SiteListing

_BRATS_SUFFIXES = {"t1": "t1", "t1ce": "t1ce", "t2": "t2", "flair": "flair"}
_UPENN_SUFFIXES = {"t1": "T1", "t1ce": "T1GD", "t2": "T2", "flair": "FLAIR"}
_UCSF_SUFFIXES = {"t1": "T1", "t1ce": "T1c", "t2": "T2", "flair": "FLAIR"}
UCSF_METADATA_FILE = "UCSF-PDGM-metadata_v2.csv"


def read_brats2021(root: Path) -> SiteListing:
    """List ``BraTS2021_*`` case folders under ``root``."""
    cases = []
    for folder in sorted(root.glob("BraTS2021_*")):
        if folder.is_dir():
            cid = folder.name
            cases.append(Case(
                case_id=cid,
                folder=folder,
                mr={m: folder / f"{cid}_{s}.nii.gz" for m, s in _BRATS_SUFFIXES.items()},
                lesion=folder / f"{cid}_seg.nii.gz",
            ))
    return _checked(cases, root, "BraTS2021_XXXXX")


def read_upenn_gbm(root: Path) -> SiteListing:
    """List ``images_structural/UPENN-GBM-*`` studies (baseline ``_11`` and follow-up ``_21``)."""
    cases = []
    for folder in sorted((root / "images_structural").glob("UPENN-GBM-*")):
        if folder.is_dir():
            cid = folder.name
            seg = root / "automated_segm" / f"{cid}_automated_approx_segm.nii.gz"
            cases.append(Case(
                case_id=cid,
                folder=folder,
                mr={m: folder / f"{cid}_{s}.nii.gz" for m, s in _UPENN_SUFFIXES.items()},
                lesion=seg if seg.is_file() else None,
            ))
    return _checked(cases, root, "images_structural/UPENN-GBM-XXXXX_11")


def read_ucsf_pdgm(root: Path) -> SiteListing:
    """List ``UCSF-PDGM-*_nifti`` folders; the metadata CSV's BraTS21 ids become ``also_known_as``."""
    brats_ids = _ucsf_brats_ids(root / UCSF_METADATA_FILE)
    cases = []
    for folder in sorted(root.glob("UCSF-PDGM-*_nifti")):
        if folder.is_dir():
            cid = folder.name.removesuffix("_nifti")
            alias = brats_ids.get(_ucsf_short_id(cid))
            cases.append(Case(
                case_id=cid,
                folder=folder,
                mr={m: folder / f"{cid}_{s}.nii.gz" for m, s in _UCSF_SUFFIXES.items()},
                lesion=folder / f"{cid}_tumor_segmentation.nii.gz",
                also_known_as=(alias,) if alias else (),
            ))
    return _checked(cases, root, "UCSF-PDGM-XXXX_nifti")


def _ucsf_short_id(case_id: str) -> str:
    """Folders use 4 digits (UCSF-PDGM-0004), the metadata 3 (UCSF-PDGM-004)."""
    match = re.fullmatch(r"UCSF-PDGM-(\d+)", case_id)
    return f"UCSF-PDGM-{int(match.group(1)):03d}" if match else case_id


def _ucsf_brats_ids(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    with path.open(newline="") as handle:
        return {
            row["ID"].strip(): row["BraTS21 ID"].strip()
            for row in csv.DictReader(handle)
            if row.get("ID") and (row.get("BraTS21 ID") or "").strip()
        }


def _checked(cases: list[Case], root: Path, pattern: str) -> SiteListing:
    """Keep cases whose MR files all exist; report the others."""
    kept, problems = [], []
    for case in cases:
        missing = [m for m, p in case.mr.items() if not p.is_file()]
        if missing:
            problems.append(CaseProblem(case.case_id, f"missing MR file(s) for {missing} in {case.folder}"))
        else:
            kept.append(case)
    if not cases:
        problems.append(CaseProblem("<site>", f"no case folders named like {pattern} under {root}"))
    return SiteListing(cases=kept, problems=problems)
