"""The site pipeline against the generator's truth at the paper's resolution (1 mm MR, 160^3 crop).

Three full-profile synthetic training cases go through ``preprocess_site`` end to end (NIfTI MR, DICOM
CT + RTDOSE, ANTs registration, dose features); the recovered follow-up -> planning-CT transform and
the four lesion dose features are set against ``truth.csv``. The plan dose falls by up to ~7 Gy/mm in
the penumbra, so 0.5 Gy there needs ~0.1 mm of registration accuracy, which no resolution holds for
every case of every cohort (bench/README.md, Registration: 30 / 30 full-profile cases; 78 / 79 of a demo
cohort written at 1 mm; the 2 mm demo and 3 mm tiny cohorts are measured there). These three cases at
the paper's resolution are pinned.
"""

from __future__ import annotations

import csv
from dataclasses import replace

import numpy as np
import pytest

from psp_model.preprocess.pipeline import PreprocessSettings, SiteRun, preprocess_site
from psp_model.sites import load_site_config
from simulation.cohort import truth_mr_to_ct

pytestmark = pytest.mark.slow

COHORT_SEED = 100
"""bench/preprocess.py's default seed: its cases are the ones bench/README.md reports."""
N_CASES = 3
MEAN_TRE_MM = 0.5
"""Half a 1 mm voxel; these cases come out at 0.1-0.2 mm."""
DOSE_TOLERANCE_GY = 0.5
FEATURES = ("mean", "min", "median", "d98")


@pytest.fixture(scope="module")
def full_site(tmp_path_factory: pytest.TempPathFactory) -> tuple[SiteRun, dict[str, dict[str, str]]]:
    from simulation.cohort import generate_cohort
    from simulation.profiles import PROFILES, Profile

    full = PROFILES["full"]
    out = tmp_path_factory.mktemp("full_cohort")
    site = replace(full.site("burdenko"), n_cases=N_CASES)
    generate_cohort(out, seed=COHORT_SEED, profile=Profile("full-accuracy", full.voxel_mm, (site,)), progress=False)
    run = preprocess_site(load_site_config(out / "site_configs" / "burdenko.yaml"),
                          PreprocessSettings(profile="full", deterministic_registration=True), progress=False)
    with (out / "truth.csv").open(newline="") as handle:
        truth = {row["case_id"]: row for row in csv.DictReader(handle)}
    return run, truth


def _ok(run: SiteRun) -> list:
    assert [r.status for r in run.results] == ["ok"] * N_CASES, [(r.case_id, r.reason) for r in run.results]
    return run.results


def test_registration_recovers_the_known_offset(full_site) -> None:
    """Mean target registration error over a 120 mm cube around the head centre, per case."""
    run, truth = full_site
    grid = np.stack(np.meshgrid(*[np.linspace(-60.0, 60.0, 5)] * 3), -1).reshape(-1, 3)
    points = np.c_[grid, np.ones(len(grid))]
    for result in _ok(run):
        row = truth[result.case_id]
        found = np.asarray(result.checks["mr_to_ct"], dtype=float)
        tre = np.linalg.norm((points @ (found - truth_mr_to_ct(row)).T)[:, :3], axis=1).mean()
        assert tre < MEAN_TRE_MM, (result.case_id, tre)


def test_lesion_dose_features_within_half_a_gray_of_truth(full_site) -> None:
    run, truth = full_site
    for result in _ok(run):
        row = truth[result.case_id]
        errors = {k: abs(float(result.features[f"dose_{k}"]) - float(row[f"dose_{k}"])) for k in FEATURES}
        assert max(errors.values()) <= DOSE_TOLERANCE_GY, (result.case_id, errors)
