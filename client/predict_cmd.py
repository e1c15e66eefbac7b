"""``psp-predict``: one new case through a released fold ensemble, with the reasons and a map.

Everything runs locally: the case is preprocessed like a site's cases and nothing leaves the machine.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from psp_model.errors import CaseError, ConfigError

app = typer.Typer(name="psp-predict", add_completion=False, pretty_exceptions_enable=False)


@app.command()
def predict(
    run: Annotated[Path, typer.Option(
        "--run", help="Run directory of a finished study: reads its models/ (ensemble.json, encoder.npz, "
                      "fold_K.npz), each checked against its SHA-256.")],
    case: Annotated[Path, typer.Option(
        "--case", help="The case folder in the psp-case layout (t1ce.nii.gz, flair.nii.gz, lesion.nii.gz, ct/, "
                       "rtdose.dcm). Clinical values: CASE/clinical.json if present, else the case's row in the "
                       "clinical.csv beside the folder.")],
    site_config: Annotated[Path | None, typer.Option(
        "--site-config", help="The site's YAML: its enhancing lesion labels (default: BraTS labels 1 and 4) "
                              "and its model_signing_key (see --trust).")
    ] = None,
    out: Annotated[Path | None, typer.Option(
        help="Folder for prediction.json and the attention map PNG. Default: ./prediction-<case folder name>.")
    ] = None,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print prediction.json to stdout instead of the readable summary (for scripts).")] = False,
    trust: Annotated[Path | None, typer.Option(
        help="The coordinator's model_signing.pub.pem: refuse any model file or ensemble.json not signed by it. "
             "Default: the site config's model_signing_key, if any. Recommended whenever the models were "
             "copied from elsewhere.")] = None,
    device: Annotated[str, typer.Option(help="'auto' (CUDA if available), 'cpu' or 'cuda'.")] = "auto",
) -> None:
    """Probability of true progression (vs pseudoprogression) for one case, with the spread over the fold
    models, the clinical/dose features that moved it most, and a cross-attention map over the T1CE.

    Exit status: 0 done, 2 bad input (the message names the case or file and the fix).
    """
    from psp_model.io import atomic_write_text
    from psp_model.predict import load_ensemble, predict_case
    from psp_model.sites import load_site_config

    out = out or Path.cwd() / f"prediction-{case.absolute().name}"
    try:
        site = None if site_config is None else load_site_config(site_config, require_root=False)
        trust = trust or (site.model_signing_key if site else None)
        typer.echo(f"psp-predict: run {run}, case {case}, site config {site_config or '-'}, out {out}, "
                   f"trust {trust or '-'}, device {device}", err=True)
        ensemble = load_ensemble(run, trust=trust)
        prediction = predict_case(ensemble, case, site_config=site, out_dir=out, device=device)
    except CaseError as exc:
        _fail(f"case {exc.case_id}: {exc.reason}")
    except ConfigError as exc:
        _fail("; ".join(exc.problems))
    payload = prediction.to_json()
    path = atomic_write_text(out / "prediction.json", json.dumps(payload, indent=2))
    if as_json:
        typer.echo(json.dumps(payload, indent=2))
        return
    typer.echo(prediction.summary())
    typer.echo(f"  written: {path}")


def _fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def main() -> None:
    app()
