"""Real Flower processes on 127.0.0.1 for the deployment and fault tests: SuperLink, SuperNodes, studies.

Flower starts its helpers (flower-superexec, flwr-serverapp, flwr-clientapp) in sessions of their own,
so stopping a process group is not enough: :func:`kill_tree` ends a process and everything below it.
"""

from __future__ import annotations

import csv
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import yaml

from psp_model.preprocess.pipeline import PreprocessSettings, preprocess_site
from psp_model.schema import CLINICAL_FILE
from psp_model.site_tasks import initial_ssl_state
from psp_model.sites import load_site_config
from psp_model.study import StudyConfig
from server.run_dir import RunDir

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
T = TypeVar("T")


def env(tmp: Path) -> dict[str, str]:
    # FLWR_HOME points into tmp so that no command can fall back to the user's ~/.flwr.
    # COLUMNS: wide enough that typer never wraps an error message mid-phrase.
    return {**os.environ, "OMP_NUM_THREADS": "1", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": "1", "COLUMNS": "400",
            "FLWR_HOME": str(tmp / "unused_flwr_home")}


def cli(tmp: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / args[0]), *args[1:]], env=env(tmp), capture_output=True, text=True,
                          timeout=timeout, check=False)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc; Linux)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, parents before children."""
    found, queue = [], [pid]
    while queue:
        below = children(queue.pop(0))
        found += below
        queue += below
    return found


def command_line(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def kill_tree(pid: int, sig: signal.Signals = signal.SIGKILL) -> None:
    """Signal ``pid`` and all its descendants (found first, so none is orphaned before it is seen)."""
    for target in [pid, *descendants(pid)]:
        try:
            os.kill(target, sig)
        except ProcessLookupError:
            pass


def wait_for(condition: Callable[[], T], timeout: float, what: str, poll: float = 0.5,
             details: Callable[[], str] = str) -> T:
    """Poll ``condition`` until it returns something truthy; fail naming ``what`` (and ``details()``) after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{details()}")


def tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class Processes:
    """Background commands, each in its own session; teardown ends them and Flower's helpers below them."""

    tmp: Path
    running: list[tuple[subprocess.Popen, Path]] = field(default_factory=list)

    def start(self, name: str, *args: str) -> tuple[subprocess.Popen, Path]:
        log = self.tmp / f"{name}.log"
        with log.open("a") as stream:
            process = subprocess.Popen([str(BIN / args[0]), *args[1:]], env=env(self.tmp), stdout=stream,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        self.running.append((process, log))
        return process, log

    def kill(self, process: subprocess.Popen) -> None:
        """SIGKILL a process and everything below it, as a crashed machine would."""
        kill_tree(process.pid)
        process.wait(timeout=15)

    def stop_all(self) -> None:
        below = {process.pid: descendants(process.pid) for process, _ in self.running if process.poll() is None}
        for process, _ in self.running:
            signal_group(process, signal.SIGTERM)
        for process, _ in self.running:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                signal_group(process, signal.SIGKILL)
                process.wait(timeout=15)
        for pids in below.values():  # Flower's helpers run in sessions of their own
            for pid in pids:
                if "flwr" in command_line(pid) or "flower" in command_line(pid):
                    kill_tree(pid)


def signal_group(process: subprocess.Popen, sig: signal.Signals) -> None:
    try:
        os.killpg(process.pid, sig)  # the group id is the pid: start_new_session=True
    except ProcessLookupError:
        pass


def site_yaml(tiny_cohort: Path, name: str, out: Path) -> Path:
    """A copy of the cohort's site config with absolute root and a work_dir of its own (the cohort stays read-only)."""
    site = load_site_config(tiny_cohort / "site_configs" / f"{name}.yaml")
    return _write_site_yaml(out, {"name": site.name, "roles": list(site.roles), "layout": site.layout,
                                  "root": str(site.root), "enhancing_labels": list(site.enhancing_labels)})


def small_site(tiny_cohort: Path, name: str, out: Path, *, per_class: int, roles: tuple[str, ...]) -> Path:
    """A labelled site of the first ``per_class`` TP and PsP cases of the cohort's psp-case site ``name``.

    Case folders are linked, not copied; ``privacy.min_aggregate_count`` is ``per_class`` so that
    two-fold cross-validation may share its aggregates. Returns the site YAML (work_dir under ``out``).
    """
    source = load_site_config(tiny_cohort / "site_configs" / f"{name}.yaml")
    with (source.root / CLINICAL_FILE).open(newline="") as stream:
        reader = csv.DictReader(stream)
        header, rows = reader.fieldnames, list(reader)
    chosen = [row for label in ("TP", "PsP") for row in [r for r in rows if r["label"] == label][:per_class]]
    assert len(chosen) == 2 * per_class, f"{name} has fewer than {per_class} cases of each class"
    root = out / "data" / name
    root.mkdir(parents=True)
    for row in chosen:
        (root / row["case_id"]).symlink_to(source.root / row["case_id"], target_is_directory=True)
    with (root / CLINICAL_FILE).open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=header)
        writer.writeheader()
        writer.writerows(chosen)
    return _write_site_yaml(out, {"name": name, "roles": list(roles), "layout": source.layout, "root": str(root),
                                  "enhancing_labels": list(source.enhancing_labels),
                                  "privacy": {"min_aggregate_count": per_class}})


