"""``psp-client keys``: this site's SuperNode key pair."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from client.keys import make_site_keys


def keys(
    out: Annotated[Path, typer.Option(help="Folder for site_key (private) and site_key.pub.")],
    overwrite: Annotated[bool, typer.Option(
        help="Replace an existing key pair (the coordinator must then register the new .pub).")] = False,
) -> None:
    """Make the key pair that identifies this site's SuperNode to the coordinator."""
    out.mkdir(parents=True, exist_ok=True)
    try:
        private, public = make_site_keys(out, overwrite=overwrite)
    except FileExistsError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"private key: {private}  (stays here; 'psp-client start --key {private}')")
    typer.echo(f"public key:  {public}  (send this file to the coordinator, who runs "
               f"'psp-server register --key {public.name} --name <site>')")
