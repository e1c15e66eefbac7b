"""One reader per on-disk layout, each returning the same ``Case`` records."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from psp_model.layouts.case import Case, CaseProblem, SiteListing
from psp_model.layouts.psp_case import read_psp_case
from psp_model.layouts.public import read_brats2021, read_ucsf_pdgm, read_upenn_gbm
from psp_model.sites import SiteConfig

READERS: dict[str, Callable[[Path], SiteListing]] = {
    "psp-case": read_psp_case,
    "brats2021": read_brats2021,
    "upenn-gbm": read_upenn_gbm,
    "ucsf-pdgm": read_ucsf_pdgm,
}


def read_site(site: SiteConfig) -> SiteListing:
    """List the cases of a site with the reader of its layout."""
    return READERS[site.layout](site.root)


__all__ = ["Case", "CaseProblem", "SiteListing", "READERS", "read_site"]
