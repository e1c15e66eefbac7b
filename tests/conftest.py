"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``tiny`` synthetic cohort (seed 0), generated once per test session (~15 s CPU); read-only.

    Layout: see :mod:`simulation.cohort` (five sites, ``site_configs/``, ``truth.csv``). One process:
    forking a pytest process that may already hold torch's thread pools is not safe.
    """
    from simulation.cohort import generate_cohort  # only sessions that use the cohort pay the import

    out = tmp_path_factory.mktemp("tiny_cohort")
    generate_cohort(out, seed=0, profile="tiny", workers=1, progress=False)
    return out
