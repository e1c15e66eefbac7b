"""Faults: a site killed mid-round, the coordinator killed mid-study, a corrupted checkpoint, a full disk.

The process tests run a real SuperLink (TLS, node auth) and two training SuperNodes on 127.0.0.1
through psp-server / psp-client. What Flower 1.41 does that they rely on: a killed SuperNode counts
as online until its heartbeat lapses (up to 2 x 30 s), after which the SuperLink answers for it
with a "Node Unavailable" error reply; a node registered by key keeps its node id when it comes
back, and the SuperLink refuses it (exit code 305) while its old session still counts as online.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from deployment_helpers import (
    Federation,
    Processes,
    flower_processes,
    kill_tree,
    preprocess,
    save_encoder,
    small_site,
    start_federation,
    study_command,
    tail,
    wait_for,
)

from psp_model import audit
from psp_model import io as psp_io
from psp_model.audit import append_audit_entry, verify_audit_log
from psp_model.evaluate.report import write_report
from psp_model.io import atomic_write_text
from server.run_dir import CorruptCheckpointError, RunDir, load_verified_npz

# Deterministic and small: one thread per process (env of every command), a fixed seed, two folds.
STUDY = ('phases="stats,finetune"', 'profile="tiny"', "folds=2", "finetune-local-epochs=1", "seed=3",
         "min-replies=1", "round-timeout=150.0")
CASES_PER_CLASS = 4


@pytest.fixture(scope="module")
def federation(tiny_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    """Two training sites (burdenko and the labelled uker cases), 8 cases each, already preprocessed."""
    tmp = tmp_path_factory.mktemp("faults")
    processes = Processes(tmp)
    sites = {name: small_site(tiny_cohort, name, tmp, per_class=CASES_PER_CLASS, roles=("train",))
             for name in ("burdenko", "uker")}
    for site in sites.values():
        preprocess(site)
    try:
        yield start_federation(tmp, processes, sites)
    finally:
        processes.stop_all()


def _start_study(federation: Federation, name: str, run_dir: Path, *config: str) -> tuple[subprocess.Popen, Path]:
    if not (run_dir / "models" / "encoder.npz").is_file():
        save_encoder(run_dir)
    return federation.processes.start(name, *study_command(federation, run_dir, *STUDY, *config, min_sites=2))


def _finish(federation: Federation, study: tuple[subprocess.Popen, Path], timeout: float) -> tuple[int, str]:
    process, log = study
    try:
        returncode = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the study was still running after {timeout} s:\n{tail(log, 60)}\n{federation.logs()}")
    return returncode, log.read_text(errors="replace")


def _wait_while_running(federation: Federation, study: tuple[subprocess.Popen, Path], condition: Callable[[], object],
                        timeout: float, what: str) -> None:
    """Wait for ``condition``; fail at once, showing every process's log, when the study ends first."""
    process, _ = study
    wait_for(lambda: condition() or process.poll() is not None, timeout, what, details=lambda: federation.logs(40))
    assert process.poll() is None, f"the study ended ({process.returncode}) before {what}:\n{federation.logs(40)}"


def _sent(audit_log: Path, phase: str) -> bool:
    lines = audit_log.read_text().splitlines() if audit_log.is_file() else []
    return any(json.loads(line)["phase"] == phase for line in lines)


def _finetune_rounds(run_dir: Path) -> list[dict]:
    return [r for r in RunDir(run_dir).read_json("rounds.json") if r["phase"] == "finetune"]


