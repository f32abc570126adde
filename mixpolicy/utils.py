"""Small helpers shared across roles."""

from __future__ import annotations

import contextlib
import errno
import math
import os
import re
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


def cpu_model() -> str:
    """The processor's model name (for timings, which differ between machines), or the platform's word for it."""
    import platform

    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a binomial proportion."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, center - half), min(1.0, center + half))


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file, or a folder's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str | os.PathLike) -> None:
    """Flush every file and folder under ``path`` (links are not followed), then ``path``."""
    path = Path(path)
    for p in sorted(path.rglob("*"), key=lambda p: -len(p.parts)):
        if not p.is_symlink():
            fsync_path(p)
    fsync_path(path)


_RENAME_EXCHANGE = 2  # linux/fs.h


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux renameat2); False where it is not supported."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_cwd = -100
    if renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a))


ASIDE_PREFIX = ".replaced-"


def replace_path(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Rename ``src`` to ``dst``, replacing what is there, so that ``dst`` is never missing.

    A file or link at ``dst`` is replaced by one rename. A folder (which a rename cannot
    overwrite) is swapped with ``src`` in one atomic exchange, after which the old content,
    now under ``src``'s name, is removed. Where the exchange is not supported, the folder is
    first renamed aside to ``.replaced-<name>``; a crash between the two renames leaves it
    there as the only copy, and :func:`recover_replaced` (called here and by
    :func:`clean_temporaries`) puts it back. The parent folder is fsynced at the end.
    """
    src, dst = Path(src), Path(dst)
    recover_replaced(dst)
    if dst.is_dir() and not dst.is_symlink():
        if _exchange(src, dst):
            if src.is_dir() and not src.is_symlink():  # src now holds the old folder
                shutil.rmtree(src)
            else:
                src.unlink()
        else:
            aside = dst.with_name(ASIDE_PREFIX + dst.name)
            os.replace(dst, aside)
            os.replace(src, dst)
            shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(src, dst)
    fsync_path(dst.parent)


def recover_replaced(dst: str | os.PathLike) -> None:
    """Undo a :func:`replace_path` interrupted between its two renames (see there)."""
    dst = Path(dst)
    aside = dst.with_name(ASIDE_PREFIX + dst.name)
    if aside.exists() or aside.is_symlink():
        if dst.exists() or dst.is_symlink():
            shutil.rmtree(aside, ignore_errors=True)  # the replacement is in place: the aside copy is old
        else:
            os.replace(aside, dst)  # the only copy: put it back


def clean_temporaries(folder: str | os.PathLike, prefixes: tuple[str, ...]) -> None:
    """Remove leftovers of interrupted writes (names starting with ``prefixes``) in ``folder``.

    Never the only copy of anything: a folder moved aside by an interrupted
    :func:`replace_path` is restored to its name first.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return
    for p in list(folder.iterdir()):
        if p.name.startswith(ASIDE_PREFIX):
            recover_replaced(folder / p.name[len(ASIDE_PREFIX) :])
        elif (legacy := re.fullmatch(r"\.old-(.+)-\d+", p.name)) and not (folder / legacy.group(1)).exists():
            os.replace(p, folder / legacy.group(1))  # moved aside by an older replace_path: the only copy
    for p in folder.iterdir():
        if p.name.startswith(prefixes) and not p.name.startswith(ASIDE_PREFIX):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def resolve_inside(root: str | os.PathLike, name: str) -> Path | None:
    """The folder ``root/name`` is or links to; None when there is none.

    A link that leads out of ``root`` (absolute, ``..``, or through another link) is a
    UserError: a run folder's ``last``/``best`` only ever point at its own step folders.
    """
    root = Path(root)
    link = root / name
    if not (link.exists() or link.is_symlink()):
        return None
    if not link.is_symlink():
        return link if link.is_dir() else None
    target = link.resolve()
    if target.parent != root.resolve():
        raise UserError(f"{link} links to {os.readlink(link)}, outside {root}; refusing to follow it")
    return root / target.name if target.is_dir() else None


@contextlib.contextmanager
def staged_output(dst: str | os.PathLike):
    """Build an output folder beside ``dst`` and swap it in only when the block succeeds.

    Yields the temporary path (``<dst>.partial``, emptied first). On an exception the
    temporary folder is removed and ``dst`` is left as it was; on success ``dst`` is
    replaced by it (flushed to disk first). An interrupted or failing writer never damages
    existing data.
    """
    dst = Path(dst)
    tmp = dst.with_name(dst.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if tmp.exists():
        fsync_tree(tmp)  # on disk before it replaces what was there
    replace_path(tmp, dst)
