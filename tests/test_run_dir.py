"""Checkpoints in the run directory: atomic, hash-verified, newest round found for resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from server.run_dir import CorruptCheckpointError, RunDir


def test_last_round_is_found_and_verified(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    for round_ in (1, 2, 3):
        run.save_round("finetune", round_, {"head.w": np.full(3, round_, dtype=np.float32)}, fold=1)
    done, arrays = run.last_round("finetune", fold=1)
    assert done == 3 and arrays["head.w"].tolist() == [3, 3, 3]
    assert run.last_round("finetune", fold=2) is None


def test_a_corrupted_checkpoint_is_refused_with_the_fix(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    path = run.save_round("ssl", 1, {"encoder.w": np.zeros(1000, dtype=np.float32)})
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="does not match its SHA-256.*Delete it"):
        run.last_round("ssl")


def test_a_checkpoint_without_its_hash_is_refused(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    path = run.save_round("ssl", 1, {"encoder.w": np.zeros(4)})
    path.with_suffix(".sha256").unlink()
    with pytest.raises(CorruptCheckpointError, match="not written completely"):
        run.last_round("ssl")
