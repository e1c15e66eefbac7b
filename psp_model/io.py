"""Crash-safe file writes (a reader sees the old file or the new one, never half of one) and verified reads."""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np


def _process_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


NEW_FILE_MODE = 0o666 & ~_process_umask()
"""What ``open()`` would give a new file: reports and models stay readable as the site's umask allows."""


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, fsync it, then rename it over ``path``.

    If ``write`` fails (a full disk included) the temporary file is removed and ``path`` is untouched.
    The file gets the umask's usual mode (``mkstemp`` alone would make it 0600); writers of secrets
    chmod the temporary file themselves before writing the secret.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    tmp = Path(tmp_name)
    try:
        tmp.chmod(NEW_FILE_MODE)
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


class CorruptCheckpointError(RuntimeError):
    """A checkpoint or model file whose content does not match its recorded SHA-256."""


def load_verified_npz(path: Path, *, fix: str | None = None) -> dict[str, np.ndarray]:
    """Load an ``.npz`` after checking it against the SHA-256 in ``<path>.sha256`` written beside it.

    ``fix`` replaces the advice ending the error message (default: delete the checkpoint, which
    resumes from the round before).
    """
    path = Path(path)
    data = path.read_bytes()
    digest_path = path.with_suffix(".sha256")
    if not digest_path.is_file():
        raise CorruptCheckpointError(f"{path} has no {digest_path.name}: it was not written completely; "
                                     f"{fix or 'delete it'}")
    expected = digest_path.read_text().strip()
    if hashlib.sha256(data).hexdigest() != expected:
        raise CorruptCheckpointError(f"{path} does not match its SHA-256 ({expected[:12]}...): the file is corrupted "
                                     f"or was modified. {fix or 'Delete it to resume from the round before.'}")
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}
