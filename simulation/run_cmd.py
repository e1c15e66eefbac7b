"""``psp-sim run``: synthetic cohort -> local preprocessing at every site -> federated study -> report."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from psp_model.evaluate.report import write_report
from psp_model.preprocess.pipeline import PreprocessSettings, preprocess_site
from psp_model.signing import PRIVATE_KEY_FILE, PUBLIC_KEY_FILE, generate_signing_key
from psp_model.sites import load_site_config
from psp_model.study import StudyConfig
from simulation.cohort import SITE_CONFIG_DIR, SUMMARY_FILE, generate_cohort, set_model_signing_key
from simulation.central import central_reference
from simulation.federation import simulate_study

SIMULATION_PHASES = "stats,ssl,finetune,evaluate,shap"
"""The README's main job also ranks the clinical/dose features; ``select`` stays optional (F extra CV runs)."""

STUDY_DEFAULTS: dict[str, StudyConfig] = {
    "tiny": StudyConfig(profile="tiny", phases=SIMULATION_PHASES, ssl_rounds=2, ssl_local_epochs=1, finetune_rounds=3,
                        finetune_local_epochs=10, batch_size=4, finetune_lr=1e-4),
    "demo": StudyConfig(profile="demo", phases=SIMULATION_PHASES, ssl_rounds=3, ssl_local_epochs=2, finetune_rounds=5,
                        finetune_local_epochs=6, batch_size=4, finetune_lr=1e-4, ssl_lr=2e-4),
    "full": StudyConfig(profile="full", phases=SIMULATION_PHASES, ssl_rounds=20, ssl_local_epochs=2, finetune_rounds=10,
                        finetune_local_epochs=3, batch_size=4, finetune_lr=1e-4),
}
"""Rounds and epochs per profile: tiny for a smoke run, demo sized to finish in minutes on a laptop CPU.

Fine-tuning: lr 1e-4 and ~30 epochs in all (rounds x local epochs) at batch 4, i.e. a few hundred
optimiser steps on ~50 training cases; lr 1e-3 x 50 epochs drove the training loss to ~0 while the
validation loss rose in the demo study; 5-fold CV on a 100-case synthetic site peaked near 300 steps."""


def run(
    profile: Annotated[str, typer.Option(
        help="tiny (a smoke run, ~2 min), demo (the README's main job, minutes on a laptop CPU) or full "
             "(paper-sized at 1 mm: wants a GPU and hours).")] = "demo",
    out: Annotated[Path, typer.Option(help="Output folder: cohort/, site work folders, run/ with the report.")
                   ] = Path("out/demo"),
    seed: Annotated[int, typer.Option(help="Seeds the cohort and the study.")] = 0,
    workers: Annotated[int, typer.Option(min=1, help="Cases preprocessed in parallel per site.")] = 2,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run in the same --out.")] = False,
) -> None:
    """Run the whole pipeline on a synthetic cohort, as hospitals and a coordinator would.

    1. psp-sim cohort (skipped when --out already holds the same cohort);
    2. psp-client preprocess at every site (cached: reruns skip finished cases);
    3. the federated study as a Flower simulation (one SuperNode per site): stats, SSL
       pretraining, fine-tuning of the fold heads, evaluation at the test site;
    4. report.html and report.md in the run folder.
    """
    if profile not in STUDY_DEFAULTS:
        raise typer.BadParameter(f"{profile!r} is not one of {list(STUDY_DEFAULTS)}", param_hint="--profile")
    out = out.resolve()
    cohort_dir, run_dir = out / "cohort", out / "run"
    started = time.perf_counter()
    _cohort(cohort_dir, profile, seed)
    signing_key, public_key = _signing_keys(out / "keys")
    set_model_signing_key(cohort_dir, public_key)
    for config_path in sorted((cohort_dir / SITE_CONFIG_DIR).glob("*.yaml")):
        site = load_site_config(config_path)
        run_result = preprocess_site(site, PreprocessSettings(profile=profile), workers=workers)
        typer.echo(f"  {site.name}: {run_result.n_ok} of {len(run_result.results)} cases usable "
                   f"(QC: {run_result.qc_markdown})")
    study = replace(STUDY_DEFAULTS[profile], seed=seed, cohort_dir=str(cohort_dir), run_dir=str(run_dir),
                    resume=resume, signing_key=str(signing_key))
    typer.echo(f"federated study: {study.to_run_config()}")
    simulate_study(study)
    typer.echo("central reference: the same model trained on the pooled training data (simulation only)")
    central_reference(cohort_dir, run_dir, study)
    markdown, html = write_report(run_dir, truth_summary=cohort_dir / SUMMARY_FILE)
    typer.echo(f"\ndone in {time.perf_counter() - started:.0f} s")
    typer.echo(f"report:  {html}\n         {markdown}")
    typer.echo(f"models:  {run_dir / 'models'}")
    typer.echo(f"metrics: {run_dir / 'metrics.json'}")


def _signing_keys(keys_dir: Path) -> tuple[Path, Path]:
    """The simulated coordinator's model-signing key pair (made once per --out, as 'psp-server certs' would)."""
    private, public = keys_dir / PRIVATE_KEY_FILE, keys_dir / PUBLIC_KEY_FILE
    if not (private.is_file() and public.is_file()):
        generate_signing_key(private, public)
    return private, public


def _cohort(cohort_dir: Path, profile: str, seed: int) -> None:
    summary_path = cohort_dir / SUMMARY_FILE
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        if summary.get("profile") == profile and summary.get("seed") == seed:
            typer.echo(f"cohort: reusing {cohort_dir}")
            return
    typer.echo(f"cohort: writing the {profile} synthetic cohort to {cohort_dir}")
    generate_cohort(cohort_dir, seed=seed, profile=profile, workers=2)
