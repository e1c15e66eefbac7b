"""Process-level I/O settings: the permissions a new file gets, how OpenMP threads wait."""

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


def test_openmp_threads_wait_passively_unless_the_user_chose() -> None:
    import os
    import subprocess
    import sys

    script = "import psp_model, torch, os; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    chosen = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert chosen.stdout.strip() == "PASSIVE"
    kept = subprocess.run([sys.executable, "-c", script], env={**env, "OMP_WAIT_POLICY": "ACTIVE"},
                          capture_output=True, text=True, check=True)
    assert kept.stdout.strip() == "ACTIVE"
