"""``psp-server``: the coordinator side. Each subcommand lives in its own module; this file registers them."""

from __future__ import annotations

import typer

from server import certs_cmd, register_cmd, report_cmd, run_cmd, start_cmd

app = typer.Typer(
    name="psp-server",
    help="Coordinate a psp-fl federation: certificates, the Flower SuperLink, site registration, studies.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("certs")(certs_cmd.certs)
app.command("start")(start_cmd.start)
app.command("register")(register_cmd.register)
app.command("run")(run_cmd.run)
app.command("report")(report_cmd.report)