def _node_id(run_dir: Path, site: str) -> int:
    return next(s["node_id"] for s in RunDir(run_dir).read_json("stats.json")["sites"] if s["name"] == site)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_site_killed_mid_round_is_left_out_and_rejoins(federation: Federation) -> None:
    run_dir = federation.tmp / "run-site-killed"
    process, log = study = _start_study(federation, "study-site-killed", run_dir, "finetune-rounds=1")
    uker = federation.supernodes["uker"]
    _wait_while_running(federation, study, lambda: _sent(federation.work("uker") / "audit" / "outgoing.jsonl",
                                                         "install"), 300, "uker to install the study's model")
    installing = set(flower_processes(uker, "flwr-clientapp"))
    _wait_while_running(federation, study, lambda: set(flower_processes(uker, "flwr-clientapp")) - installing, 120,
                        "uker's fine-tuning ClientApp to start")
    federation.processes.kill(uker)  # the SuperNode, its SuperExec and the ClientApp mid-training

    # The round ends once the SuperLink marks uker offline; only then may uker come back (before, it
    # is refused with exit code 305), under the node id the study's site list holds.
    fold_0 = run_dir / "checkpoints" / "finetune" / "fold_0" / "round_001.sha256"
    wait_for(lambda: fold_0.is_file() or process.poll() is not None, 300, "fold 0 to end without uker",
             details=lambda: federation.logs(40))
    federation.start_supernode("uker")
    returncode, text = _finish(federation, (process, log), timeout=300)
    assert returncode == 0, text[-4000:] + federation.logs()
    uker_id = _node_id(run_dir, "uker")
    rounds = _finetune_rounds(run_dir)
    assert [(r["fold"], r["round"]) for r in rounds] == [(0, 1), (1, 1)]
    assert rounds[0]["replies"] == 1 and "Node Unavailable" in rounds[0]["failures"][str(uker_id)]  # JSON: str keys
    assert "site uker left out: Error: Node Unavailable" in text
    # Fold 1 began while uker was restarting: it has uker's reply or says why not.
    assert rounds[1]["replies"] + len(rounds[1]["failures"]) + len(rounds[1]["missing"]) == 2, rounds[1]
    for fold in (0, 1):
        assert load_verified_npz(run_dir / "models" / f"fold_{fold}.npz")
    supernode_log = federation.tmp / "supernode-uker.log"
    node_ids = wait_for(lambda: (ids := re.findall(r"SuperNode ID: (\d+)", supernode_log.read_text())) and
                        len(ids) == 2 and ids, 120, "the restarted uker SuperNode to join")
    assert node_ids == [str(uker_id)] * 2, tail(supernode_log)  # the next study (below) has both sites again


@pytest.fixture(scope="module")
def reference_run(federation: Federation) -> Path:
    run_dir = federation.tmp / "run-reference"
    returncode, log = _finish(federation, _start_study(federation, "study-reference", run_dir, "finetune-rounds=2"),
                              timeout=500)
    assert returncode == 0, log[-4000:] + federation.logs()
    assert {s["name"] for s in RunDir(run_dir).read_json("stats.json")["sites"]} == {"burdenko", "uker"}
    assert [r["replies"] for r in _finetune_rounds(run_dir)] == [2, 2, 2, 2]
    return run_dir


@pytest.fixture(scope="module")
def crashed_run(federation: Federation, reference_run: Path) -> Path:
    """A study whose ServerApp (flwr-serverapp) and ``psp-server run`` were SIGKILLed after fold 0 round 1."""
    run_dir = federation.tmp / "run-crashed"
    process, log = _start_study(federation, "study-crashed", run_dir, "finetune-rounds=2")
    first = run_dir / "checkpoints" / "finetune" / "fold_0" / "round_001.sha256"
    wait_for(lambda: first.is_file() or process.poll() is not None, 400, f"{first.name} of fold 0",
             details=lambda: federation.logs(40))
    serverapps = list(flower_processes(federation.superlink, "flwr-serverapp"))
    assert process.poll() is None and len(serverapps) == 1, tail(log, 60)
    kill_tree(serverapps[0])
    federation.processes.kill(process)
    assert not (run_dir / "models" / "fold_1.npz").exists(), "the crash came too late to test resuming"
    return run_dir


