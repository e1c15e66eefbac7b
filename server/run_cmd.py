"""``psp-server run``: submit a study to the running SuperLink."""

from __future__ import annotations

import datetime as dt
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer

from client.start_cmd import toml_string
from server.connection import CONNECTION, flwr_env, resolve_connection

_STARTED_RUN = re.compile(r"Successfully started run (\d+)")


class ConnectionOptions:
    """Options shared by the commands that talk to the SuperLink's Control API."""

    state = Annotated[Path, typer.Option(
        envvar="PSP_SERVER_STATE", help="The folder given to 'psp-server start --state' (holds the connection).")]
    superlink = Annotated[str | None, typer.Option(
        help="SuperLink address as HOST:PORT as seen from here (default: the one 'psp-server start' saved).")]
    certs = Annotated[Path | None, typer.Option(help="Folder holding ca.crt (default: the one 'start' saved).")]
    insecure = Annotated[bool, typer.Option(help="Plain-text SuperLink (started with --insecure).")]


def flwr_command(*args: str) -> list[str]:
    """``flwr`` from this environment (the SuperLink and every site must run the same Flower version)."""
    beside = Path(sys.executable).parent / "flwr"
    return [str(beside) if beside.is_file() else "flwr", *args]


def run(
    state: ConnectionOptions.state,
    app: Annotated[Path, typer.Option(help="The psp-fl source folder (with pyproject.toml) to submit.")] = Path("."),
    config: Annotated[list[str] | None, typer.Option(
        "--config", "-c", help="Run-config override KEY=VALUE in TOML syntax (strings in quotes), e.g. "
                               "-c 'phases=\"stats,ssl\"' -c folds=5. Repeatable.")] = None,
    run_dir: Annotated[Path | None, typer.Option(
        help="Where the SuperLink writes this study's outputs (default: <state>/runs/<UTC time>).")] = None,
    min_sites: Annotated[int, typer.Option(
        min=0, help="Sites the study waits for before its first phase (run config min-sites; up to "
                    "round-timeout) and must hear statistics from. 0: start with whoever is connected.")] = 0,
    stream: Annotated[bool, typer.Option(help="Follow the run's log until it ends.")] = False,
    superlink: ConnectionOptions.superlink = None,
    certs: ConnectionOptions.certs = None,
    insecure: ConnectionOptions.insecure = False,
) -> None:
    """Submit a study (the ServerApp in --app) with run-config overrides; print where its outputs go.

    With --stream the exit status is the study's: 1 when it failed (its error is in the streamed log).
    """
    overrides = list(config or [])
    if any(item.split("=", 1)[0].strip() == "run-dir" for item in overrides):
        raise typer.BadParameter("give the run directory with --run-dir (it is made absolute here)",
                                 param_hint="--config")
    if not (app / "pyproject.toml").is_file():
        raise typer.BadParameter(f"{app.resolve()} has no pyproject.toml: pass the psp-fl source folder",
                                 param_hint="--app")
    try:
        resolve_connection(state, superlink, certs, insecure)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    env = flwr_env(state)
    run_dir = (run_dir or state / "runs" / dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")).resolve()
    command = flwr_command("run", str(app.resolve()), CONNECTION)
    for item in [*overrides, f"run-dir={toml_string(str(run_dir))}", f"min-sites={min_sites}"]:
        command += ["--run-config", item]
    if stream:
        command.append("--stream")
    typer.echo(f"run directory: {run_dir}")
    returncode, run_id = _run_and_echo(command, env)
    if returncode != 0:
        typer.echo(f"run directory: {run_dir} (flwr exited {returncode})")
        raise typer.Exit(returncode)
    typer.echo(f"run directory: {run_dir}")
    # 'flwr run --stream' exits 0 whatever became of the run: ask the SuperLink how the study ended.
    status = _run_status(run_id, env) if stream and run_id else None
    if status is not None and status != "finished:completed":
        typer.echo(f"error: the study (run {run_id}) ended '{status}': the ServerApp's error is in the log above. "
                   "After fixing its cause, rerun with -c resume=true and the same --run-dir to continue from the "
                   "last checkpoint.", err=True)
        raise typer.Exit(1)


def _run_and_echo(command: list[str], env: dict[str, str]) -> tuple[int, str | None]:
    """Run ``flwr run``, echoing its output as it comes; return its exit status and the run id it printed."""
    run_id = None
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True, errors="replace") as process:
        for line in process.stdout:
            typer.echo(line, nl=False)
            if run_id is None and (found := _STARTED_RUN.search(line)):
                run_id = found.group(1)
    return process.returncode, run_id


def _run_status(run_id: str, env: dict[str, str]) -> str | None:
    """The run's status as the SuperLink reports it (e.g. ``finished:failed``); None when it cannot say."""
    result = subprocess.run(flwr_command("ls", CONNECTION, "--run-id", run_id, "--format", "json"), env=env,
                            capture_output=True, text=True, check=False)
    try:
        runs = json.loads(result.stdout)["runs"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return None
    return str(runs[0]["status"]) if runs else None
