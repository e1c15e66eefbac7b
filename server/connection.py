"""The coordinator's Flower connection: a psp-fl-owned ``FLWR_HOME`` under the state folder.

``flwr`` commands (register a site, submit a run) find the SuperLink through a
``[superlink.<name>]`` entry in ``$FLWR_HOME/config.toml``. psp-fl keeps its own FLWR_HOME in
``<state>/flwr_home`` so the user's global ``~/.flwr`` is never read or changed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import tomli  # tomli and tomli-w come with flwr, whose config files are TOML
import tomli_w

from psp_model.io import atomic_write_text

CONNECTION = "psp"
DEFAULT_PORT = 8000  # flower-superlink's own default


@dataclass(frozen=True)
class Connection:
    """How ``flwr`` reaches the SuperLink: ``address`` is HOST:PORT, ``ca_cert`` None means plain text."""

    address: str
    ca_cert: Path | None


def flwr_home(state: Path) -> Path:
    return state.resolve() / "flwr_home"


def flwr_env(state: Path) -> dict[str, str]:
    """The environment for ``flwr`` / ``flower-superlink``: psp-fl's FLWR_HOME, no ``uv sync`` per run."""
    return {**os.environ, "FLWR_HOME": str(flwr_home(state)), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}


def save_connection(state: Path, connection: Connection) -> Path:
    """Write (or replace) ``[superlink.psp]`` in ``<state>/flwr_home/config.toml``; other entries are kept."""
    path = flwr_home(state) / "config.toml"
    config = tomli.loads(path.read_text()) if path.is_file() else {}
    entry: dict[str, object] = {"address": connection.address}
    if connection.ca_cert is None:
        entry["insecure"] = True
    else:
        entry["root-certificates"] = str(connection.ca_cert.resolve())
    config.setdefault("superlink", {})[CONNECTION] = entry
    config["superlink"]["default"] = CONNECTION
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, tomli_w.dumps(config))


def load_connection(state: Path) -> Connection | None:
    path = flwr_home(state) / "config.toml"
    if not path.is_file():
        return None
    entry = tomli.loads(path.read_text()).get("superlink", {}).get(CONNECTION)
    if not isinstance(entry, dict) or "address" not in entry:
        return None
    ca = entry.get("root-certificates")
    return Connection(str(entry["address"]), Path(ca) if ca else None)


def resolve_connection(state: Path, superlink: str | None, certs: Path | None, insecure: bool) -> Connection:
    """The connection given on the command line (saved for next time), else the one ``start`` saved.

    Raises ``ValueError`` naming the missing option when neither exists.
    """
    if superlink is None and certs is None and not insecure:
        saved = load_connection(state)
        if saved is None:
            raise ValueError(f"no SuperLink connection saved in {flwr_home(state)}: start the SuperLink with "
                             f"'psp-server start --state {state}' first, or pass --superlink HOST:PORT --certs DIR")
        return saved
    if superlink is None:
        raise ValueError("--superlink HOST:PORT is missing (the SuperLink's address as this machine reaches it)")
    if insecure:
        connection = Connection(superlink, None)
    else:
        if certs is None:
            raise ValueError("--certs DIR is missing: the folder holding ca.crt (or pass --insecure for a "
                             "plain-text trial SuperLink)")
        ca = certs / "ca.crt"
        if not ca.is_file():
            raise ValueError(f"{ca} not found: pass the folder written by 'psp-server certs --out DIR'")
        connection = Connection(superlink, ca)
    save_connection(state, connection)
    return connection
