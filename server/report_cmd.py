"""``psp-server report``: rebuild a study's report (Markdown + self-contained HTML) from its run directory."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def report(
    run_dir: Path,
    truth: Annotated[Path | None, typer.Option(
        exists=True, dir_okay=False,
        help="Synthetic cohorts only: the cohort's truth_summary.json, to compare each test site's "
             "ensemble AUC with the generator's Bayes-optimal AUC. Leave out for real data.")] = None,
) -> None:
    """Rebuild RUN_DIR/report.md and RUN_DIR/report.html (figures in RUN_DIR/figures/); print both paths.

    RUN_DIR is the study's run directory: the --run-dir of 'psp-server run', the folder holding config.json.
    """
    if not (run_dir / "config.json").is_file():
        raise typer.BadParameter(f"{run_dir} has no config.json, so it is not a study's run directory: give the "
                                 "folder printed by 'psp-server run' (run directory: ...)", param_hint="RUN_DIR")
    # Imported here: matplotlib and scikit-learn take seconds to load, and only this command needs them.
    from psp_model.evaluate.report import write_report

    try:
        markdown, html = write_report(run_dir, truth_summary=truth)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="RUN_DIR") from None
    typer.echo(f"report: {markdown}")
    typer.echo(f"report: {html}")
