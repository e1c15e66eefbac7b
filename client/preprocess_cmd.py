"""``psp-client preprocess`` and ``psp-client check``: local preprocessing with a QC report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from psp_model.errors import CaseError, ConfigError
from psp_model.layouts import read_site
from psp_model.sites import SiteConfig, load_site_config

SiteConfigOption = Annotated[Path, typer.Option(
    "--site-config", "-c", help="This site's YAML (see site_configs/). Validated before anything runs.")]


def load_site_or_exit(path: Path) -> SiteConfig:
    try:
        return load_site_config(path)
    except ConfigError as exc:
        raise typer.BadParameter("\n" + "\n".join(exc.problems), param_hint="--site-config") from None


def preprocess(
    site_config: SiteConfigOption,
    out: Annotated[Path | None, typer.Option(
        help="Output folder. Default: the site's work_dir (from the site config).")] = None,
    workers: Annotated[int, typer.Option(
        min=1, help="Cases processed in parallel. Each worker gets cores/workers threads; "
                    "2-4 suits a workstation, 1 keeps memory lowest (~2 GB per worker at 160^3).")] = 1,
    profile: Annotated[str, typer.Option(
        help="MR grid: 'full' (1 mm, 160^3; the study default), 'demo' or 'tiny' (coarser, for trials). "
             "Every site of a study must use the same.")] = "full",
    min_dose_coverage: Annotated[float, typer.Option(
        min=0.0, max=1.0, help="Smallest fraction of the lesion that must lie inside the RT dose grid.")] = 0.95,
    deterministic: Annotated[bool, typer.Option(
        help="Bit-identical registration (single-threaded, slower).")] = False,
    force: Annotated[bool, typer.Option(help="Recompute cases already done (default: skip them).")] = False,
    strict: Annotated[bool, typer.Option(help="Stop at the first case error instead of skipping the case.")] = False,
) -> None:
    """Turn this site's cases into model inputs, a local features.csv and a QC report.

    Nothing computed here leaves the site. A broken case is listed in the QC report with its reason
    and skipped; the others go on. Rerunning skips cases whose inputs did not change.
    Exit status: 0 when at least one case was processed, 1 when none could be, 2 for a config error.
    """
    from psp_model.preprocess.pipeline import PreprocessSettings, preprocess_site
    from psp_model.preprocess.qc import format_qc_table

    site = load_site_or_exit(site_config)
    settings = PreprocessSettings(profile=profile, min_dose_coverage=min_dose_coverage,
                                  deterministic_registration=deterministic)
    typer.echo(f"site {site.name} ({site.layout}, roles {','.join(site.roles)}), settings {settings}")
    try:
        run = preprocess_site(site, settings, out_dir=out, workers=workers, force=force, strict=strict)
    except CaseError as exc:
        typer.echo(f"error: case {exc.case_id}: {exc.reason}", err=True)
        raise typer.Exit(1) from None
    typer.echo(format_qc_table(run.results, site=site.name))
    typer.echo(f"\nQC report: {run.qc_markdown}  (JSON: {run.qc_json})")
    if run.features_csv:
        typer.echo(f"features:  {run.features_csv}")
    if run.n_ok == 0:
        typer.echo("error: no case could be processed; see the reasons above", err=True)
        raise typer.Exit(1)


def check(site_config: SiteConfigOption) -> None:
    """Validate the site config and list the cases found, with any problems, without processing."""
    site = load_site_or_exit(site_config)
    listing = read_site(site)
    typer.echo(f"site {site.name}: layout {site.layout}, roles {','.join(site.roles)}, root {site.root}")
    typer.echo(f"{len(listing.cases)} case(s) found, {len(listing.problems)} problem(s)")
    for problem in listing.problems:
        typer.echo(f"  {problem.case_id}: {problem.reason}")
    if not listing.cases:
        raise typer.Exit(1)
