"""Crash-safe writes: the permissions a new file gets."""

from __future__ import annotations

import stat
from pathlib import Path

from psp_model.io import NEW_FILE_MODE, atomic_write, atomic_write_text
from psp_model.signing import generate_signing_key


def test_written_files_get_the_umask_mode_and_private_keys_stay_private(tmp_path: Path) -> None:
    report = atomic_write_text(tmp_path / "report.md", "# report\n")
    figure = atomic_write(tmp_path / "roc.png", lambda tmp: tmp.write_bytes(b"png"))
    for path in (report, figure):
        assert stat.S_IMODE(path.stat().st_mode) == NEW_FILE_MODE
    assert NEW_FILE_MODE & 0o400 and not NEW_FILE_MODE & 0o111
    generate_signing_key(tmp_path / "model_signing.pem", tmp_path / "model_signing.pub.pem")
    assert stat.S_IMODE((tmp_path / "model_signing.pem").stat().st_mode) == 0o600
