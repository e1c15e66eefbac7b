"""``psp-server certs``: the federation's private CA, the SuperLink's server certificate, the model-signing keys."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from server.certs import make_certificates

LOCAL_NAMES = ("127.0.0.1", "localhost")


def certs(
    out: Annotated[Path, typer.Option(
        help="Folder for ca.crt, ca.key, server.pem, server.key, model_signing.pem and model_signing.pub.pem.")],
    host: Annotated[list[str], typer.Option(
        help="A DNS name or IP address the sites dial to reach the SuperLink (repeat for several). "
             "127.0.0.1 and localhost are always added, for the coordinator's own commands.")],
    days: Annotated[int, typer.Option(min=1, help="Validity of both certificates.")] = 825,
    overwrite: Annotated[bool, typer.Option(
        help="Replace existing certificates and keys (every site then needs the new ca.crt and "
             "model_signing.pub.pem).")] = False,
) -> None:
    """Make a CA and a server certificate valid for the given host names, and the key that signs models."""
    hosts = list(dict.fromkeys([*host, *LOCAL_NAMES]))
    out.mkdir(parents=True, exist_ok=True)
    try:
        paths = make_certificates(out, hosts, days=days, overwrite=overwrite)
    except FileExistsError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"server certificate for: {', '.join(hosts)} (valid {days} days)")
    signing_key = paths.signing_key.resolve()
    rows = ((paths.ca_cert, "send to every site ('psp-client start --ca ca.crt')"),
            (paths.ca_key, "keep private, ideally offline: it can sign certificates for anyone"),
            (paths.server_cert, f"SuperLink only ('psp-server start --certs {out}')"),
            (paths.server_key, "SuperLink only, never leaves the coordinator"),
            (paths.signing_public_key, "send to every site (site config 'model_signing_key: <its path>'): "
                                       "sites then refuse unsigned or altered models"),
            (paths.signing_key, f"coordinator only: signs released models (run config signing-key=\"{signing_key}\")"))
    width = max(len(str(path)) for path, _ in rows)
    for path, where in rows:
        typer.echo(f"  {str(path).ljust(width)}  -> {where}")
