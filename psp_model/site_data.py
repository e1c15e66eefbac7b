"""A site's preprocessed data, loaded from its work_dir: what local training and evaluation read."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from psp_model.errors import ConfigError
from psp_model.preprocess.clinical import ClinicalRecord, parse_clinical
from psp_model.preprocess.mri import standardize_mr
from psp_model.preprocess.nyul import NyulLandmarks, combine_landmarks
from psp_model.preprocess.pipeline import case_paths
from psp_model.sites import SiteConfig

_LANDMARK_PREFIX = "landmarks_"


@dataclass
class SiteData:
    """The usable (QC ok) cases of one site, in case-id order.

    ``input_keys`` are the preprocessing cache keys (hashes of each case's inputs and settings).
    ``images`` are the raw cached MR arrays ``(n, 2, *size)``; :meth:`standardized` applies the
    study's (combined) Nyul landmarks and the z-normalisation. Clinical fields are None at SSL-only sites.
    """

    site: str
    case_ids: list[str]
    input_keys: list[str]
    images: np.ndarray
    brains: np.ndarray
    case_landmarks: list[NyulLandmarks]
    records: list[ClinicalRecord] | None = None
    dose: list[dict[str, float]] | None = None

    @property
    def labels(self) -> np.ndarray | None:
        if self.records is None:
            return None
        return np.array([r.label for r in self.records], dtype=np.int64)

    def local_landmarks(self) -> NyulLandmarks:
        """This site's Nyul landmarks (count-weighted over its cases): a shareable aggregate."""
        return combine_landmarks(self.case_landmarks)

    def standardized(self, landmarks: NyulLandmarks) -> np.ndarray:
        """Model inputs ``(n, 2, *size)`` float32 with the given landmarks."""
        return np.stack([self.standardized_case(i, landmarks) for i in range(len(self))])

    def standardized_case(self, index: int, landmarks: NyulLandmarks) -> np.ndarray:
        """Model input ``(2, *size)`` float32 of case ``index``."""
        return standardize_mr(self.images[index], self.brains[index], landmarks)

    def __len__(self) -> int:
        return len(self.case_ids)


def load_site_data(site: SiteConfig, *, labelled: bool) -> SiteData:
    """Read every case that preprocessing marked ok (and, if ``labelled``, its features.csv row)."""
    work_dir = Path(site.work_dir)
    rows = _feature_rows(work_dir / "features.csv") if labelled else {}
    case_ids, keys, images, brains, landmarks, records, dose = [], [], [], [], [], [], []
    for record_path in sorted((work_dir / "cases").glob("*.json")):
        status = json.loads(record_path.read_text())
        case_id = status["result"]["case_id"]
        if status["status"] != "ok" or (labelled and case_id not in rows):
            continue
        npz_path, _ = case_paths(work_dir, case_id)
        with np.load(npz_path) as arrays:
            images.append(arrays["image"])
            brains.append(arrays["brain"])
            landmarks.append(NyulLandmarks.from_arrays(
                {k[len(_LANDMARK_PREFIX):]: arrays[k] for k in arrays.files if k.startswith(_LANDMARK_PREFIX)}))
        case_ids.append(case_id)
        keys.append(status["key"])
        if labelled:
            row = rows[case_id]
            records.append(parse_clinical(case_id, row, require_label=True))
            dose.append({k: float(row[f"dose_{k}"]) for k in ("mean", "min", "median", "d98")})
    if not case_ids:
        raise ConfigError([f"site {site.name}: no preprocessed case in {work_dir}. "
                           f"Fix: run 'psp-client preprocess --site-config {site.source}' and check its QC report."])
    return SiteData(
        site=site.name,
        case_ids=case_ids,
        input_keys=keys,
        images=np.stack(images),
        brains=np.stack(brains),
        case_landmarks=landmarks,
        records=records if labelled else None,
        dose=dose if labelled else None,
    )


def _feature_rows(path: Path) -> dict[str, dict[str, str]]:
    if not path.is_file():
        return {}
    with path.open(newline="") as handle:
        return {row["case_id"]: row for row in csv.DictReader(handle)}
