"""Encode each case once per frozen-encoder version, so fine-tuning epochs and fold ensembles touch only heads.

A cache entry is ``<cache_dir>/<encoder fingerprint>/<input hash>.pt`` holding the tokens ``(N, d)``
(float32, CPU). The fingerprint covers every encoder weight, so tokens of other weights are never reused.
"""

from __future__ import annotations

import hashlib
import pickle
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from psp_model.io import atomic_write
from psp_model.nets.encoder import encoder_fingerprint
from psp_model.train.device import autocast, pick_device, resolve_precision

__all__ = ["tensor_hash", "encode_cached", "ensemble_predict"]


def tensor_hash(tensor: torch.Tensor) -> str:
    """sha256 over dtype, shape and bytes: the cache key of one input volume ``(C, D, H, W)``."""
    t = tensor.detach().to("cpu").contiguous()
    digest = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _encode(encoder: nn.Module, batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    dtype = resolve_precision(device)
    with torch.inference_mode(), autocast(device, dtype):
        return encoder(batch.to(device, torch.float32)).float().cpu()


def _load(path: Path, shape: tuple[int, int]) -> torch.Tensor | None:
    """The cached tokens, or ``None`` (with a warning) when the file is unreadable or of another shape."""
    try:
        tokens = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as error:
        warnings.warn(f"token cache entry {path} is unreadable ({error}); re-encoding", stacklevel=3)
        return None
    if not isinstance(tokens, torch.Tensor) or tuple(tokens.shape) != shape:
        found = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        warnings.warn(f"token cache entry {path} holds {found}, expected {shape}; re-encoding", stacklevel=3)
        return None
    return tokens


def encode_cached(
    encoder: nn.Module,
    volumes: torch.Tensor | Sequence[torch.Tensor],
    keys: Sequence[str] | None = None,
    *,
    cache_dir: Path,
    device: str = "auto",
    batch_size: int = 2,
) -> torch.Tensor:
    """Tokens ``(B, N, d)`` (float32, CPU) of volumes ``(B, C, D, H, W)``, encoding only cache misses.

    Args:
        encoder: the frozen ``MRIEncoder`` (attributes ``n_tokens``, ``hidden_size``).
        volumes: a stacked tensor or a sequence of ``(C, D, H, W)`` tensors.
        keys: one input hash per volume (e.g. the preprocessing cache's hash); default ``tensor_hash``.
        cache_dir: root of the cache; one sub-folder per encoder fingerprint.
        device: ``auto``, ``cpu``, ``cuda``...; where misses are encoded.
        batch_size: volumes per encoder call.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    if keys is not None and len(keys) != len(volumes):
        raise ValueError(f"got {len(keys)} keys for {len(volumes)} volumes; pass one key per volume")
    keys = [tensor_hash(v) for v in volumes] if keys is None else list(keys)
    folder = Path(cache_dir) / encoder_fingerprint(encoder)
    shape = (encoder.n_tokens, encoder.hidden_size)
    tokens: list[torch.Tensor | None] = [
        _load(folder / f"{key}.pt", shape) if (folder / f"{key}.pt").exists() else None for key in keys
    ]
    missing = [i for i, t in enumerate(tokens) if t is None]
    if missing:
        target = pick_device(device)
        was_training = encoder.training
        encoder.eval()
        encoder.to(target)
        try:
            for start in range(0, len(missing), batch_size):
                chunk = missing[start : start + batch_size]
                encoded = _encode(encoder, torch.stack([torch.as_tensor(volumes[i]) for i in chunk]), target)
                for i, t in zip(chunk, encoded):
                    tokens[i] = t.clone()
                    atomic_write(folder / f"{keys[i]}.pt", lambda tmp, t=tokens[i]: torch.save(t, tmp))
        finally:
            encoder.train(was_training)
    return torch.stack(tokens)  # type: ignore[arg-type]


def ensemble_predict(
    encoder: nn.Module,
    heads: Sequence[nn.Module],
    volume: torch.Tensor,
    clinical: torch.Tensor | np.ndarray,
    *,
    device: str = "auto",
) -> tuple[float, np.ndarray]:
    """Soft-voting TP probability of K fold heads on one case, encoding the volume ONCE.

    Args:
        encoder: the frozen encoder shared by every fold.
        heads: the K fold heads, each mapping ``(tokens (B, N, d), clinical (B, F))`` to ``(B,)`` logits.
        volume: ``(C, D, H, W)`` or ``(1, C, D, H, W)``.
        clinical: ``(F,)`` or ``(1, F)`` encoded clinical + dose features.

    Returns:
        The mean probability and the per-fold probabilities ``(K,)``.
    """
    if not heads:
        raise ValueError("ensemble_predict needs at least one head; got an empty list")
    target = pick_device(device)
    volume = torch.as_tensor(volume, dtype=torch.float32)
    volume = volume.unsqueeze(0) if volume.ndim == 4 else volume
    clinical = torch.as_tensor(np.asarray(clinical, dtype=np.float32)).reshape(1, -1).to(target)
    if volume.ndim != 5 or volume.shape[0] != 1:
        raise ValueError(f"volume must be (C, D, H, W) or (1, C, D, H, W); got {tuple(volume.shape)}")
    was_training = encoder.training
    encoder.eval()
    try:
        tokens = _encode(encoder.to(target), volume, target).to(target)
    finally:
        encoder.train(was_training)
    probs = []
    for head in heads:
        head_training = head.training
        head.eval()
        with torch.inference_mode():
            probs.append(torch.sigmoid(head.to(target)(tokens, clinical).float()).item())
        head.train(head_training)
    per_fold = np.asarray(probs, dtype=np.float64)
    return float(per_fold.mean()), per_fold
