"""The site's hash-chained audit log and the allow-list of what may leave."""

from __future__ import annotations

import json
from pathlib import Path

from psp_model.audit import append_audit_entry, verify_audit_log
from psp_model.wire import disallowed_names


def _log(tmp_path: Path, n: int = 4) -> Path:
    path = tmp_path / "audit.jsonl"
    for i in range(n):
        append_audit_entry(path, {"phase": "ssl", "round": i, "arrays": {"encoder.w": [2, 2]}})
    return path


def test_an_intact_log_verifies(tmp_path: Path) -> None:
    assert verify_audit_log(_log(tmp_path)) == []


def test_an_edited_line_is_detected(tmp_path: Path) -> None:
    path = _log(tmp_path)
    lines = path.read_text().splitlines()
    entry = json.loads(lines[1])
    entry["arrays"] = {}
    lines[1] = json.dumps(entry, sort_keys=True)
    path.write_text("\n".join(lines) + "\n")
    assert any("line 2: content does not match its hash" in p for p in verify_audit_log(path))


def test_a_deleted_line_is_detected(tmp_path: Path) -> None:
    path = _log(tmp_path)
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:1] + lines[2:]) + "\n")
    problems = verify_audit_log(path)
    assert any("sequence 2 where 1 was expected" in p for p in problems)
    assert any("does not chain" in p for p in problems)


def test_allow_list_per_phase_and_site_policy() -> None:
    assert disallowed_names("finetune", "arrays", ["head.fc.weight"]) == []
    assert disallowed_names("finetune", "arrays", ["tokens.case1"]) == ["tokens.case1"]
    assert disallowed_names("stats", "metrics", ["n-tp", "case-Burdenko-001-age"]) == ["case-Burdenko-001-age"]
    assert disallowed_names("ssl", "arrays", ["encoder.w"], site_patterns=("head.*",)) == ["encoder.w"]
    assert disallowed_names("no-such-phase", "arrays", ["head.w"]) == ["head.w"]


def test_cli_verifies_the_site_log(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from client.cli import app
    from client.guard import AUDIT_FILE

    config = tmp_path / "site.yaml"
    config.write_text(f"name: a\nroles: [ssl]\nlayout: brats2021\nroot: {tmp_path}\nwork_dir: {tmp_path / 'work'}\n")
    runner = CliRunner()
    missing = runner.invoke(app, ["audit", "verify", "--site-config", str(config)])
    assert missing.exit_code == 1 and "has not sent anything" in missing.output
    log = tmp_path / "work" / AUDIT_FILE
    for i in range(3):
        append_audit_entry(log, {"phase": "ssl", "round": i, "sent": True, "arrays": {"encoder.w": [2]},
                                 "metrics": ["num-examples"], "bytes": 8})
    ok = runner.invoke(app, ["audit", "verify", "--site-config", str(config)])
    assert ok.exit_code == 0 and "3 entries, chain intact" in ok.output
    shown = runner.invoke(app, ["audit", "show", "--site-config", str(config)])
    assert shown.exit_code == 0 and "encoder.w(2,)" in shown.output
    lines = log.read_text().splitlines()
    log.write_text("\n".join([lines[0], lines[2]]) + "\n")
    tampered = runner.invoke(app, ["audit", "verify", "--site-config", str(config)])
    assert tampered.exit_code == 1 and "tampered" in tampered.output
