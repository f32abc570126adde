"""Small helpers shared across roles."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
from pathlib import Path

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


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a binomial proportion."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, center - half), min(1.0, center + half))


def replace_path(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Rename ``src`` to ``dst``, replacing what is there.

    A file or symlink at ``dst`` is replaced atomically; a folder (which a rename cannot
    overwrite) is first moved aside, and removed once ``src`` has taken its place.
    """
    src, dst = Path(src), Path(dst)
    if dst.is_dir() and not dst.is_symlink():
        aside = dst.with_name(f".old-{dst.name}-{os.getpid()}")
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(dst, aside)
        os.replace(src, dst)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(src, dst)


@contextlib.contextmanager
def staged_output(dst: str | os.PathLike):
    """Build an output folder beside ``dst`` and swap it in only when the block succeeds.

    Yields the temporary path (``<dst>.partial``, emptied first). On an exception the
    temporary folder is removed and ``dst`` is left as it was; on success ``dst`` is
    replaced by it. An interrupted or failing writer never damages existing data.
    """
    dst = Path(dst)
    tmp = dst.with_name(dst.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_path(tmp, dst)
