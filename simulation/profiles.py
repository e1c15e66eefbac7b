"""Cohort profiles (size and resolution) and the per-site "scanner" differences."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from psp_model.sites import Layout, Role

Orientation = tuple[str, str, str]


@dataclass(frozen=True)
class SiteSpec:
    """One synthetic site and how its scanner differs from the others.

    Args:
        name: site name (also its folder under the cohort and its YAML file name).
        layout: on-disk layout (``psp_model.sites.Layout``).
        roles: roles written to the site config.
        n_cases: number of cases (studies) generated.
        index: fixed position of the site in the seed tree (so adding a site changes no other site).
        orientation: axis codes the NIfTI files are stored in (nibabel), e.g. ``("P", "I", "R")``.
        gain: scanner intensity scale of the MR images.
        noise: Rician noise sd relative to white matter.
        bias: strength of the smooth multiplicative bias field (0 = none).
        dose_bits: RTDOSE bit depth (``psp-case`` only).
        mr_dtype: dtype of the MR NIfTI data on disk.
        ucsf_brats_duplicates: UCSF only: how many cases repeat a ``brats2021`` phantom.
        partial_dose_fraction: fraction of cases whose lesion may stick out of the dose grid.
        tp_fraction: labelled sites: the site's share of TP cases (its base rate; see
            ``simulation.cohort.assign_labels``).
    """

    name: str
    layout: Layout
    roles: tuple[Role, ...]
    n_cases: int
    index: int
    orientation: Orientation = ("R", "A", "S")
    gain: float = 1000.0
    noise: float = 0.02
    bias: float = 0.1
    dose_bits: Literal[16, 32] = 16
    mr_dtype: Literal["int16", "float32"] = "float32"
    ucsf_brats_duplicates: int = 0
    partial_dose_fraction: float = 0.03
    tp_fraction: float | None = None


@dataclass(frozen=True)
class Profile:
    """A cohort size and resolution.

    Args:
        name: profile name.
        voxel_mm: isotropic MR/phantom voxel; the CT has this in-plane spacing and 1.5x slices, the
            dose grid 2x (at least 2.5 mm).
        sites: the sites, in generation order.
    """

    name: str
    voxel_mm: float
    sites: tuple[SiteSpec, ...]

    @property
    def ct_slice_mm(self) -> float:
        return 1.5 * self.voxel_mm

    @property
    def dose_voxel_mm(self) -> float:
        return max(2.0 * self.voxel_mm, 2.5)

    def site(self, name: str) -> SiteSpec:
        for spec in self.sites:
            if spec.name == name:
                return spec
        raise KeyError(f"profile {self.name!r} has no site {name!r}; sites: {[s.name for s in self.sites]}")


def _sites(burdenko: int, uker: int, brats: int, upenn: int, ucsf: int) -> tuple[SiteSpec, ...]:
    return (
        SiteSpec("burdenko", "psp-case", ("train",), burdenko, index=0, orientation=("R", "A", "S"),
                 gain=1000.0, noise=0.02, bias=0.15, dose_bits=16, mr_dtype="int16", tp_fraction=34 / 59),
        SiteSpec("uker", "psp-case", ("test",), uker, index=1, orientation=("P", "I", "R"),
                 gain=350.0, noise=0.035, bias=0.3, dose_bits=32, tp_fraction=11 / 20),
        SiteSpec("brats2021", "brats2021", ("ssl",), brats, index=2, orientation=("L", "P", "S"),
                 gain=600.0, noise=0.015, bias=0.05),
        SiteSpec("upenn_gbm", "upenn-gbm", ("ssl",), upenn, index=3, orientation=("L", "P", "S"),
                 gain=250.0, noise=0.02, bias=0.1),
        SiteSpec("ucsf_pdgm", "ucsf-pdgm", ("ssl",), ucsf, index=4, orientation=("R", "A", "S"),
                 gain=3000.0, noise=0.025, bias=0.1, ucsf_brats_duplicates=2),
    )


PROFILES: dict[str, Profile] = {
    "tiny": Profile("tiny", voxel_mm=3.0, sites=_sites(24, 12, 6, 5, 5)),
    "demo": Profile("demo", voxel_mm=2.0, sites=_sites(59, 20, 16, 12, 12)),
    "full": Profile("full", voxel_mm=1.0, sites=_sites(59, 20, 40, 30, 30)),
}
"""``tiny``: tests and CI (3 mm, 52 cases, well under a minute). ``demo``: a laptop walk-through
(2 mm, paper-sized labelled sites, ~1-2 min). ``full``: paper-sized at 1 mm (slow, large on disk)."""
