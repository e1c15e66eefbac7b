"""Crash-safe file writes: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, fsync it, then rename it over ``path``.

    If ``write`` fails (a full disk included) the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as stream:
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def sha256_files(paths: Iterable[Path], *, extra: bytes = b"") -> str:
    """SHA-256 over the names and contents of ``paths`` (in the given order) plus ``extra``."""
    digest = hashlib.sha256(extra)
    for path in paths:
        digest.update(str(Path(path).name).encode())
        with open(path, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def atomic_save_npz(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    """``np.savez`` ``arrays`` to ``path`` atomically (through a stream: np.savez renames plain paths)."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as stream:
            np.savez(stream, **arrays)

    return atomic_write(path, write)
