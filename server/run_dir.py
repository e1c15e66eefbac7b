"""The run directory: the one place that knows how checkpoints and outputs of a study are named.

```
<run_dir>/config.json                      the study config used
<run_dir>/stats.json                       combined statistics (Nyul landmarks, feature manifest, counts)
<run_dir>/checkpoints/<phase>/round_NNN.npz  global arrays after each round (+ .sha256)
<run_dir>/checkpoints/finetune/fold_K/round_NNN.npz
<run_dir>/rounds.csv, rounds.json          per-round metrics (loss, replies, bytes)
<run_dir>/models/                          released models: encoder.npz, fold_K.npz, ensemble.json
                                           (+ .sha256, and .sig when the study has a signing key)
```
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from psp_model.io import (
    CorruptCheckpointError,
    atomic_write,
    atomic_write_text,
    load_verified_npz,
)
from psp_model.signing import sign_file

__all__ = ["CorruptCheckpointError", "RunDir", "load_verified_npz"]

_ROUND_FILE = re.compile(r"round_(\d{3})\.npz$")


@dataclass(frozen=True)
class RunDir:
    """Paths and atomic reads/writes of one study's outputs.

    With a ``signing_key`` every released model file (``models/``) is signed beside its SHA-256.
    """

    root: Path
    signing_key: Ed25519PrivateKey | None = None

    def phase_dir(self, phase: str, fold: int | None = None) -> Path:
        folder = self.root / "checkpoints" / phase
        return folder / f"fold_{fold}" if fold is not None else folder

    def save_round(self, phase: str, round_: int, arrays: dict[str, np.ndarray], *, fold: int | None = None) -> Path:
        """Checkpoint the global arrays after ``round_`` (1-based), with a SHA-256 beside them."""
        path = self.phase_dir(phase, fold) / f"round_{round_:03d}.npz"
        data = _npz_bytes(arrays)
        atomic_write(path, lambda tmp: tmp.write_bytes(data))
        atomic_write_text(path.with_suffix(".sha256"), hashlib.sha256(data).hexdigest() + "\n")
        return path

    def last_round(self, phase: str, *, fold: int | None = None) -> tuple[int, dict[str, np.ndarray]] | None:
        """The latest checkpointed round of a phase and its arrays, or None; refuses a corrupted file."""
        folder = self.phase_dir(phase, fold)
        rounds = sorted(int(m.group(1)) for p in folder.glob("round_*.npz") if (m := _ROUND_FILE.search(p.name)))
        if not rounds:
            return None
        path = folder / f"round_{rounds[-1]:03d}.npz"
        return rounds[-1], load_verified_npz(path)

    def write_json(self, name: str, payload: Any) -> Path:
        return atomic_write_text(self.root / name, json.dumps(payload, indent=2, default=_json_default))

    def read_json(self, name: str) -> Any:
        return json.loads((self.root / name).read_text())

    def save_model(self, name: str, arrays: dict[str, np.ndarray]) -> Path:
        path = self.root / "models" / f"{name}.npz"
        data = _npz_bytes(arrays)
        atomic_write(path, lambda tmp: tmp.write_bytes(data))
        atomic_write_text(path.with_suffix(".sha256"), hashlib.sha256(data).hexdigest() + "\n")
        self._sign(path)
        return path

    def release_json(self, name: str, payload: Any) -> Path:
        """Write a released JSON file under ``models/`` (e.g. the ensemble manifest), signed like the models."""
        path = self.write_json(f"models/{name}", payload)
        self._sign(path)
        return path

    def _sign(self, path: Path) -> None:
        if self.signing_key is not None:
            sign_file(path, self.signing_key)


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **{k: np.asarray(v) for k, v in arrays.items()})
    return buffer.getvalue()


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
