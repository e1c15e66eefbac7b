"""The Flower ServerApp: parse the study config once, then run the study's phases."""

from __future__ import annotations

from logging import WARNING
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from psp_model.signing import load_study_signing_key
from psp_model.study import StudyConfig
from server.run_dir import RunDir
from server.study_runner import run_study


def build_server_app(study: StudyConfig | None = None, *, expected_nodes: int = 0) -> ServerApp:
    """The ServerApp; ``study`` replaces the run config (Flower's in-process simulation has none).

    ``expected_nodes``: the simulation's SuperNode count, waited for before the first phase.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        config = study or StudyConfig.from_run_config(dict(context.run_config))
        run_dir = Path(config.run_dir) if config.run_dir else Path.cwd() / "runs" / f"run-{grid.run.run_id}"
        signing_key = load_study_signing_key(config.signing_key)
        if signing_key is None:
            log(WARNING, "signing-key is not set: models go out unsigned, and sites with a model_signing_key "
                "will refuse them. Fix: psp-server certs makes model_signing.pem; pass signing-key=<its path>.")
        run_study(grid, config, RunDir(run_dir, signing_key=signing_key), expected_nodes=expected_nodes)

    return app


app = build_server_app()
