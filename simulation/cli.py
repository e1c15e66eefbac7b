"""``psp-sim``: synthetic data for trying psp-fl end to end without patient data."""

from __future__ import annotations

import time
from enum import Enum
from pathlib import Path
from typing import Annotated

import click
import typer

from simulation.ablate_cmd import ablate
from simulation.cohort import SITE_CONFIG_DIR, SUMMARY_FILE, TRUTH_FILE, generate_cohort
from simulation.profiles import PROFILES
from simulation.run_cmd import run

app = typer.Typer(
    help="Synthetic multi-site cohorts for psp-fl (phantoms on the MNI152 template, DICOM CT/RTDOSE).",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def main() -> None:
    """Synthetic multi-site cohorts for psp-fl. Commands are listed below."""


ProfileName = Enum("ProfileName", {name: name for name in PROFILES}, type=str)


@app.command(short_help="Write a synthetic 5-site cohort (psp-case sites with DICOM CT/RTDOSE + SSL sets).")
def cohort(
    out: Annotated[Path, typer.Option("--out", help="Folder to write the cohort to (created if missing).")],
    seed: Annotated[int, typer.Option(help="Random seed: the same seed writes identical files.")] = 0,
    profile: Annotated[ProfileName, typer.Option(
        help="tiny: tests/CI, 3 mm voxels, 24+12 labelled and 14 SSL cases, < 1 min. "
             "demo: a first real run, 2 mm, paper-sized labelled sites (59 Burdenko-like, 20 UKER-like) "
             "+ 40 SSL, about 1-2 min. full: paper-sized at 1 mm with 100 SSL studies, slow and several GB. "
             "Recommended: tiny to check the installation, demo to look at results.")] = ProfileName.tiny,
    workers: Annotated[int, typer.Option(min=1, help="Processes generating cases in parallel (1 = no pool).")] = 1,
    force: Annotated[bool, typer.Option(
        "--force", help="Write into a non-empty --out that holds no previous cohort (only the generator's own "
                        "folders and files are replaced).")] = False,
) -> None:
    """Write a synthetic 5-site cohort.

    burdenko (train) and uker (test) use the psp-case layout with DICOM CT and RTDOSE; brats2021,
    upenn_gbm and ucsf_pdgm (SSL) use their public naming. Also writes site_configs/<site>.yaml and
    the generating truth (truth.csv, truth_summary.json), which the pipeline never reads.
    """
    spec = PROFILES[profile.value]
    typer.echo(f"psp-sim cohort: out={out} seed={seed} profile={spec.name} ({spec.voxel_mm:g} mm, "
               f"{', '.join(f'{s.name} {s.n_cases}' for s in spec.sites)}) workers={workers}")
    start = time.perf_counter()
    try:
        summary = generate_cohort(out, seed=seed, profile=spec, workers=workers, force=force)
    except FileExistsError as err:
        raise click.ClickException(str(err)) from err
    typer.echo(f"done in {time.perf_counter() - start:.0f} s")
    for name, site in summary["sites"].items():
        auc = "undefined (one class)" if site.get("bayes_auc") is None else f"{site['bayes_auc']:.3f}"
        extra = f", {site['n_tp']} TP, Bayes AUC {auc}" if "n_tp" in site else ""
        typer.echo(f"  {name:10s} {', '.join(site['roles'])}: {site['n']} cases{extra} -> {out / name}")
    typer.echo(f"site configs: {out / SITE_CONFIG_DIR}/<site>.yaml")
    typer.echo(f"truth (for evaluation only): {out / TRUTH_FILE}, {out / SUMMARY_FILE}")


app.command("run", short_help="Cohort -> preprocessing at every site -> federated study -> report.")(run)
app.command("ablate", short_help="Tables 2-4 of the paper (baselines, modalities, encoders) on the "
            "synthetic federation, with the Bayes AUC.")(ablate)
