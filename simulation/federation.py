"""Run a study as an in-process Flower simulation over a synthetic (or any local) cohort."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from flwr.simulation import run_simulation

from client.app import build_client_app
from psp_model.study import StudyConfig
from server.app import build_server_app


def simulate_study(study: StudyConfig, *, verbose: bool = False) -> Path:
    """Run every phase of ``study`` with one simulated SuperNode per YAML in ``<cohort-dir>/site_configs``.

    Returns the run directory. Each simulated site gets one CPU (and a share of a GPU if present).
    """
    if not study.cohort_dir or not study.run_dir:
        raise ValueError("simulate_study needs absolute cohort_dir and run_dir in the StudyConfig")
    n_sites = len(list((Path(study.cohort_dir) / "site_configs").glob("*.yaml")))
    if n_sites == 0:
        raise ValueError(f"no site configs in {study.cohort_dir}/site_configs; generate a cohort first")
    resources = {"num_cpus": 1, "num_gpus": 0.5 if torch.cuda.is_available() else 0.0}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        os.environ.setdefault("RAY_DEDUP_LOGS", "1")
        run_simulation(
            server_app=build_server_app(study, expected_nodes=n_sites),
            client_app=build_client_app(study),
            num_supernodes=n_sites,
            backend_config={"client_resources": resources, "init_args": {"num_cpus": os.cpu_count() or 1}},
            verbose_logging=verbose,
        )
    return Path(study.run_dir)