def _checkpointed(run_dir: Path, fold: int) -> int:
    return len(list((run_dir / "checkpoints" / "finetune" / f"fold_{fold}").glob("round_*.npz")))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_coordinator_killed_mid_study_resumes_to_the_same_weights(
        federation: Federation, reference_run: Path, crashed_run: Path) -> None:
    run_dir = federation.tmp / "run-resumed"
    shutil.copytree(crashed_run, run_dir)
    done = _checkpointed(run_dir, 0)
    expected_rounds = [(fold, r) for fold in (0, 1) for r in range(_checkpointed(run_dir, fold) + 1, 3)]
    returncode, log = _finish(federation, _start_study(federation, "study-resumed", run_dir, "finetune-rounds=2",
                                                        "resume=true"), timeout=500)
    assert returncode == 0, log[-4000:] + federation.logs()
    assert f"finetune fold 0: resuming after round {done} of 2" in log
    assert [(r["fold"], r["round"]) for r in _finetune_rounds(run_dir)] == expected_rounds, "resume redid rounds"
    for fold in (0, 1):
        expected = load_verified_npz(reference_run / "models" / f"fold_{fold}.npz")
        resumed = load_verified_npz(run_dir / "models" / f"fold_{fold}.npz")
        assert expected.keys() == resumed.keys()
        for name in expected:
            assert np.array_equal(resumed[name], expected[name]), f"fold {fold} {name} differs from the reference"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_corrupted_checkpoint_is_refused_on_resume(federation: Federation, crashed_run: Path) -> None:
    run_dir = federation.tmp / "run-corrupted"
    shutil.copytree(crashed_run, run_dir)
    newest = max((run_dir / "checkpoints" / "finetune" / "fold_0").glob("round_*.npz"))
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    returncode, log = _finish(federation, _start_study(federation, "study-corrupted", run_dir, "finetune-rounds=2",
                                                        "resume=true"), timeout=400)
    assert returncode == 1, log[-4000:]
    assert f"{newest.name} does not match its SHA-256" in log and "Delete it to resume from the round before" in log
    assert "ended 'finished:failed'" in log and "rerun with -c resume=true" in log
    assert not (run_dir / "models" / "fold_0.npz").exists()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_site_policy_refusal_is_logged_at_the_site_and_reported_as_a_failed_reply(federation: Federation) -> None:
    audit_log = federation.work("uker") / "audit" / "outgoing.jsonl"

    def refused_finetune() -> list[dict]:
        lines = audit_log.read_text().splitlines() if audit_log.is_file() else []
        return [e for e in map(json.loads, lines) if e["phase"] == "finetune" and not e["sent"]]

    before = len(refused_finetune())
    site_yaml = federation.sites["uker"]
    original = site_yaml.read_text()
    config = yaml.safe_load(original)
    config["privacy"]["allowed_arrays"] = ["encoder.*"]  # this site now lets no head arrays leave
    site_yaml.write_text(yaml.safe_dump(config))
    try:
        run_dir = federation.tmp / "run-refused"
        returncode, log = _finish(federation, _start_study(federation, "study-refused", run_dir, "finetune-rounds=1"),
                                  timeout=400)
    finally:
        site_yaml.write_text(original)
    assert returncode == 0, log[-4000:] + federation.logs()
    uker_id = str(_node_id(run_dir, "uker"))
    rounds = _finetune_rounds(run_dir)
    assert rounds and all(r["replies"] == 1 and "site uker refused to send" in r["failures"][uker_id] for r in rounds)
    refused = refused_finetune()[before:]
    assert len(refused) == len(rounds)
    assert all(e["arrays"] and all(name.startswith("head.") for name in e["arrays"]) for e in refused)
    assert all("not allowed" in " ".join(e["refused"]) for e in refused)
    assert verify_audit_log(audit_log) == []