def _write_site_yaml(out: Path, config: dict) -> Path:
    path = out / "site_configs" / f"{config['name']}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({**config, "work_dir": str(out / "work" / config["name"])}))
    return path


def preprocess(site_config: Path) -> None:
    """Fill the site's preprocessing cache now, so a study's ``stats`` round finds every case done."""
    preprocess_site(load_site_config(site_config), PreprocessSettings(profile="tiny"), progress=False)


def wait_for_port(port: int, process: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"SuperLink exited {process.returncode}:\n{tail(log)}"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"SuperLink did not listen on {port} within {timeout} s:\n{tail(log)}")


@dataclass
class Federation:
    """A SuperLink with TLS and node auth, and one registered SuperNode per site."""

    tmp: Path
    state: Path
    certs: Path
    address: str
    sites: dict[str, Path]  # name -> site YAML
    processes: Processes
    supernodes: dict[str, subprocess.Popen] = field(default_factory=dict)
    superlink: subprocess.Popen | None = None

    def key(self, name: str) -> Path:
        return self.tmp / "keys" / name / "site_key"

    def work(self, name: str) -> Path:
        return self.tmp / "work" / name

    def start_supernode(self, name: str) -> subprocess.Popen:
        process, _ = self.processes.start(
            f"supernode-{name}", "psp-client", "start", "--site-config", str(self.sites[name]),
            "--superlink", self.address, "--ca", str(self.certs / "ca.crt"), "--key", str(self.key(name)),
            "--runtime-port", str(free_port()))
        self.supernodes[name] = process
        return process

    def logs(self, lines: int = 15) -> str:
        return "\n".join(f"--- {log.name}\n{tail(log, lines)}" for _, log in self.processes.running)


def start_federation(tmp: Path, processes: Processes, sites: dict[str, Path]) -> Federation:
    """Certificates, a SuperLink, and a registered, started SuperNode for each site (name -> site YAML)."""
    certs, state, port = tmp / "certs", tmp / "state", free_port()
    made = cli(tmp, "psp-server", "certs", "--out", str(certs), "--host", "coordinator.example.org")
    assert made.returncode == 0, made.stderr
    superlink, log = processes.start("superlink", "psp-server", "start", "--state", str(state),
                                     "--certs", str(certs), "--host", "127.0.0.1", "--port", str(port))
    wait_for_port(port, superlink, log)
    federation = Federation(tmp, state, certs, f"127.0.0.1:{port}", dict(sites), processes, superlink=superlink)
    for name in sites:
        keys = cli(tmp, "psp-client", "keys", "--out", str(federation.key(name).parent))
        assert keys.returncode == 0 and "site_key.pub" in keys.stdout, keys.stderr
        registered = cli(tmp, "psp-server", "register", "--state", str(state),
                         "--key", str(federation.key(name).with_suffix(".pub")), "--name", name)
        assert registered.returncode == 0, registered.stdout + registered.stderr
        federation.start_supernode(name)
    return federation


def save_encoder(run_dir: Path) -> None:
    """Put the tiny initial encoder where a study without the 'ssl' phase loads it from."""
    ssl_state = initial_ssl_state(StudyConfig(profile="tiny"))
    RunDir(run_dir).save_model("encoder", {k: v for k, v in ssl_state.items() if k.startswith("encoder.")})


def study_command(federation: Federation, run_dir: Path, *config: str, min_sites: int) -> list[str]:
    """``psp-server run`` arguments for a streamed study with run-config overrides ``config`` (KEY=VALUE)."""
    args = ["psp-server", "run", "--state", str(federation.state), "--app", str(REPO), "--run-dir", str(run_dir),
            "--min-sites", str(min_sites), "--stream"]
    for item in config:
        args += ["-c", item]
    return args


def flower_processes(root: subprocess.Popen, program: str) -> Iterator[int]:
    """Pids of ``program`` (e.g. flwr-serverapp) running below ``root``."""
    return (pid for pid in descendants(root.pid) if program in command_line(pid))
