"""Which site this node is.

Deployment: the SuperNode's node config ``site-config="/abs/site.yaml"``. Simulation: partition ``i``
is the i-th YAML (sorted by name) in ``<cohort-dir>/site_configs``.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from flwr.app import Context

from psp_model.site_tasks import LocalSite
from psp_model.sites import load_site_config
from psp_model.study import StudyConfig


def site_config_path(context: Context, study: StudyConfig) -> Path:
    """This node's site YAML (node config in deployment, partition id in simulation)."""
    if "site-config" in context.node_config:
        return Path(str(context.node_config["site-config"]))
    if not study.cohort_dir:
        raise ValueError("this node has no 'site-config' in its node config and the run config has no "
                         "'cohort-dir'; start the SuperNode with --node-config 'site-config=\"/abs/site.yaml\"'")
    configs = sorted((Path(study.cohort_dir) / "site_configs").glob("*.yaml"))
    return configs[int(context.node_config["partition-id"])]


def local_site(context: Context, study: StudyConfig | None = None) -> LocalSite:
    """This node's site; ``study`` overrides the run config (in-process simulation passes none).

    Kept per process for the study, so a ClientApp process that serves many rounds loads the site's
    data, installed encoder and tokens once instead of once per message.
    """
    study = study or StudyConfig.from_run_config(dict(context.run_config))
    path = site_config_path(context, study).resolve()
    return _cached_site(path, path.stat().st_mtime_ns, study)


@lru_cache(maxsize=8)
def _cached_site(path: Path, mtime_ns: int, study: StudyConfig) -> LocalSite:
    return LocalSite(load_site_config(path), study)
