"""Training checkpoints: written atomically so a crash mid-write never leaves a half file behind."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from psp_model.io import atomic_write

__all__ = ["save_checkpoint", "load_checkpoint"]


def save_checkpoint(state: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``state`` with ``torch.save`` atomically (``psp_model.io.atomic_write``).

    ``path`` always holds either the previous complete checkpoint or the new one. Keep ``state`` to
    tensors, numbers, strings, lists and dicts so that ``load_checkpoint`` can read it with
    ``weights_only=True``.
    """
    return atomic_write(Path(path), lambda tmp: torch.save(dict(state), tmp))


def load_checkpoint(path: str | os.PathLike[str], *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by ``save_checkpoint`` (tensors and plain Python values only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; train without resume to create it")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise ValueError(f"checkpoint {path} cannot be read ({exc}); delete it and train without resume") from exc
    if not isinstance(state, dict):
        raise ValueError(
            f"checkpoint {path} holds a {type(state).__name__}, expected a dict written by save_checkpoint"
        )
    return state
