"""Small helpers shared across roles."""

from __future__ import annotations

import os

import torch

from mixpolicy.errors import UserError


def resolve_device(name: str) -> torch.device:
    """'auto' picks cuda when present, else cpu; an unavailable device is a UserError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r} (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} requested but no CUDA GPU is available")
    return device


def set_threads(n: int) -> int:
    """Use ``n`` intra-op threads (0: one per available core); returns the count set."""
    if n <= 0:
        n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(n)
    return n
