"""Real deployment on 127.0.0.1: SuperLink with TLS + node auth, two SuperNodes, a study through the CLIs."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner
from deployment_helpers import (
    Federation,
    Processes,
    cli,
    free_port,
    save_encoder,
    site_yaml,
    start_federation,
    study_command,
    tail,
)

from server.connection import Connection, load_connection, resolve_connection, save_connection
from server.run_dir import RunDir, load_verified_npz


@pytest.fixture(scope="module")
def federation(tiny_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    """A SuperLink (TLS, node auth) and SuperNodes for burdenko (train) and uker (test), registered."""
    tmp = tmp_path_factory.mktemp("deployment")
    processes = Processes(tmp)
    try:
        sites = {name: site_yaml(tiny_cohort, name, tmp) for name in ("burdenko", "uker")}
        yield start_federation(tmp, processes, sites)
    finally:
        processes.stop_all()


@pytest.mark.slow
def test_unregistered_site_is_refused(federation: Federation, tiny_cohort: Path) -> None:
    stranger = federation.tmp / "stranger"
    keys = stranger / "keys"
    assert cli(federation.tmp, "psp-client", "keys", "--out", str(keys)).returncode == 0
    process, log = federation.processes.start(
        "supernode-stranger", "psp-client", "start", "--site-config", str(site_yaml(tiny_cohort, "uker", stranger)),
        "--superlink", federation.address, "--ca", str(federation.certs / "ca.crt"), "--key", str(keys / "site_key"),
        "--runtime-port", str(free_port()))
    try:
        returncode = process.wait(timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail(f"a SuperNode with an unregistered key was still running after 90 s:\n{tail(log)}")
    assert returncode != 0
    assert "Exit Code: 305" in log.read_text(), tail(log)


@pytest.mark.slow
def test_study_runs_over_tls_with_registered_sites(federation: Federation) -> None:
    run_dir = federation.tmp / "run"
    save_encoder(run_dir)  # no 'ssl' site here: the study loads the frozen encoder from the run directory
    result = cli(federation.tmp, *study_command(
        federation, run_dir, 'phases="stats,finetune,evaluate"', 'profile="tiny"', "folds=2", "finetune-rounds=1",
        "finetune-local-epochs=1", "round-timeout=150.0", min_sites=2), timeout=420)
    logs = federation.logs()
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
    result = cli(tmp_path, "psp-server", "start", "--state", str(tmp_path / "state"))
    assert result.returncode == 2
    assert "needs TLS" in result.stderr and "psp-server certs" in result.stderr
    (tmp_path / "certs").mkdir()
    result = cli(tmp_path, "psp-server", "start", "--state", str(tmp_path / "state"), "--certs",
                 str(tmp_path / "certs"))
    assert result.returncode == 2 and "server.pem" in result.stderr


def test_supernode_refuses_a_broken_site_config(tmp_path: Path) -> None:
    broken = tmp_path / "site.yaml"
    broken.write_text("name: Bad Name\nroles: [train]\nlayout: psp-case\nroot: /nonexistent\n")
    result = cli(tmp_path, "psp-client", "start", "--site-config", str(broken), "--superlink", "127.0.0.1:1",
                 "--insecure")
    assert result.returncode == 2
    assert "key 'name'" in result.stderr and "key 'root'" in result.stderr


def test_supernode_without_tls_needs_insecure(tmp_path: Path) -> None:
    site_yaml = tmp_path / "site.yaml"
    site_yaml.write_text(f"name: uker\nroles: [test]\nlayout: psp-case\nroot: {tmp_path}\n")
    result = cli(tmp_path, "psp-client", "start", "--site-config", str(site_yaml), "--superlink", "127.0.0.1:1")
    assert result.returncode == 2 and "--ca" in result.stderr
    result = cli(tmp_path, "psp-client", "start", "--site-config", str(site_yaml), "--superlink", "127.0.0.1:1",
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


@pytest.mark.parametrize(("host", "warned"), [(None, False), ("10.1.2.3", False), ("0.0.0.0", True)])
def test_superlink_listens_on_loopback_unless_told_and_warns_on_every_interface(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, host: str | None, warned: bool) -> None:
    import server.start_cmd
    from server.cli import app

    launched = {}
    monkeypatch.setattr(server.start_cmd, "exec_flower",
                        lambda command, args, env: launched.update(args=args, env=env))
    monkeypatch.setenv("FLWR_INTERNAL_GRPC_CONTROL_API", "1")
    options = [] if host is None else ["--host", host]
    result = CliRunner().invoke(app, ["start", "--state", str(tmp_path / "state"), "--insecure", *options])
    assert result.exit_code == 0, result.output
    args = launched["args"]
    assert args[args.index("--host") + 1] == (host or "127.0.0.1")
    assert not any(k.startswith("FLWR_INTERNAL_GRPC_") for k in launched["env"])
    assert ("Control API" in result.output and "EVERY interface" in result.output) is warned
