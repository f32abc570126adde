"""Writing a store safely: one writer at a time, and data on disk before it is committed.

:class:`WriterLock` is an exclusive ``flock`` on a file inside the store, held for the
writer's lifetime (the kernel drops it when the process dies, SIGKILL included), so a
second writer, in this process or another, is refused; readers never take it.

:func:`sync_rows` flushes the chunk files holding some rows of an array, its metadata
file and the folders above them, so that ``meta/episode_ends`` is committed only after
everything it covers would survive a power loss.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import os
import shutil
import weakref
from pathlib import Path
from typing import Mapping

import numpy as np

from mixpolicy.datasets.store_meta import ATTRS_KEY, LAYOUT_KEY, DatasetMeta, KeySpec, compressor_for, time_chunk
from mixpolicy.errors import UserError

# Inside the commit array's folder, where zarr never lists members (a file at the store
# root would be reported by zarr as an unknown member of the root group).
LOCK_FILE = "meta/episode_ends/.writer-lock"
METADATA_FILES = ("zarr.json", ".zarray", ".zattrs", ".zgroup")


class WriterLock:
    """Exclusive write access to the store at ``path``; :meth:`release` (or garbage collection) ends it."""

    def __init__(self, path: Path):
        self.file = Path(path) / LOCK_FILE
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise UserError(f"{path}: cannot create the write lock {self.file} ({exc.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise UserError(f"{path}: cannot lock the store for writing ({exc.strerror})") from None
            raise UserError(
                f"{path} is already open for writing (process {holder or 'unknown'}); "
                "one writer at a time: close it or wait (reading is not affected)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._close = weakref.finalize(self, os.close, fd)

    @property
    def held(self) -> bool:
        return self._close.alive

    def release(self) -> None:
        self._close()


def fsync_path(path: Path) -> None:
    """Flush a file or a folder (its entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def local_array_dir(arr) -> Path | None:
    """The folder holding ``arr``'s files when it lives in a local store, else None."""
    from zarr.storage import LocalStore

    if not isinstance(arr.store, LocalStore):
        return None
    return Path(arr.store.root) / arr.path


def chunk_files(arr, lo: int, hi: int) -> list[tuple[int, Path]]:
    """(index along time, path) of each chunk file holding rows ``lo:hi`` of a local array ([] for other stores)."""
    folder = local_array_dir(arr)
    if folder is None or hi <= lo:
        return []
    rows = int(arr.chunks[0])
    per_dim = [range(-(-int(s) // int(c))) for s, c in zip(arr.shape[1:], arr.chunks[1:])]
    out = []
    for first in range(lo // rows, (hi - 1) // rows + 1):
        for rest in itertools.product(*per_dim):
            out.append((first, folder / arr.metadata.encode_chunk_key((first, *rest))))
    return out


def sync_rows(arr, lo: int, hi: int) -> None:
    """fsync the chunk files of rows ``lo:hi``, the array's metadata and every folder up to the store root."""
    folder = local_array_dir(arr)
    if folder is None:
        return
    root = Path(arr.store.root)
    files = [p for _, p in chunk_files(arr, lo, hi) if p.exists()]
    files += [folder / name for name in METADATA_FILES if (folder / name).exists()]
    folders: set[Path] = set()
    for f in files:
        fsync_path(f)
        d = f.parent
        while d != root and root in d.parents:
            folders.add(d)
            d = d.parent
    folders.add(root)
    for d in sorted(folders, key=lambda p: -len(p.parts)):
        fsync_path(d)


def sync_group(root_path: Path) -> None:
    """fsync a group's metadata files (its attributes) and its folder."""
    for name in METADATA_FILES:
        if (root_path / name).exists():
            fsync_path(root_path / name)
    fsync_path(root_path)


def create_layout(path: Path, meta: DatasetMeta, chunk_rows: Mapping[str, int]):
    """Empty arrays and metadata of a new store at ``path``, flushed; returns (root group, write lock)."""
    import zarr

    if path.exists() and not path.is_dir():
        path.unlink()
    path.mkdir(parents=True, exist_ok=True)
    for link in (path / "meta", path / LOCK_FILE.rsplit("/", 1)[0]):
        if link.is_symlink():  # the lock and the clearing below stay inside the store
            link.unlink()
    lock = WriterLock(path)  # refuses to overwrite a store that another writer has open
    _clear_except(path, path / LOCK_FILE)
    root = zarr.open_group(str(path), mode="a")
    data = root.create_group("data")
    for key, spec in meta.specs.items():
        dtype = np.dtype(spec.dtype)
        data.create_array(
            key,
            shape=(0, *spec.shape),
            chunks=(int(chunk_rows.get(key) or time_chunk(spec.shape, dtype)), *spec.shape),
            dtype=dtype,
            compressors=compressor_for(spec.shape, dtype),
            fill_value=0,
        )
    m = root.create_group("meta")
    m.create_array("episode_task", shape=(0,), chunks=(4096,), dtype=np.int32, fill_value=0)
    m.create_array("episode_success", shape=(0,), chunks=(4096,), dtype=bool, fill_value=False)
    m.create_array("episode_seed", shape=(0,), chunks=(4096,), dtype=np.int64, fill_value=-1)
    m.create_array("episode_source", shape=(0,), chunks=(4096,), dtype=np.int32, fill_value=0)
    m.create_array("episode_ends", shape=(0,), chunks=(4096,), dtype=np.int64, fill_value=0)
    root.attrs.update({ATTRS_KEY: meta.to_json(), LAYOUT_KEY: {"every_chunk_written": True}})
    for name in ("data", "meta"):
        for arr in root[name].array_values():
            sync_rows(arr, 0, 0)
        sync_group(path / name)
    sync_group(path)
    return root, lock


def check_episode(specs: Mapping[str, KeySpec], data: Mapping[str, np.ndarray]) -> int:
    """The episode's length; a UserError naming the first key that does not fit ``specs``."""
    missing = set(specs) - set(data)
    extra = set(data) - set(specs)
    if missing or extra:
        raise UserError(
            f"episode keys do not match the dataset: missing {sorted(missing)}, unexpected {sorted(extra)}"
        )
    lengths = {k: len(v) for k, v in data.items()}
    length = next(iter(lengths.values()))
    if length == 0 or any(n != length for n in lengths.values()):
        raise UserError(f"episode keys must have one non-zero length, got {lengths}")
    for key, value in data.items():
        spec = specs[key]
        value = np.asarray(value)
        if tuple(value.shape[1:]) != spec.shape:
            raise UserError(f"key {key!r}: step shape {value.shape[1:]} != dataset's {spec.shape}")
        if np.issubdtype(value.dtype, np.floating) and not np.all(np.isfinite(value)):
            raise UserError(f"key {key!r}: episode contains NaN or inf")
        if not np.can_cast(value.dtype, np.dtype(spec.dtype), casting="same_kind"):
            raise UserError(f"key {key!r}: dtype {value.dtype} cannot be stored as the dataset's {spec.dtype}")

    return length


def _clear_except(folder: Path, keep: Path) -> None:
    """Remove everything under ``folder`` but ``keep`` (and the folders above it)."""
    for child in folder.iterdir():
        if child == keep:
            continue
        if child in keep.parents:
            _clear_except(child, keep)
        elif child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
