"""A site's append-only, hash-chained log of everything it sent.

Each line is a JSON object with ``seq``, ``prev`` (the previous line's hash) and ``hash`` =
SHA-256 of ``prev`` + the line's other fields. Editing or deleting a line breaks the chain, which
:func:`verify_audit_log` reports. (Cutting lines off the end is only visible against a copy of the
last hash kept elsewhere, e.g. the server's or the site's monitoring.)
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

GENESIS = "0" * 64


def _digest(prev: str, entry: dict[str, Any]) -> str:
    body = json.dumps({k: v for k, v in entry.items() if k not in ("hash", "prev")}, sort_keys=True)
    return hashlib.sha256((prev + body).encode()).hexdigest()


def append_audit_entry(path: Path, entry: dict[str, Any]) -> dict[str, Any]:
    """Append one entry (locked against concurrent writers, fsynced) and return it with its chain fields.

    A failed append (a full disk included) is cut off again, so the log never ends in half a line.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    # Unbuffered: nothing is left in a buffer that closing the file could write after the cut.
    with open(path, "a+b", buffering=0) as stream:
        fcntl.flock(stream, fcntl.LOCK_EX)
        stream.seek(0)
        last = None
        for line in stream:
            if line.strip():
                last = line
        previous = json.loads(last) if last else {"seq": -1, "hash": GENESIS}
        record = {"seq": previous["seq"] + 1, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **entry}
        record["prev"] = previous["hash"]
        record["hash"] = _digest(record["prev"], record)
        size = stream.seek(0, os.SEEK_END)
        pending = memoryview((json.dumps(record, sort_keys=True) + "\n").encode("utf-8"))
        try:
            while pending:
                pending = pending[stream.write(pending):]
            os.fsync(stream.fileno())
        except BaseException:
            os.ftruncate(stream.fileno(), size)
            raise
    return record


def verify_audit_log(path: Path) -> list[str]:
    """Problems found in the chain (empty when intact): edited, deleted or reordered lines."""
    problems, prev, expected_seq = [], GENESIS, 0
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            problems.append(f"line {number}: not valid JSON (edited or truncated)")
            prev, expected_seq = "", expected_seq + 1
            continue
        if record.get("seq") != expected_seq:
            problems.append(f"line {number}: sequence {record.get('seq')} where {expected_seq} was expected "
                            "(a line was deleted or inserted)")
        if record.get("prev") != prev:
            problems.append(f"line {number}: does not chain to the line before (a line was deleted or reordered)")
        if record.get("hash") != _digest(record.get("prev", ""), record):
            problems.append(f"line {number}: content does not match its hash (the line was edited)")
        prev, expected_seq = record.get("hash", ""), (record.get("seq") or 0) + 1
    return problems
