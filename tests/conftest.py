"""Shared fixtures.

ITK runs single-threaded in the test session (set before anything imports ants), so that
registrations asked to be deterministic are bit-reproducible wherever a test runs them.
torch runs single-threaded too (OMP_NUM_THREADS, read when torch starts), as the simulation's Ray
actors do: the tests' tiny models gain nothing from a second OpenMP thread (test_variants: 140 s with
one, 156 s with two, idle), and two threads spin against any other busy process: under such load one
5-fold CV of the tiny head took 46-64 s with two threads and 6-7 s with one.
"""

from __future__ import annotations

import os

os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``tiny`` synthetic cohort (seed 0), generated once per test process (~15 s CPU).

    Read-only except for the sites' preprocessing caches (``tiny_cohort_preprocessed``), which live in
    the cohort: so under ``make test`` each xdist worker builds a cohort of its own rather than two
    workers filling one cache at once.

    Layout: see :mod:`simulation.cohort` (five sites, ``site_configs/``, ``truth.csv``). One process:
    forking a pytest process that may already hold torch's thread pools is not safe.
    """
    from simulation.cohort import generate_cohort  # only sessions that use the cohort pay the import

    out = tmp_path_factory.mktemp("tiny_cohort")
    generate_cohort(out, seed=0, profile="tiny", workers=1, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_cohort_preprocessed(tiny_cohort: Path) -> dict:
    """``{site name: SiteRun}`` of every tiny-cohort site, preprocessed as a study's sites do it.

    The work dirs are the cohort's own (``psp-fl-work``), which the simulated studies use too, so
    whichever of them comes first pays and the others read the cache.
    """
    from psp_model.preprocess.pipeline import PreprocessSettings, preprocess_site
    from psp_model.sites import load_site_config

    return {path.stem: preprocess_site(load_site_config(path), PreprocessSettings(profile="tiny"), progress=False)
            for path in sorted((tiny_cohort / "site_configs").glob("*.yaml"))}
