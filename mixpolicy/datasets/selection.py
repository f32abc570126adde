"""Choosing episodes: task and success filters, a cap on their number, train/validation split.

The split is by episode (never by window, so no validation window shares an episode with
a training window), stratified by task and fixed by a seed: the same store and settings
always give the same split, on any machine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mixpolicy.config import check
from mixpolicy.errors import UserError

SPLITS = ("all", "train", "val")


@dataclass
class EpisodeSelection:
    tasks: list[str] = field(default_factory=list)  # empty: every task
    successful_only: bool = False
    max_episodes: int = 0  # 0: no cap; applied in store order before the split
    val_ratio: float = 0.0  # fraction of each task's episodes held out for validation
    split: str = "all"  # all | train | val
    seed: int = 0

    def __post_init__(self):
        check(self.max_episodes >= 0, "max_episodes", "must be >= 0 (0 means all)")
        check(0.0 <= self.val_ratio < 1.0, "val_ratio", "must be in [0, 1)")
        check(self.split in SPLITS, "split", f"must be one of {SPLITS}")
        check(self.split != "val" or self.val_ratio > 0, "split", "split=val needs val_ratio > 0")


def split_episodes(task_of_episode: np.ndarray, candidates: np.ndarray, val_ratio: float, seed: int) -> np.ndarray:
    """bool mask over ``candidates`` (episode ids): True where the episode goes to validation.

    Each task keeps round(val_ratio * n) episodes for validation, at least one when it has
    two or more episodes and val_ratio > 0.
    """
    is_val = np.zeros(len(candidates), bool)
    if val_ratio <= 0:
        return is_val
    rng = np.random.default_rng(seed)
    for task in np.unique(task_of_episode[candidates]):
        members = np.flatnonzero(task_of_episode[candidates] == task)
        n_val = int(round(val_ratio * len(members)))
        if len(members) >= 2:
            n_val = min(max(n_val, 1), len(members) - 1)
        else:
            n_val = 0
        is_val[rng.permutation(members)[:n_val]] = True
    return is_val


def select_episodes(buffer, selection: EpisodeSelection | None = None) -> np.ndarray:
    """(n_episodes,) bool mask of the episodes ``selection`` keeps in ``buffer``."""
    sel = selection or EpisodeSelection()
    mask = np.ones(buffer.n_episodes, bool)
    if sel.successful_only:
        mask &= buffer.episode_success
    tasks = buffer.episode_tasks
    if sel.tasks:
        unknown = sorted(set(sel.tasks) - set(tasks))
        if unknown:
            raise UserError(f"tasks {unknown} have no episodes in {buffer.path}")
        mask &= np.array([t in sel.tasks for t in tasks], bool)
    if sel.max_episodes:
        keep = np.flatnonzero(mask)[: sel.max_episodes]
        mask = np.zeros_like(mask)
        mask[keep] = True
    if sel.split != "all":
        candidates = np.flatnonzero(mask)
        is_val = split_episodes(buffer.episode_task_index, candidates, sel.val_ratio, sel.seed)
        mask = np.zeros_like(mask)
        mask[candidates[is_val if sel.split == "val" else ~is_val]] = True
    return mask
