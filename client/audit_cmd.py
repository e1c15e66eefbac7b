"""``psp-client audit``: show and verify what this site has sent (its hash-chained audit log)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from client.guard import AUDIT_FILE
from client.preprocess_cmd import SiteConfigOption, load_site_or_exit
from psp_model.audit import verify_audit_log

app = typer.Typer(help="What this site has sent: every outgoing message, hash-chained.", no_args_is_help=True)


def _log_path(site_config: Path) -> Path:
    path = Path(load_site_or_exit(site_config).work_dir) / AUDIT_FILE
    if not path.is_file():
        typer.echo(f"no audit log at {path}: this site has not sent anything yet", err=True)
        raise typer.Exit(1)
    return path


@app.command()
def verify(site_config: SiteConfigOption) -> None:
    """Check that no line of the audit log was edited, deleted or reordered. Exit 1 if one was."""
    path = _log_path(site_config)
    problems = verify_audit_log(path)
    if problems:
        typer.echo(f"{path}: the audit log was tampered with:", err=True)
        for problem in problems:
            typer.echo(f"  {problem}", err=True)
        raise typer.Exit(1)
    count = sum(1 for line in path.read_text().splitlines() if line.strip())
    typer.echo(f"{path}: {count} entries, chain intact")


@app.command("show")
def show(
    site_config: SiteConfigOption,
    last: Annotated[int, typer.Option(min=1, help="How many of the latest entries to show.")] = 20,
) -> None:
    """The latest outgoing messages: time, phase, round, whether sent, arrays and bytes."""
    lines = [json.loads(line) for line in _log_path(site_config).read_text().splitlines() if line.strip()]
    for entry in lines[-last:]:
        arrays = ", ".join(f"{name}{tuple(shape)}" for name, shape in list(entry["arrays"].items())[:4])
        more = f" (+{len(entry['arrays']) - 4} more)" if len(entry["arrays"]) > 4 else ""
        status = "sent" if entry["sent"] else "REFUSED"
        typer.echo(f"{entry['seq']:5d} {entry['time']} {entry['phase']:9s} round {entry['round']:3d} {status:7s} "
                   f"{entry['bytes']:>12,} B  {arrays}{more} metrics={entry['metrics']}")
