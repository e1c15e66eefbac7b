"""``psp-client start``: join the federation as a Flower SuperNode with this site's config and key."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from psp_model.errors import ConfigError
from psp_model.sites import load_site_config


def exec_flower(command: str, args: list[str], env: dict[str, str]) -> NoReturn:
    """Replace this process by a Flower command (same venv first), so Ctrl-C and SIGTERM reach it directly."""
    beside = Path(sys.executable).parent / command
    program = str(beside) if beside.is_file() else shutil.which(command)
    if program is None:
        typer.echo(f"error: '{command}' not found beside {sys.executable} or on PATH; install psp-fl "
                   "(it brings flwr) in this environment", err=True)
        raise typer.Exit(1)
    # Flower starts helpers (flower-superexec, flwr-serverapp, flwr-clientapp) by name: this venv's first.
    env = {**env, "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])}
    typer.echo(f"exec: {program} {' '.join(args)}", err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(program, [program, *args], env)


def toml_string(value: str) -> str:
    """A TOML string for Flower's ``key=value`` options (literal quotes: backslashes stay as they are)."""
    return f"'{value}'" if "'" not in value else json.dumps(value)


def start(
    site_config: Annotated[Path, typer.Option(
        "--site-config", "-c", help="This site's YAML. Validated before the SuperNode starts.")],
    superlink: Annotated[str, typer.Option(
        help="The coordinator's SuperLink as HOST:PORT; HOST must be a name in its server certificate.")],
    ca: Annotated[Path | None, typer.Option(
        help="The coordinator's CA certificate (ca.crt, from 'psp-server certs').")] = None,
    key: Annotated[Path | None, typer.Option(
        help="This site's private key (site_key, from 'psp-client keys'); its .pub must be registered "
             "by the coordinator, or the SuperLink refuses the node (Flower logs exit code 305).")] = None,
    runtime_port: Annotated[int, typer.Option(
        help="Local port of the SuperNode's runtime API (127.0.0.1 only). Change it only when several "
             "SuperNodes share one machine.")] = 9094,
    insecure: Annotated[bool, typer.Option(
        help="Plain text, no node authentication: ONLY for a trial SuperLink started with --insecure. "
             "Model updates then travel unencrypted.")] = False,
) -> None:
    """Validate the site config, then run this site's Flower SuperNode until stopped (Ctrl-C).

    Outgoing messages pass the site's allow-list and are written to its audit log
    (<work_dir>/audit/outgoing.jsonl). Flower's own files go to <work_dir>/flwr_home.
    Exit status: 2 for a config error; otherwise the SuperNode's. It is non-zero with "Exit Code: 305" in the
    log when the key is not registered, and also when this site's previous SuperNode died less than about a
    minute ago: the SuperLink counts it online until its heartbeat lapses (up to 60 s). Start again a minute
    later; the site keeps its node id and rejoins the running study.
    """
    try:
        site = load_site_config(site_config)
    except ConfigError as exc:
        typer.echo("error: the site config is not valid:\n" + "\n".join(f"  {p}" for p in exc.problems), err=True)
        raise typer.Exit(2) from None
    args = ["--superlink", superlink, "--port", str(runtime_port),
            "--node-config", f"site-config={toml_string(str(site_config.resolve()))}"]
    if insecure:
        if ca is not None or key is not None:
            raise typer.BadParameter("--insecure cannot be combined with --ca/--key: node authentication needs "
                                     "TLS. Drop --insecure to use them.", param_hint="--insecure")
        typer.echo("WARNING: --insecure: plain-text connection WITHOUT node authentication. Model updates travel "
                   "unencrypted; use this only on a private test network.", err=True)
        args.append("--insecure")
    else:
        for value, option, fix in ((ca, "--ca", "the coordinator's ca.crt"),
                                   (key, "--key", "this site's private key from 'psp-client keys'")):
            if value is None:
                raise typer.BadParameter(f"missing: pass {fix} (or --insecure for a plain-text trial)",
                                         param_hint=option)
            if not value.is_file():
                raise typer.BadParameter(f"{value} not found: pass {fix}", param_hint=option)
        args += ["--root-certificates", str(ca.resolve()), "--auth-supernode-private-key", str(key.resolve())]
    home = Path(site.work_dir) / "flwr_home"
    home.mkdir(parents=True, exist_ok=True)
    typer.echo(f"site {site.name} (roles {','.join(site.roles)}) joining {superlink}", err=True)
    exec_flower("flower-supernode", args, {**os.environ, "FLWR_HOME": str(home)})
