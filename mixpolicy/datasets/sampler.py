"""Windows over concatenated episodes: per-key time offsets, edge padding, O(1) access.

A window is anchored at step ``t`` of an episode. Each key declares the offsets it needs
relative to ``t`` (for example observations ``-1, 0`` and actions ``0 .. 15``); rows that
fall outside the episode are clamped to its first or last step, which pads with edge
values. All index arithmetic is vectorized, so a batch of windows is one gather per key.
"""

from __future__ import annotations

from typing import Mapping, Sequence

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
        starts, ends = starts[episode_mask], ends[episode_mask]
        lengths = ends - starts
        self.episode_index = np.repeat(np.flatnonzero(episode_mask), lengths)
        self.anchor = np.concatenate([np.arange(s, e) for s, e in zip(starts, ends)]) if len(ends) else np.zeros(0, np.int64)
        self.first = np.repeat(starts, lengths)
        self.last = np.repeat(ends - 1, lengths)
        self.key_offsets = {k: np.asarray(list(v), dtype=np.int64) for k, v in key_offsets.items()}
        for k, v in self.key_offsets.items():
            if v.ndim != 1 or len(v) == 0:
                raise UserError(f"offsets for key {k!r} must be a non-empty list of ints")

    def __len__(self) -> int:
        return int(len(self.anchor))

    def rows(self, window_ids: np.ndarray) -> dict[str, np.ndarray]:
        """Row indices into the concatenated arrays: key -> (B, len(offsets))."""
        window_ids = np.asarray(window_ids, dtype=np.int64)
        anchor = self.anchor[window_ids][:, None]
        lo = self.first[window_ids][:, None]
        hi = self.last[window_ids][:, None]
        return {k: np.clip(anchor + off[None, :], lo, hi) for k, off in self.key_offsets.items()}


class InMemoryWindows(torch.utils.data.Dataset):
    """Windows over arrays held in memory; :meth:`batch` gathers a whole batch at once."""

    def __init__(self, arrays: Mapping[str, np.ndarray], sampler: SequenceSampler, extras: Mapping[str, np.ndarray] | None = None):
        missing = set(sampler.key_offsets) - set(arrays)
        if missing:
            raise UserError(f"dataset has no key(s) {sorted(missing)} needed by the policy")
        self.arrays = {k: torch.from_numpy(np.ascontiguousarray(arrays[k])) for k in sampler.key_offsets}
        self.sampler = sampler
        # Per-episode values (task index, ...) delivered with each window.
        self.extras = {k: torch.from_numpy(np.asarray(v)) for k, v in (extras or {}).items()}

    def __len__(self) -> int:
        return len(self.sampler)

    def batch(self, window_ids: np.ndarray) -> dict[str, torch.Tensor]:
        rows = self.sampler.rows(window_ids)
        out = {k: self.arrays[k][torch.from_numpy(r)] for k, r in rows.items()}
        if self.extras:
            ep = torch.from_numpy(self.sampler.episode_index[np.asarray(window_ids)])
            for k, v in self.extras.items():
                out[k] = v[ep]
        return out

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.batch(np.array([i])).items()}