def _full_disk(monkeypatch: pytest.MonkeyPatch, *, after: int = 0) -> None:
    """Let ``after`` file writes through, then write half of each and fail as a full disk does (ENOSPC)."""
    real_write_bytes, calls = Path.write_bytes, []

    def write_bytes(self: Path, data: bytes) -> int:
        calls.append(self)
        if len(calls) <= after:
            return real_write_bytes(self, data)
        real_write_bytes(self, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

    def write_text(self: Path, text: str, encoding: str | None = None, errors: str | None = None,
                   newline: str | None = None) -> int:
        return write_bytes(self, text.encode(encoding or "utf-8"))

    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    monkeypatch.setattr(Path, "write_text", write_text)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("failing", ["write", "fsync", "rename"])
def test_an_atomic_write_that_fails_anywhere_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                failing: str) -> None:
    target = atomic_write_text(tmp_path / "rounds.json", "old")

    def no_space(*args: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if failing == "write":
        _full_disk(monkeypatch)
    else:
        monkeypatch.setattr(psp_io.os, "fsync" if failing == "fsync" else "replace", no_space)
    with pytest.raises(OSError, match="No space left on device"):
        atomic_write_text(target, "new")
    monkeypatch.undo()
    assert _files(tmp_path) == {"rounds.json": b"old"}


def test_a_full_disk_leaves_the_last_checkpoint_as_it_was(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = RunDir(tmp_path)
    run.save_round("finetune", 1, {"head.w": np.ones(64, dtype=np.float32)}, fold=0)
    before = _files(tmp_path)
    _full_disk(monkeypatch)
    with pytest.raises(OSError, match="No space left on device"):
        run.save_round("finetune", 2, {"head.w": np.full(64, 2, dtype=np.float32)}, fold=0)
    monkeypatch.undo()
    assert _files(tmp_path) == before  # no round 2, no temporary file
    done, arrays = run.last_round("finetune", fold=0)
    assert done == 1 and arrays["head.w"].tolist() == [1.0] * 64


def test_a_full_disk_while_writing_the_digest_leaves_a_checkpoint_resume_refuses(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = RunDir(tmp_path)
    _full_disk(monkeypatch, after=1)  # the arrays are written, their SHA-256 is not
    with pytest.raises(OSError, match="No space left on device"):
        run.save_round("ssl", 1, {"encoder.w": np.zeros(8, dtype=np.float32)})
    monkeypatch.undo()
    assert sorted(_files(tmp_path)) == ["checkpoints/ssl/round_001.npz"]
    with pytest.raises(CorruptCheckpointError, match="round_001.sha256: it was not written completely; delete it"):
        run.last_round("ssl")


def test_a_full_disk_keeps_the_released_model_and_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = RunDir(tmp_path)
    run.save_model("fold_0", {"head.w": np.ones(4, dtype=np.float32)})
    run.write_json("metrics.json", {"auc": 0.5})
    before = _files(tmp_path)
    _full_disk(monkeypatch)
    with pytest.raises(OSError, match="No space left on device"):
        run.save_model("fold_0", {"head.w": np.zeros(4, dtype=np.float32)})
    with pytest.raises(OSError, match="No space left on device"):
        run.write_json("metrics.json", {"auc": 0.9})
    monkeypatch.undo()
    assert _files(tmp_path) == before
    assert load_verified_npz(tmp_path / "models" / "fold_0.npz")["head.w"].tolist() == [1.0] * 4


def test_a_full_disk_during_the_report_leaves_no_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                               ) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"profile": "tiny"}))
    _full_disk(monkeypatch, after=1)  # report.md is written, report.html is not
    with pytest.raises(OSError, match="No space left on device"):
        write_report(tmp_path)
    monkeypatch.undo()
    assert sorted(_files(tmp_path)) == ["config.json", "report.md"]


class _HalfWrites(io.FileIO):
    """An unbuffered file whose writes put half the bytes on disk and then fail as a full disk does."""

    def write(self, data: bytes) -> int:
        super().write(bytes(data)[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("failing", ["write", "fsync"])
def test_a_failed_audit_append_leaves_no_half_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   failing: str) -> None:
    path = tmp_path / "outgoing.jsonl"
    for round_ in (1, 2):
        append_audit_entry(path, {"phase": "finetune", "round": round_, "arrays": {"head.w": [4]}})
    before = path.read_bytes()
    if failing == "write":
        monkeypatch.setattr(audit, "open", lambda path, mode, buffering: _HalfWrites(path, mode), raising=False)
    else:  # the whole line reached the page cache; the disk refused it at fsync
        def fsync(fd: int) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(audit.os, "fsync", fsync)
    with pytest.raises(OSError, match="No space left on device"):
        append_audit_entry(path, {"phase": "finetune", "round": 3, "arrays": {"head.w": [4]}})
    monkeypatch.undo()
    assert path.read_bytes() == before
    record = append_audit_entry(path, {"phase": "finetune", "round": 3, "arrays": {"head.w": [4]}})
    assert record["seq"] == 2 and verify_audit_log(path) == []
    assert path.read_bytes().startswith(before)
