"""``psp-client``: the hospital side. Each subcommand lives in its own module; this file registers them."""

from __future__ import annotations

import typer

from client import audit_cmd, keys_cmd, preprocess_cmd, start_cmd

app = typer.Typer(
    name="psp-client",
    help="Run a hospital's side of a psp-fl federation: preprocess and check local data, join a study.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("preprocess")(preprocess_cmd.preprocess)
app.command("check")(preprocess_cmd.check)
app.command("keys")(keys_cmd.keys)
app.command("start")(start_cmd.start)
app.add_typer(audit_cmd.app, name="audit")
