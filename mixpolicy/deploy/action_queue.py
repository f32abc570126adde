"""Timestamped action queue with chunk-seam handling.

Action ``i`` of a chunk planned from the observation of control tick ``j`` is meant for
tick ``j + i``. When a chunk arrives at tick ``now``, its actions for ticks before
``now`` are already in the past and are dropped (as diffusion_policy's real-robot runner
drops actions whose time has passed). Where the new chunk overlaps actions still queued
from the previous one, ``seam`` decides:

* ``none``     -- the new chunk replaces the old actions;
* ``blend``    -- over the first ``blend_steps`` overlapping ticks the executed action
  moves linearly from the old plan to the new one, then the new chunk alone;
* ``ensemble`` -- temporal ensembling (ACT): each tick executes the weighted mean of all
  predictions made for it, the i-th prediction (oldest first) weighted exp(-coeff * i).

Discrete dims (the gripper) are never averaged: the newest prediction wins.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

SEAM_MODES = ("none", "blend", "ensemble")


@dataclass
class MergeInfo:
    dropped: int  # actions of the chunk already in the past
    kept: int  # actions queued from the chunk
    raw_jump: float  # max |new - old| over continuous dims at the first tick both cover (0: no overlap)


class ActionQueue:
    def __init__(self, action_dim: int, seam: str = "none", blend_steps: int = 4, ensemble_coeff: float = 0.01, discrete_dims: list[int] | tuple[int, ...] = ()):
        if seam not in SEAM_MODES:
            raise ValueError(f"seam must be one of {SEAM_MODES}, got {seam!r}")
        self.action_dim = action_dim
        self.seam = seam
        self.blend_steps = max(1, int(blend_steps))
        self.ensemble_coeff = float(ensemble_coeff)
        self.discrete = np.zeros(action_dim, bool)
        self.discrete[list(discrete_dims)] = True
        self.clear()

    def clear(self) -> None:
        self._actions: dict[int, np.ndarray] = {}
        # Temporal ensembling state per tick: weighted sum, weight sum, count of predictions.
        self._sum: dict[int, np.ndarray] = {}
        self._wsum: dict[int, float] = {}
        self._count: dict[int, int] = {}
        self._source: dict[int, int] = {}  # tick -> id of the chunk that last wrote it
        self.chunks = 0

    def __len__(self) -> int:
        return len(self._actions)

    def depth(self, now: int) -> int:
        """Queued actions for ticks >= now."""
        return sum(1 for t in self._actions if t >= now)

    def end_tick(self) -> int | None:
        """The last tick with a queued action."""
        return max(self._actions) if self._actions else None

    def merge(self, chunk: np.ndarray, start_tick: int, now: int) -> MergeInfo:
        chunk = np.asarray(chunk, np.float64)
        if chunk.ndim != 2 or chunk.shape[1] != self.action_dim:
            raise ValueError(f"chunk must be (H, {self.action_dim}), got {chunk.shape}")
        self.chunks += 1
        cid = self.chunks
        for t in [t for t in self._actions if t < now]:
            self._forget(t)
        first = max(now, start_tick)
        dropped = first - start_tick
        overlap = [t for t in range(first, start_tick + len(chunk)) if t in self._actions]
        cont = ~self.discrete
        raw_jump = 0.0
        if overlap:
            t0 = overlap[0]
            raw_jump = float(np.max(np.abs(chunk[t0 - start_tick][cont] - self._actions[t0][cont]), initial=0.0))
        kept = 0
        for t in range(first, start_tick + len(chunk)):
            new = chunk[t - start_tick]
            old = self._actions.get(t)
            if old is None or self.seam == "none":
                out = new.copy()
                self._sum[t], self._wsum[t], self._count[t] = new * 1.0, 1.0, 1
            elif self.seam == "blend":
                j = overlap.index(t) if t in overlap else len(overlap)
                w = min(1.0, (j + 1) / (self.blend_steps + 1))
                out = (1 - w) * old + w * new
            else:
                c = self._count[t]
                w = math.exp(-self.ensemble_coeff * c)
                self._sum[t] = self._sum[t] + w * new
                self._wsum[t] += w
                self._count[t] = c + 1
                out = self._sum[t] / self._wsum[t]
            out[self.discrete] = new[self.discrete]
            self._actions[t] = out
            self._source[t] = cid
            kept += 1
        return MergeInfo(dropped=dropped, kept=kept, raw_jump=raw_jump)

    def _forget(self, t: int) -> None:
        for d in (self._actions, self._sum, self._wsum, self._count, self._source):
            d.pop(t, None)

    def pop(self, now: int) -> tuple[np.ndarray, int] | None:
        """The action for tick ``now`` and the chunk id it came from; older ticks are dropped."""
        for t in [t for t in self._actions if t < now]:
            self._forget(t)
        if now not in self._actions:
            return None
        source = self._source[now]
        action = self._actions[now]
        self._forget(now)
        return action, source
