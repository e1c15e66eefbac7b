"""Reader of the canonical ``psp-case`` layout (see README, "Canonical case layout")."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

from psp_model import schema
from psp_model.errors import ConfigError
from psp_model.layouts.case import Case, CaseProblem, SiteListing


def read_psp_case(root: Path) -> SiteListing:
    """List the cases under ``root``: one folder per case plus ``clinical.csv``.

    Clinical rows without a folder and repeated case ids are reported as problems; a folder without
    a clinical row is listed with ``clinical=None`` (fine for SSL, a case error for training).
    """
    rows, problems = _read_clinical(root / schema.CLINICAL_FILE)
    folders = {p.name: p for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".")}
    for case_id in sorted(set(rows) - set(folders)):
        problems.append(CaseProblem(case_id, f"has a row in {schema.CLINICAL_FILE} but no folder {root / case_id}"))
    cases = [
        Case(
            case_id=case_id,
            folder=folder,
            mr={"t1ce": folder / schema.T1CE_FILE, "flair": folder / schema.FLAIR_FILE},
            lesion=folder / schema.LESION_FILE,
            ct_dir=folder / schema.CT_DIR,
            rtdose=folder / schema.RTDOSE_FILE,
            clinical=rows.get(case_id),
        )
        for case_id, folder in folders.items()
        if case_id not in {p.case_id for p in problems}
    ]
    return SiteListing(cases=cases, problems=problems)


def _read_clinical(path: Path) -> tuple[dict[str, dict[str, str]], list[CaseProblem]]:
    if not path.is_file():
        return {}, []
    # utf-8-sig: spreadsheet programs often start a CSV with a byte-order mark.
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            missing = [c for c in schema.CLINICAL_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise ConfigError([f"{path}: missing column(s) {missing}. Fix: the header must be "
                                   f"{','.join(schema.CLINICAL_COLUMNS)}."])
            all_rows = [{k: (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}). Fix: save it as UTF-8 "
                           "(in a spreadsheet program: 'CSV UTF-8')."]) from exc
    except csv.Error as exc:
        raise ConfigError([f"{path}: not a readable CSV file ({exc}). Fix: save it as comma-separated values "
                           f"with the header {','.join(schema.CLINICAL_COLUMNS)}."]) from exc
    counts = Counter(row["case_id"] for row in all_rows)
    problems = [
        CaseProblem(case_id, f"appears {n} times in {path.name}; case ids must be unique")
        for case_id, n in sorted(counts.items()) if n > 1 and case_id
    ]
    if counts.get("", 0):
        problems.append(CaseProblem("<empty>", f"{counts['']} row(s) of {path.name} have an empty case_id"))
    rows = {row["case_id"]: row for row in all_rows if row["case_id"] and counts[row["case_id"]] == 1}
    return rows, problems
