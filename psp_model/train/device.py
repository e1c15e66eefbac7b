"""Device, precision and seeding: the one place that decides where and how tensors are computed."""

from __future__ import annotations

import contextlib
import os
import random
from typing import Literal

import numpy as np
import torch

Precision = Literal["auto", "fp32", "bf16", "fp16"]


def pick_device(requested: str = "auto") -> torch.device:
    """``auto`` -> CUDA if available, else CPU; otherwise the named device (``cpu``, ``cuda:1``...)."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {requested!r} was requested but CUDA is not available; use 'auto' or 'cpu'")
    return device


def resolve_precision(device: torch.device, precision: Precision = "auto") -> torch.dtype:
    """Compute dtype for autocast. ``auto``: bf16 on CUDA when supported (else fp16), fp32 on CPU."""
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed-precision context for ``dtype``; a no-op for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int, *, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch; ``deterministic`` also asks torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
