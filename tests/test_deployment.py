"""Real deployment on 127.0.0.1: SuperLink with TLS + node auth, two SuperNodes, a study through the CLIs."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from psp_model.site_tasks import initial_ssl_state
from psp_model.sites import load_site_config
from psp_model.study import StudyConfig
from server.connection import Connection, load_connection, resolve_connection, save_connection
from server.run_dir import RunDir, load_verified_npz

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _env(tmp: Path) -> dict[str, str]:
    # FLWR_HOME points into tmp so that no command can fall back to the user's ~/.flwr.
    # COLUMNS: wide enough that typer never wraps an error message mid-phrase.
    return {**os.environ, "OMP_NUM_THREADS": "1", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": "1", "COLUMNS": "400",
            "FLWR_HOME": str(tmp / "unused_flwr_home")}


def _cli(tmp: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / args[0]), *args[1:]], env=_env(tmp), capture_output=True, text=True,
                          timeout=timeout, check=False)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Processes:
    """Background commands, each in its own session so that teardown ends its Flower children too."""

    tmp: Path
    running: list[tuple[subprocess.Popen, Path]] = field(default_factory=list)

    def start(self, name: str, *args: str) -> tuple[subprocess.Popen, Path]:
        log = self.tmp / f"{name}.log"
        with log.open("w") as stream:
            process = subprocess.Popen([str(BIN / args[0]), *args[1:]], env=_env(self.tmp), stdout=stream,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        self.running.append((process, log))
        return process, log

    def stop_all(self) -> None:
        for process, _ in self.running:
            _signal_group(process, signal.SIGTERM)
        for process, _ in self.running:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                _signal_group(process, signal.SIGKILL)
                process.wait(timeout=15)


def _signal_group(process: subprocess.Popen, sig: signal.Signals) -> None:
    try:
        os.killpg(process.pid, sig)  # the group id is the pid: start_new_session=True
    except ProcessLookupError:
        pass


def _tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


@dataclass(frozen=True)
class Federation:
    tmp: Path
    state: Path
    certs: Path
    address: str
    sites: dict[str, Path]  # name -> site YAML
    processes: Processes


def _site_yaml(tiny_cohort: Path, name: str, out: Path) -> Path:
    """A copy of the cohort's site config with absolute root and a work_dir of its own (the cohort stays read-only)."""
    site = load_site_config(tiny_cohort / "site_configs" / f"{name}.yaml")
    path = out / "site_configs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"name": site.name, "roles": list(site.roles), "layout": site.layout,
                                    "root": str(site.root), "enhancing_labels": list(site.enhancing_labels),
                                    "work_dir": str(out / "work" / name)}))
    return path


def _wait_for_port(port: int, process: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"SuperLink exited {process.returncode}:\n{_tail(log)}"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"SuperLink did not listen on {port} within {timeout} s:\n{_tail(log)}")


