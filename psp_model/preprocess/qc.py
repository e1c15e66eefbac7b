"""Per-case QC report of a site's preprocessing: one row per case, ok or the reason it was skipped."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from psp_model.io import atomic_write_text

Status = Literal["ok", "error"]


@dataclass
class CaseResult:
    """What preprocessing one case gave. Stays at the site (QC and features), never sent."""

    case_id: str
    status: Status
    reason: str = ""
    stage: str = ""
    cached: bool = False
    seconds: dict[str, float] = field(default_factory=dict)
    features: dict[str, float | str | None] = field(default_factory=dict)
    checks: dict[str, float] = field(default_factory=dict)


def write_qc_report(results: list[CaseResult], out_dir: Path, *, site: str, settings: dict) -> tuple[Path, Path]:
    """Write ``qc.json`` (for scripts) and ``qc.md`` (for people); return both paths."""
    counts = Counter(r.status for r in results)
    payload = {
        "site": site,
        "settings": settings,
        "summary": {"cases": len(results), "ok": counts["ok"], "error": counts["error"]},
        "cases": [asdict(r) for r in sorted(results, key=lambda r: r.case_id)],
    }
    json_path, md_path = out_dir / "qc.json", out_dir / "qc.md"
    atomic_write_text(json_path, json.dumps(payload, indent=2, default=str))
    atomic_write_text(md_path, format_qc_table(results, site=site) + "\n")
    return json_path, md_path


def format_qc_table(results: list[CaseResult], *, site: str) -> str:
    """A Markdown table, readable in a terminal as it is."""
    counts = Counter(r.status for r in results)
    lines = [
        f"# QC report: site {site}",
        "",
        f"{len(results)} cases: {counts['ok']} ok, {counts['error']} skipped with an error.",
        "",
        "| case | status | stage | reason |",
        "|---|---|---|---|",
    ]
    for r in sorted(results, key=lambda r: (r.status == "ok", r.case_id)):
        reason = r.reason.replace("|", "/").replace("\n", " ")
        lines.append(f"| {r.case_id} | {r.status}{' (cached)' if r.cached else ''} | {r.stage} | {reason} |")
    return "\n".join(lines)
