"""Windows over concatenated episodes: per-key time offsets, edge padding, O(1) access.

A window is anchored at step ``t`` of an episode. Each key declares the offsets it needs
relative to ``t`` (for example observations ``-1, 0`` and actions ``0 .. 15``); rows that
fall outside the episode are clamped to its first or last step, which pads with edge
values. All index arithmetic is vectorized, so a batch of windows is one gather per key.

Two window datasets share one base class, :class:`WindowDataset` (``batch(ids)``,
``__getitems__`` for a ``DataLoader`` with workers, ``__getitem__``); being one is the
capability "gathers a whole batch with one vectorized read per key":

- :class:`InMemoryWindows` gathers from arrays in memory (the cache for data that fits);
- :class:`ZarrWindows` reads only the rows a batch needs from the store (one batched read
  per key), so stores far larger than memory train without loading.

Images stay uint8 all the way to the training device; see ``datasets.augment``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from mixpolicy.errors import UserError


class SequenceSampler:
    def __init__(
        self,
        episode_ends: np.ndarray,
        key_offsets: Mapping[str, Sequence[int]],
        episode_mask: np.ndarray | None = None,
    ):
        ends = np.asarray(episode_ends, dtype=np.int64)
        starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
        if episode_mask is None:
            episode_mask = np.ones(len(ends), bool)
        episode_mask = np.asarray(episode_mask, bool)
        if episode_mask.shape != ends.shape:
            raise UserError(f"episode mask has {episode_mask.shape[0]} entries for {len(ends)} episodes")
        if not key_offsets:
            raise UserError("sampler needs at least one key with offsets")
        self._starts, self._last = starts, ends - 1
        kept = np.flatnonzero(episode_mask)
        lengths = (ends - starts)[kept]
        # Per window only the anchor row (int64) and the episode id (int32) are kept:
        # 12 bytes a window, so the index of a 10M-step store takes ~120 MB.
        id_dtype = np.int32 if len(ends) < 2**31 else np.int64
        self.episode_index = np.repeat(kept.astype(id_dtype), lengths)
        # anchor of window i = start of its episode + its position inside the episode
        window_starts = np.cumsum(lengths) - lengths
        self.anchor = np.repeat(starts[kept] - window_starts, lengths) + np.arange(int(lengths.sum()), dtype=np.int64)
        self.key_offsets = {k: np.asarray(list(v), dtype=np.int64) for k, v in key_offsets.items()}
        for k, v in self.key_offsets.items():
            if v.ndim != 1 or len(v) == 0:
                raise UserError(f"offsets for key {k!r} must be a non-empty list of ints")

    def __len__(self) -> int:
        return int(len(self.anchor))

    @property
    def first_rows(self) -> np.ndarray:
        """First row of every episode of the store."""
        return self._starts

    @property
    def last_rows(self) -> np.ndarray:
        """Last row of every episode of the store."""
        return self._last

    @property
    def first(self) -> np.ndarray:
        """First row of each window's episode."""
        return self._starts[self.episode_index]

    @property
    def last(self) -> np.ndarray:
        """Last row of each window's episode."""
        return self._last[self.episode_index]

    def rows(self, window_ids: np.ndarray) -> dict[str, np.ndarray]:
        """Row indices into the concatenated arrays: key -> (B, len(offsets))."""
        window_ids = np.asarray(window_ids, dtype=np.int64)
        anchor = self.anchor[window_ids][:, None]
        episode = self.episode_index[window_ids]
        lo = self._starts[episode][:, None]
        hi = self._last[episode][:, None]
        return {k: np.clip(anchor + off[None, :], lo, hi) for k, off in self.key_offsets.items()}


