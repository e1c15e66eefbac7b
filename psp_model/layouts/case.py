"""The layout-independent record of one case, as found on disk (nothing is read or validated yet)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Case:
    """Where one case's files are.

    Args:
        case_id: the site's identifier of the case (never leaves the site).
        folder: the case's folder.
        mr: modality -> NIfTI path, with canonical modality names (``t1``, ``t1ce``, ``t2``, ``flair``).
        lesion: lesion label map, if the layout has one.
        ct_dir: folder of the planning CT series (``psp-case`` only).
        rtdose: RTDOSE file (``psp-case`` only).
        clinical: the case's raw ``clinical.csv`` row, or None when it has none.
        also_known_as: ids of the same study in other public sets, for de-duplication.
    """

    case_id: str
    folder: Path
    mr: dict[str, Path]
    lesion: Path | None = None
    ct_dir: Path | None = None
    rtdose: Path | None = None
    clinical: dict[str, str] | None = None
    also_known_as: tuple[str, ...] = ()


@dataclass(frozen=True)
class CaseProblem:
    """A case the reader could not even assemble (e.g. a clinical row without a folder)."""

    case_id: str
    reason: str


@dataclass(frozen=True)
class SiteListing:
    """What a layout reader found: the cases, and the cases it had to leave out with the reason."""

    cases: list[Case]
    problems: list[CaseProblem] = field(default_factory=list)