@pytest.fixture(scope="module")
def federation(tiny_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    """A SuperLink (TLS, node auth) and SuperNodes for burdenko (train) and uker (test), registered."""
    tmp = tmp_path_factory.mktemp("deployment")
    processes = Processes(tmp)
    try:
        certs, state, port = tmp / "certs", tmp / "state", _free_port()
        made = _cli(tmp, "psp-server", "certs", "--out", str(certs), "--host", "coordinator.example.org")
        assert made.returncode == 0, made.stderr
        superlink, log = processes.start("superlink", "psp-server", "start", "--state", str(state),
                                         "--certs", str(certs), "--host", "127.0.0.1", "--port", str(port))
        _wait_for_port(port, superlink, log)
        sites = {name: _site_yaml(tiny_cohort, name, tmp) for name in ("burdenko", "uker")}
        for name, site_yaml in sites.items():
            keys = _cli(tmp, "psp-client", "keys", "--out", str(tmp / "keys" / name))
            assert keys.returncode == 0 and "site_key.pub" in keys.stdout, keys.stderr
            registered = _cli(tmp, "psp-server", "register", "--state", str(state),
                              "--key", str(tmp / "keys" / name / "site_key.pub"), "--name", name)
            assert registered.returncode == 0, registered.stdout + registered.stderr
            processes.start(f"supernode-{name}", "psp-client", "start", "--site-config", str(site_yaml),
                            "--superlink", f"127.0.0.1:{port}", "--ca", str(certs / "ca.crt"),
                            "--key", str(tmp / "keys" / name / "site_key"), "--runtime-port", str(_free_port()))
        yield Federation(tmp, state, certs, f"127.0.0.1:{port}", sites, processes)
    finally:
        processes.stop_all()


@pytest.mark.slow
def test_unregistered_site_is_refused(federation: Federation, tiny_cohort: Path) -> None:
    stranger = federation.tmp / "stranger"
    keys = stranger / "keys"
    assert _cli(federation.tmp, "psp-client", "keys", "--out", str(keys)).returncode == 0
    process, log = federation.processes.start(
        "supernode-stranger", "psp-client", "start", "--site-config", str(_site_yaml(tiny_cohort, "uker", stranger)),
        "--superlink", federation.address, "--ca", str(federation.certs / "ca.crt"), "--key", str(keys / "site_key"),
        "--runtime-port", str(_free_port()))
    try:
        returncode = process.wait(timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail(f"a SuperNode with an unregistered key was still running after 90 s:\n{_tail(log)}")
    assert returncode != 0
    assert "Exit Code: 305" in log.read_text(), _tail(log)


@pytest.mark.slow
def test_study_runs_over_tls_with_registered_sites(federation: Federation) -> None:
    run_dir = federation.tmp / "run"
    # No 'ssl' site here: the study loads the frozen encoder from the run directory instead.
    ssl_state = initial_ssl_state(StudyConfig(profile="tiny"))
    RunDir(run_dir).save_model("encoder", {k: v for k, v in ssl_state.items() if k.startswith("encoder.")})
    result = _cli(federation.tmp, "psp-server", "run", "--state", str(federation.state), "--app", str(REPO),
                  "--run-dir", str(run_dir), "--min-sites", "2", "--stream",
                  "-c", 'phases="stats,finetune,evaluate"', "-c", 'profile="tiny"', "-c", "folds=2",
                  "-c", "finetune-rounds=1", "-c", "finetune-local-epochs=1", "-c", "round-timeout=150.0",
                  timeout=420)
    logs = "\n".join(_tail(log, 15) for _, log in federation.processes.running)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:] + logs
    assert f"run directory: {run_dir}" in result.stdout
    assert (run_dir / "metrics.json").is_file(), result.stdout[-4000:] + logs
    for fold in (0, 1):
        assert load_verified_npz(run_dir / "models" / f"fold_{fold}.npz")
    stats = RunDir(run_dir).read_json("stats.json")
    assert {s["name"] for s in stats["sites"]} == {"burdenko", "uker"}
    for name in ("burdenko", "uker"):  # the sites' outgoing guard ran in the SuperNodes' ClientApps
        assert (federation.tmp / "work" / name / "audit" / "outgoing.jsonl").is_file()


def test_superlink_refuses_to_start_without_tls(tmp_path: Path) -> None:
    result = _cli(tmp_path, "psp-server", "start", "--state", str(tmp_path / "state"))
    assert result.returncode == 2
    assert "needs TLS" in result.stderr and "psp-server certs" in result.stderr
    (tmp_path / "certs").mkdir()
    result = _cli(tmp_path, "psp-server", "start", "--state", str(tmp_path / "state"), "--certs",
                  str(tmp_path / "certs"))
    assert result.returncode == 2 and "server.pem" in result.stderr


def test_supernode_refuses_a_broken_site_config(tmp_path: Path) -> None:
    broken = tmp_path / "site.yaml"
    broken.write_text("name: Bad Name\nroles: [train]\nlayout: psp-case\nroot: /nonexistent\n")
    result = _cli(tmp_path, "psp-client", "start", "--site-config", str(broken), "--superlink", "127.0.0.1:1",
                  "--insecure")
    assert result.returncode == 2
    assert "key 'name'" in result.stderr and "key 'root'" in result.stderr


def test_supernode_without_tls_needs_insecure(tmp_path: Path) -> None:
    site_yaml = tmp_path / "site.yaml"
    site_yaml.write_text(f"name: uker\nroles: [test]\nlayout: psp-case\nroot: {tmp_path}\n")
    result = _cli(tmp_path, "psp-client", "start", "--site-config", str(site_yaml), "--superlink", "127.0.0.1:1")
    assert result.returncode == 2 and "--ca" in result.stderr
    result = _cli(tmp_path, "psp-client", "start", "--site-config", str(site_yaml), "--superlink", "127.0.0.1:1",
                  "--insecure", "--ca", str(tmp_path / "ca.crt"))
    assert result.returncode == 2 and "node authentication needs TLS" in result.stderr


def test_connection_is_saved_under_the_state_folder(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with pytest.raises(ValueError, match="no SuperLink connection saved"):
        resolve_connection(state, None, None, insecure=False)
    with pytest.raises(ValueError, match="--certs DIR is missing"):
        resolve_connection(state, "10.0.0.1:8000", None, insecure=False)
    with pytest.raises(ValueError, match="--superlink HOST:PORT is missing"):
        resolve_connection(state, None, tmp_path, insecure=False)
    with pytest.raises(ValueError, match="ca.crt not found"):
        resolve_connection(state, "10.0.0.1:8000", tmp_path, insecure=False)
    (tmp_path / "ca.crt").write_text("pem")
    given = resolve_connection(state, "10.0.0.1:8000", tmp_path, insecure=False)
    assert given == Connection("10.0.0.1:8000", (tmp_path / "ca.crt").resolve())
    assert resolve_connection(state, None, None, insecure=False) == given
    save_connection(state, Connection("127.0.0.1:9000", None))
    config = (state / "flwr_home" / "config.toml").read_text()
    assert "insecure = true" in config and 'default = "psp"' in config
    assert load_connection(state) == Connection("127.0.0.1:9000", None)
