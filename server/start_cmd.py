"""``psp-server start``: the coordinator's Flower SuperLink with TLS and SuperNode authentication."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from client.start_cmd import exec_flower
from server.connection import DEFAULT_PORT, Connection, flwr_env, save_connection

CERT_FILES = ("ca.crt", "server.pem", "server.key")
LOOPBACK = "127.0.0.1"
WILDCARD_HOSTS = ("0.0.0.0", "::", "")


def start(
    state: Annotated[Path, typer.Option(
        help="Folder for the SuperLink's database (registered site keys, runs) and psp-fl's FLWR_HOME.")],
    certs: Annotated[Path | None, typer.Option(help="Folder written by 'psp-server certs'.")] = None,
    host: Annotated[str, typer.Option(help=(
        "Interface to listen on. The default, loopback, keeps every API on this machine: sites then reach the "
        "Fleet API through a reverse proxy that forwards /v1/fleet/ only (docs/DEPLOYMENT.md, 'Network "
        "exposure'). A private IP serves the proxy from another machine; 0.0.0.0 also exposes the "
        "unauthenticated Control API and is warned about."))] = LOOPBACK,
    port: Annotated[int, typer.Option(help="The SuperLink's one HTTPS port (Fleet + Control + Runtime APIs).")
                    ] = DEFAULT_PORT,
    insecure: Annotated[bool, typer.Option(
        help="Plain text and NO site authentication (Flower's node auth needs TLS): trials on a private "
             "network only.")] = False,
) -> None:
    """Run the Flower SuperLink until stopped (Ctrl-C), with TLS and only registered sites admitted.

    Flower serves the Fleet API (what sites use), the Control API (register keys, submit runs) and the
    Runtime API on ONE port. The Control API has no authentication in open-source Flower: anyone who
    reaches the port can register a key or submit code that runs on the coordinator. So it listens on
    loopback unless told otherwise; expose to the sites only the Fleet API, through a reverse proxy that
    forwards /v1/fleet/ alone, or at least a firewall that admits only the sites' addresses (see
    docs/DEPLOYMENT.md).
    """
    if host in WILDCARD_HOSTS:
        typer.echo(f"WARNING: --host {host}: the Control API (no authentication: register keys, submit code that "
                   "runs here) and the Runtime API listen on EVERY interface, beside the Fleet API the sites need.\n"
                   "WARNING: put a reverse proxy that forwards /v1/fleet/ only in front, or firewall the port to "
                   "the sites' addresses (docs/DEPLOYMENT.md, 'Network exposure').", err=True)
    state = state.resolve()
    state.mkdir(parents=True, exist_ok=True)
    args = ["--host", host, "--port", str(port), "--database", str(state / "state.db"),
            "--disable-runtime-dependency-installation"]
    if insecure:
        if certs is not None:
            raise typer.BadParameter("--insecure cannot be combined with --certs; drop one of them",
                                     param_hint="--insecure")
        typer.echo("WARNING: --insecure: the SuperLink runs WITHOUT TLS and WITHOUT site authentication.\n"
                   "WARNING: any machine that reaches this port can join as a site, read the model and submit "
                   "code. Use it only for a trial on a private network.", err=True)
        args.append("--insecure")
        ca = None
    else:
        if certs is None:
            raise typer.BadParameter("the SuperLink needs TLS: make certificates with 'psp-server certs --out DIR "
                                     "--host NAME' and pass --certs DIR (or --insecure for a plain-text trial)",
                                     param_hint="--certs")
        missing = [name for name in CERT_FILES if not (certs / name).is_file()]
        if missing:
            raise typer.BadParameter(f"{', '.join(missing)} not found in {certs}: pass the folder written by "
                                     "'psp-server certs --out DIR'", param_hint="--certs")
        ca = (certs / "ca.crt").resolve()
        args += ["--ssl-ca-certfile", str(ca), "--ssl-certfile", str((certs / "server.pem").resolve()),
                 "--ssl-keyfile", str((certs / "server.key").resolve()), "--enable-supernode-auth"]
    # register/run reach the SuperLink through the interface it listens on (loopback when it listens on all).
    local = LOOPBACK if host in WILDCARD_HOSTS else host
    save_connection(state, Connection(f"{local}:{port}", ca))
    # These switch on Flower's legacy gRPC Control/Fleet servers, which bind 0.0.0.0:9093/9092 whatever --host says.
    env = {k: v for k, v in flwr_env(state).items() if not k.startswith("FLWR_INTERNAL_GRPC_")}
    exec_flower("flower-superlink", args, env)