class WindowDataset(torch.utils.data.Dataset):
    """Shared batching for the window datasets: subclasses gather rows in :meth:`_gather`.

    Any instance gathers a whole batch at once (:meth:`batch`), so loaders call that
    instead of indexing window by window; other datasets of windows are read per item.
    """

    sampler: SequenceSampler
    extras: dict[str, torch.Tensor]  # per-episode values (task index, ...) delivered with each window

    def __len__(self) -> int:
        return len(self.sampler)

    def _gather(self, window_ids: np.ndarray) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def batch(self, window_ids: np.ndarray) -> dict[str, torch.Tensor]:
        window_ids = np.asarray(window_ids, np.int64)
        out = self._gather(window_ids)
        if self.extras:
            ep = torch.from_numpy(self.sampler.episode_index[window_ids])
            for k, v in self.extras.items():
                out[k] = v[ep]
        return out

    def __getitems__(self, window_ids: Sequence[int]) -> dict[str, torch.Tensor]:
        return self.batch(np.asarray(window_ids, np.int64))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.batch(np.array([i])).items()}


class InMemoryWindows(WindowDataset):
    """Windows over arrays held in memory; :meth:`batch` gathers a whole batch at once.

    ``arrays`` hold every row of the store, or, with ``held_episodes`` (a bool mask over the
    store's episodes), only those episodes' rows, concatenated: the sampler still counts in
    store rows and episodes, so the windows and extras are the same either way.
    """

    def __init__(
        self,
        arrays: Mapping[str, np.ndarray],
        sampler: SequenceSampler,
        extras: Mapping[str, np.ndarray] | None = None,
        held_episodes: np.ndarray | None = None,
    ):
        missing = set(sampler.key_offsets) - set(arrays)
        if missing:
            raise UserError(f"dataset has no key(s) {sorted(missing)} needed by the policy")
        self.arrays = {k: torch.from_numpy(np.ascontiguousarray(arrays[k])) for k in sampler.key_offsets}
        self.sampler = sampler
        self.extras = {k: torch.from_numpy(np.asarray(v)) for k, v in (extras or {}).items()}
        self._shift: np.ndarray | None = None  # store row - held row, per episode
        if held_episodes is not None:
            held = np.asarray(held_episodes, bool)
            if not held[sampler.episode_index].all():
                raise UserError("windows reach episodes whose rows are not held in memory")
            starts = sampler.first_rows
            lengths = np.where(held, sampler.last_rows - starts + 1, 0)
            self._shift = starts - (np.cumsum(lengths) - lengths)

    def _gather(self, window_ids: np.ndarray) -> dict[str, torch.Tensor]:
        rows = self.sampler.rows(window_ids)
        if self._shift is not None:
            shift = self._shift[self.sampler.episode_index[window_ids]][:, None]
            rows = {k: r - shift for k, r in rows.items()}
        return {k: self.arrays[k][torch.from_numpy(r)] for k, r in rows.items()}


