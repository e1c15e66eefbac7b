"""``psp-server register``: admit a site's SuperNode by its public key."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Annotated

import typer

from server.connection import CONNECTION, flwr_env, resolve_connection
from server.run_cmd import ConnectionOptions, flwr_command


def register(
    key: Annotated[Path, typer.Option(help="The site's public key (site_key.pub, from 'psp-client keys').")],
    name: Annotated[str, typer.Option(help="The site's name (as in its site config), passed to Flower with the key.")],
    state: ConnectionOptions.state,
    superlink: ConnectionOptions.superlink = None,
    certs: ConnectionOptions.certs = None,
    insecure: ConnectionOptions.insecure = False,
) -> None:
    """Register a site's public key with the running SuperLink (through its Control API)."""
    if not key.is_file():
        raise typer.BadParameter(f"{key} not found: pass the site_key.pub the site sent you", param_hint="--key")
    try:
        resolve_connection(state, superlink, certs, insecure)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    result = subprocess.run(flwr_command("supernode", "register", str(key.resolve()), CONNECTION, "--name", name),
                            env=flwr_env(state), check=False)
    raise typer.Exit(result.returncode)
