"""Demonstrations in a zarr store, in the diffusion_policy ReplayBuffer layout.

Layout::

    data/<key>            (T, ...) time-major arrays, all episodes concatenated
    meta/episode_ends     (E,) int64, exclusive end index of each episode
    meta/episode_task     (E,) int32, index into attrs["mixpolicy"]["tasks"]
    meta/episode_success  (E,) bool
    meta/episode_seed     (E,) int64, the seed that generated the episode (-1: unknown)
    meta/episode_source   (E,) int32, index into attrs["mixpolicy"]["sources"]
    attrs["mixpolicy"]    JSON: format version, fps, tasks, sources, key specs, discrete dims
    attrs["mixpolicy_stats"]  JSON: per-key statistics (min, max, mean, std, q01, q99, count)
    attrs["mixpolicy_layout"] JSON: {"every_chunk_written": true} (stores written since it exists)
    meta/episode_ends/.writer-lock   flock'ed by the one writer (holds its pid)

Appending is ordered so that a writer killed at any point, or a power loss, leaves a
readable store: episode data first, per-episode metadata next, ``meta/episode_ends``
last, each flushed to disk (fsync) before the next step. Readers trust ``episode_ends``
alone, so rows written past its last entry are ignored (and overwritten by the next
append). One writer at a time: opening for writing takes an exclusive lock
(:class:`~mixpolicy.datasets.store_io.WriterLock`) that a second writer is refused;
readers take none. Every chunk of the committed rows is written as a file, even one equal
to the fill value, so ``validate`` can tell a lost chunk file from an empty one.

Chunks run along time. Low-dim keys get about 1 MiB chunks; uint8 images get chunks of a
few frames (about 128 KiB) so that a random window decodes little more than it uses. Every
key is compressed with Blosc zstd, bit-shuffled for numeric keys, unshuffled for images.

Stores written by diffusion_policy (zarr v2, only ``data/*`` and ``meta/episode_ends``)
open unchanged; their episodes get the task ``"unknown"``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import zarr

from mixpolicy.datasets.store_io import LOCK_FILE, WriterLock, check_episode, chunk_files, create_layout, sync_group, sync_rows
from mixpolicy.datasets.store_meta import (  # noqa: F401  (FORMAT_VERSION, KeySpec, is_image_spec: re-exported)
    ATTRS_KEY,
    FORMAT_VERSION,
    LAYOUT_KEY,
    STATS_KEY,
    UNKNOWN_TASK,
    DatasetMeta,
    KeySpec,
    infer_meta,
    is_image_spec,
)
from mixpolicy.errors import UserError

WRITE_CONFIG = {"array.write_empty_chunks": True}


class ReplayBuffer:
    """A zarr demonstration store; open with :meth:`open` or :meth:`create`."""

    def __init__(self, root: zarr.Group, path: Path, writable: bool, lock: WriterLock | None = None):
        self.root = root
        self.path = path
        self.writable = writable
        self._lock = lock  # held by a writer for its lifetime: episode_ends below cannot go stale
        self._check_layout()
        attrs = dict(root.attrs)
        if ATTRS_KEY in attrs:
            self.meta = DatasetMeta.from_json(attrs[ATTRS_KEY])
        else:
            self.meta = infer_meta(root)
        self._every_chunk_written = bool(attrs.get(LAYOUT_KEY, {}).get("every_chunk_written"))
        self._episode_ends = self._committed_ends(np.asarray(root["meta/episode_ends"][:], dtype=np.int64))
        self._validate_ends()

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, path: str | Path, mode: str = "r") -> "ReplayBuffer":
        """Open for reading (``mode="r"``) or appending (``"r+"``, one writer at a time)."""
        path = Path(path)
        if not path.exists():
            raise UserError(f"dataset not found: {path}")
        if not path.is_dir():
            raise UserError(f"dataset path is not a zarr directory: {path}")
        lock = None
        if mode != "r":
            if not (path / LOCK_FILE).parent.is_dir():
                cls.open(path, "r")  # names what is wrong with the layout
                raise UserError(f"{path} is not a replay buffer: no 'meta/episode_ends'")
            lock = WriterLock(path)  # before reading anything, so nothing read is stale
        try:
            root = zarr.open_group(str(path), mode="r" if mode == "r" else "r+")
        except Exception as exc:  # zarr raises several types for non-stores
            if lock is not None:
                lock.release()
            raise UserError(f"not a readable zarr store: {path} ({type(exc).__name__}: {exc})") from None
        return cls(root, path, writable=mode != "r", lock=lock)

    @classmethod
    def create(
        cls, path: str | Path, meta: DatasetMeta, overwrite: bool = False, chunk_rows: Mapping[str, int] | None = None
    ) -> "ReplayBuffer":
        """A new empty store, open for writing; ``chunk_rows`` overrides the time chunk of chosen keys."""
        path = Path(path)
        chunk_rows = dict(chunk_rows or {})
        unknown = sorted(set(chunk_rows) - set(meta.specs))
        if unknown:
            raise UserError(f"chunk_rows names key(s) {unknown} that have no spec")
        if any(int(n) < 1 for n in chunk_rows.values()):
            raise UserError("chunk_rows values must be >= 1")
        if path.exists() and not overwrite:
            raise UserError(f"dataset already exists: {path} (pass overwrite=true to replace it)")
        if not meta.specs:
            raise UserError("dataset meta needs at least one key spec")
        if meta.action_key not in meta.specs:
            raise UserError(f"action key {meta.action_key!r} has no spec")
        root, lock = create_layout(path, meta, chunk_rows)
        return cls(root, path, writable=True, lock=lock)

    def close(self) -> None:
        """End writing: releases the write lock (reading stays possible)."""
        self.writable = False
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> "ReplayBuffer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_layout(self) -> None:
        for group in ("data", "meta"):
            if group not in self.root:
                raise UserError(f"{self.path} is not a replay buffer: no '{group}' group")
        if "episode_ends" not in self.root["meta"]:
            raise UserError(f"{self.path} is not a replay buffer: no 'meta/episode_ends'")

    @staticmethod
    def _committed_ends(ends: np.ndarray) -> np.ndarray:
        # A writer killed between growing episode_ends and filling its new entry leaves
        # one trailing fill value (0); that episode was never committed.
        if len(ends) >= 1 and ends[-1] == 0:
            ends = ends[:-1]
        return ends

    def _validate_ends(self) -> None:
        ends = self._episode_ends
        if ends.ndim != 1:
            raise UserError(f"{self.path}: meta/episode_ends must be 1-D")
        if len(ends) and (np.any(np.diff(ends) <= 0) or ends[0] <= 0):
            raise UserError(f"{self.path}: meta/episode_ends is not strictly increasing")
        n = self.n_steps
        for key in self.root["data"].array_keys():
            if self.root["data"][key].shape[0] < n:
                raise UserError(
                    f"{self.path}: data/{key} has {self.root['data'][key].shape[0]} rows "
                    f"but episode_ends says {n}"
                )

    # ------------------------------------------------------------------ reading
    @property
    def episode_ends(self) -> np.ndarray:
        return self._episode_ends

    @property
    def episode_starts(self) -> np.ndarray:
        return np.concatenate([[0], self._episode_ends[:-1]]).astype(np.int64)

    @property
    def episode_lengths(self) -> np.ndarray:
        return np.diff(np.concatenate([[0], self._episode_ends])).astype(np.int64)

    @property
    def n_episodes(self) -> int:
        return int(len(self._episode_ends))

    @property
    def n_steps(self) -> int:
        return int(self._episode_ends[-1]) if len(self._episode_ends) else 0

    @property
    def keys(self) -> list[str]:
        return sorted(self.root["data"].array_keys())

    @property
    def episode_task_index(self) -> np.ndarray:
        if "episode_task" in self.root["meta"]:
            return np.asarray(self.root["meta/episode_task"][: self.n_episodes], np.int64)
        return np.zeros(self.n_episodes, np.int64)

    @property
    def episode_tasks(self) -> list[str]:
        tasks = self.meta.tasks or [UNKNOWN_TASK]
        return [tasks[i] for i in self.episode_task_index]

    @property
    def episode_success(self) -> np.ndarray:
        if "episode_success" in self.root["meta"]:
            return np.asarray(self.root["meta/episode_success"][: self.n_episodes], bool)
        return np.ones(self.n_episodes, bool)

    @property
    def episode_seeds(self) -> np.ndarray:
        if "episode_seed" in self.root["meta"]:
            return np.asarray(self.root["meta/episode_seed"][: self.n_episodes], np.int64)
        return np.full(self.n_episodes, -1, np.int64)

    @property
    def episode_sources(self) -> list[str]:
        """Where each episode came from (collector, converted file, ...)."""
        if "episode_source" in self.root["meta"] and self.meta.sources:
            index = np.asarray(self.root["meta/episode_source"][: self.n_episodes], np.int64)
            return [self.meta.sources[i] for i in index]
        return [self.meta.source] * self.n_episodes

    def episode_table(self) -> list[dict]:
        """One dict per episode: index, task, success, length, seed, source."""
        tasks, success, seeds, sources = self.episode_tasks, self.episode_success, self.episode_seeds, self.episode_sources
        return [
            {"episode": i, "task": tasks[i], "success": bool(success[i]), "length": int(n), "seed": int(seeds[i]), "source": sources[i]}
            for i, n in enumerate(self.episode_lengths)
        ]

    # ------------------------------------------------------------------ statistics
    @property
    def stats(self) -> dict[str, dict[str, np.ndarray]] | None:
        """Per-key statistics saved by :meth:`save_stats` (None when never computed)."""
        from mixpolicy.datasets.normalizer import stats_from_json

        saved = dict(self.root.attrs).get(STATS_KEY)
        return stats_from_json(saved) if saved else None

    def compute_stats(
        self,
        keys: Iterable[str] | None = None,
        episode_mask: np.ndarray | None = None,
        max_image_frames: int = 2000,
        seed: int = 0,
        progress: bool = False,
    ) -> dict[str, dict[str, np.ndarray]]:
        """Streaming per-feature statistics over the selected episodes.

        Low-dim keys are read chunk by chunk (exact min/max/mean/std); image keys are
        sampled (``max_image_frames`` frames, per channel), so memory stays bounded.
        """
        from mixpolicy.datasets.store_stats import compute_store_stats

        return compute_store_stats(self, keys, episode_mask, max_image_frames, seed, progress)

    def save_stats(self, stats: Mapping[str, Mapping[str, np.ndarray]]) -> None:
        """Store statistics in the store's attributes (merged with those already there)."""
        from mixpolicy.datasets.normalizer import stats_to_json

        if not self.writable:
            raise UserError(f"{self.path} is opened read-only")
        saved = dict(dict(self.root.attrs).get(STATS_KEY) or {})
        saved.update(stats_to_json(stats))
        self.root.attrs[STATS_KEY] = saved
        sync_group(self.path)

    def row_mask(self, episode_mask: np.ndarray | None = None) -> np.ndarray:
        """(n_steps,) bool: the rows of the episodes selected by ``episode_mask``."""
        if episode_mask is None:
            return np.ones(self.n_steps, bool)
        episode_mask = np.asarray(episode_mask, bool)
        if episode_mask.shape != (self.n_episodes,):
            raise UserError(f"episode mask has {episode_mask.size} entries for {self.n_episodes} episodes")
        return np.repeat(episode_mask, self.episode_lengths)

    def array(self, key: str) -> zarr.Array:
        if key not in self.root["data"]:
            raise UserError(f"{self.path}: no key {key!r} (has {', '.join(self.keys)})")
        return self.root["data"][key]

    def _read(self, key: str, start: int, end: int) -> np.ndarray:
        arr = self.array(key)
        if self._every_chunk_written:
            lost = next((p for _, p in chunk_files(arr, start, end) if not p.is_file()), None)
            if lost is not None:  # zarr would return zeros for it
                raise UserError(
                    f"{self.path}: data/{key} rows {start}-{end - 1}: chunk file {lost} is missing; "
                    f"`mixpolicy data validate path={self.path}` lists every damaged chunk"
                )
        try:
            return np.asarray(arr[start:end])
        except Exception as exc:  # zarr/numcodecs raise many types for damaged chunks
            raise UserError(
                f"{self.path}: data/{key} rows {start}-{end - 1} cannot be read ({type(exc).__name__}: {exc}); "
                f"`mixpolicy data validate path={self.path}` lists every damaged chunk"
            ) from None

    def load(self, keys: Iterable[str]) -> dict[str, np.ndarray]:
        """Read whole keys into memory (only the rows covered by episode_ends)."""
        n = self.n_steps
        return {k: self._read(k, 0, n) for k in keys}

    def get_episode(self, index: int, keys: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        if not 0 <= index < self.n_episodes:
            raise IndexError(f"episode {index} out of range [0, {self.n_episodes})")
        start, end = int(self.episode_starts[index]), int(self._episode_ends[index])
        return {k: self._read(k, start, end) for k in (keys or self.keys)}

    # ------------------------------------------------------------------ writing
    def add_episode(
        self,
        data: Mapping[str, np.ndarray],
        task: str = UNKNOWN_TASK,
        success: bool = True,
        seed: int = -1,
        source: str | None = None,
    ) -> int:
        """Append one episode; returns its index. Crash-safe ordering, see module doc.

        ``source`` names where the episode came from (default: the dataset's ``meta.source``).
        A failed write (disk full, ...) is a UserError and leaves the store as it was before
        the call, so the same call can simply be retried.
        """
        if not self.writable:
            raise UserError(f"{self.path} is opened read-only")
        length = check_episode(self.meta.specs, data)
        try:
            return self._append(data, length, task, success, seed, self.meta.source if source is None else str(source))
        except OSError as exc:
            raise UserError(
                f"{self.path}: writing episode {self.n_episodes} failed ({exc.strerror or exc}); "
                f"the {self.n_episodes} episodes committed before it are intact, retry once the cause is fixed"
            ) from None

    def _writable(self, name: str) -> zarr.Array:
        # every chunk gets a file, even one equal to the fill value (see the module doc); an array
        # takes the config in force when it is opened (Array.with_config needs zarr 3.1.6, numpy 2)
        with zarr.config.set(WRITE_CONFIG):
            return self.root[name]

    def _append(self, data: Mapping[str, np.ndarray], length: int, task: str, success: bool, seed: int, source: str) -> int:
        start = self.n_steps
        end = start + length
        for key, value in data.items():
            arr = self._writable(f"data/{key}")
            if arr.shape[0] < end:
                arr.resize((end, *arr.shape[1:]))
            arr[start:end] = np.asarray(value, dtype=arr.dtype)
            sync_rows(arr, start, end)

        meta = self.meta
        if task not in meta.tasks or source not in meta.sources:
            # a copy: the in-memory lists change only once the save has succeeded, so a
            # failed save followed by a retry saves the new names again
            meta = dataclasses.replace(
                meta,
                tasks=meta.tasks + [task] * (task not in meta.tasks),
                sources=meta.sources + [source] * (source not in meta.sources),
            )
            self.root.attrs[ATTRS_KEY] = meta.to_json()
            sync_group(self.path)
            self.meta = meta
        e = self.n_episodes
        per_episode = {
            "episode_task": meta.tasks.index(task),
            "episode_success": bool(success),
            "episode_seed": int(seed),
            "episode_source": meta.sources.index(source),
        }
        for name, value in per_episode.items():
            if name not in self.root["meta"]:
                continue
            arr = self._writable(f"meta/{name}")
            if arr.shape[0] < e + 1:
                arr.resize((e + 1,))
            arr[e] = value
            sync_rows(arr, e, e + 1)
        ends = self._writable("meta/episode_ends")
        ends.resize((e + 1,))  # the commit point: readers see the episode after this write
        ends[e] = end
        sync_rows(ends, e, e + 1)
        self._episode_ends = np.append(self._episode_ends, np.int64(end))
        return e

    def summary(self) -> dict:
        lengths = self.episode_lengths
        tasks = self.episode_tasks
        per_task = {t: tasks.count(t) for t in dict.fromkeys(tasks)}
        return {
            "path": str(self.path),
            "episodes": self.n_episodes,
            "steps": self.n_steps,
            "mean_length": float(lengths.mean()) if len(lengths) else math.nan,
            "episodes_per_task": per_task,
            "keys": {k: {"shape": list(self.array(k).shape[1:]), "dtype": str(self.array(k).dtype)} for k in self.keys},
            "fps": self.meta.fps,
        }

    def __repr__(self) -> str:
        return json.dumps(self.summary())