class ZarrWindows(WindowDataset):
    """Windows read from the store on demand: memory stays flat whatever the store's size.

    A batch costs one read per key over the unique rows the batch needs; each touched
    chunk is decoded once (``datasets.chunks.RowReader``, with a small per-process LRU
    cache of decoded chunks, ``chunk_cache_bytes`` per key). Keys listed in ``cache_keys`` are
    loaded into memory up front, which suits small low-dim keys next to large images.
    Safe in ``DataLoader`` workers: each process opens its own handle to the store.
    """

    def __init__(
        self,
        path: str | Path,
        sampler: SequenceSampler,
        extras: Mapping[str, np.ndarray] | None = None,
        cache_keys: Sequence[str] = (),
        chunk_cache_bytes: int = 64 << 20,
    ):
        from mixpolicy.datasets.replay_buffer import ReplayBuffer

        self.path = Path(path)
        self.chunk_cache_bytes = int(chunk_cache_bytes)
        self.sampler = sampler
        buffer = ReplayBuffer.open(self.path)
        missing = set(sampler.key_offsets) - set(buffer.keys)
        if missing:
            raise UserError(f"dataset has no key(s) {sorted(missing)} needed by the policy")
        unknown = set(cache_keys) - set(sampler.key_offsets)
        if unknown:
            raise UserError(f"cache_keys {sorted(unknown)} are not among the window keys {sorted(sampler.key_offsets)}")
        self.n_rows = buffer.n_steps
        self.cache = {k: torch.from_numpy(np.ascontiguousarray(buffer.load([k])[k])) for k in cache_keys}
        self.extras = {k: torch.from_numpy(np.asarray(v)) for k, v in (extras or {}).items()}
        self._arrays: dict[str, Any] | None = None
        self._pid = -1

    def _open(self) -> dict[str, Any]:
        # zarr handles are not shared across fork/spawn: each worker opens its own.
        if self._arrays is None or self._pid != os.getpid():
            import zarr

            from mixpolicy.datasets.chunks import RowReader

            root = zarr.open_group(str(self.path), mode="r")
            self._arrays = {
                k: RowReader(root["data"][k], self.chunk_cache_bytes) for k in self.sampler.key_offsets if k not in self.cache
            }
            self._pid = os.getpid()
        return self._arrays

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_arrays"] = None
        return state

    def _gather(self, window_ids: np.ndarray) -> dict[str, torch.Tensor]:
        arrays = self._open()
        out = {}
        for key, rows in self.sampler.rows(window_ids).items():
            if key in self.cache:
                out[key] = self.cache[key][torch.from_numpy(rows)]
                continue
            unique, inverse = np.unique(rows, return_inverse=True)
            block = arrays[key].read(unique)
            out[key] = torch.from_numpy(np.ascontiguousarray(block[inverse.reshape(rows.shape)]))
        return out


def _collate(data: Any) -> Any:
    """A batch from ``__getitems__`` is ready; a list of per-window dicts is stacked."""
    return data if isinstance(data, Mapping) else torch.utils.data.default_collate(data)


def window_loader(
    windows: torch.utils.data.Dataset,
    batch_size: int = 0,
    num_workers: int = 0,
    shuffle: bool = True,
    drop_last: bool = True,
    seed: int = 0,
    pin_memory: bool = False,
    prefetch_factor: int | None = None,
    batch_sampler: Iterable[Any] | None = None,
) -> torch.utils.data.DataLoader:
    """A DataLoader that fetches whole batches (``__getitems__``) in ``num_workers`` processes.

    ``batch_sampler`` replaces ``batch_size``/``shuffle``/``drop_last``: each of its items
    is what the dataset's ``__getitems__`` receives (the trainer's step sampler).
    """
    if batch_sampler is None and batch_size < 1:
        raise UserError("batch_size must be >= 1")
    if num_workers < 0:
        raise UserError("num_workers must be >= 0")
    kwargs: dict[str, Any] = {}
    if batch_sampler is None:
        kwargs.update(batch_size=batch_size, shuffle=shuffle, drop_last=drop_last)
    else:
        kwargs.update(batch_sampler=batch_sampler)
    if num_workers > 0:
        kwargs.update(persistent_workers=True, prefetch_factor=prefetch_factor or 4)
    return torch.utils.data.DataLoader(
        windows,
        num_workers=num_workers,
        collate_fn=_collate,
        generator=torch.Generator().manual_seed(seed),
        pin_memory=pin_memory,
        **kwargs,
    )


def make_windows(
    buffer,
    key_offsets: Mapping[str, Sequence[int]],
    episode_mask: np.ndarray | None = None,
    extras: Mapping[str, np.ndarray] | None = None,
    in_memory: bool = True,
    cache_keys: Sequence[str] = (),
) -> InMemoryWindows | ZarrWindows:
    """Windows over ``buffer``: loaded into memory, or read from disk per batch."""
    sampler = SequenceSampler(buffer.episode_ends, key_offsets, episode_mask)
    if in_memory:
        return InMemoryWindows(buffer.load(key_offsets), sampler, extras)
    return ZarrWindows(buffer.path, sampler, extras, cache_keys)
