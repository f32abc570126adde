"""Training windows assembled from a store for the time offsets a policy declares.

The policy says which keys it reads at which offsets from the current step
(``key_offsets``); this module opens the store, selects episodes, loads those keys,
checks them, cuts the windows and fits the normalizer on the selected episodes. It knows
nothing of policies: the caller passes the offsets and the key under which windows carry
their task index.

A run that continues from a checkpoint passes the checkpoint's task list as
``base_tasks``: the vocabulary keeps those tasks at their indices and appends the
store's other tasks, and every window's task index points into that vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from mixpolicy.datasets.normalizer import Normalizer
from mixpolicy.datasets.replay_buffer import UNKNOWN_TASK, ReplayBuffer
from mixpolicy.datasets.sampler import InMemoryWindows, SequenceSampler
from mixpolicy.datasets.selection import EpisodeSelection, select_episodes
from mixpolicy.errors import UserError


@dataclass
class AssembledData:
    """Windows of the selected episodes and what a policy needs to know about them."""

    windows: InMemoryWindows
    normalizer: Normalizer  # low-dim keys only; images are normalized inside the image encoder
    obs_shapes: dict[str, list[int]]
    action_dim: int
    tasks: list[str]  # the task vocabulary: a window's task index i means tasks[i]
    discrete_action_dims: list[int] = field(default_factory=list)
    task_descriptions: dict[str, str] = field(default_factory=dict)
    fps: float = 0.0
    source: str = ""


def task_vocabulary(base: Sequence[str], data_tasks: Sequence[str]) -> list[str]:
    """``base`` in its order, then the tasks of ``data_tasks`` it lacks."""
    vocab = list(base)
    vocab += [t for t in data_tasks if t not in vocab]
    return vocab


def assemble_training_data(
    path: str,
    key_offsets: Mapping[str, range],
    action_key: str,
    selection: EpisodeSelection,
    task_key: str,
    base_tasks: Sequence[str] | None = None,
    base_task_descriptions: Mapping[str, str] | None = None,
    discrete_action_scale: float = 1.0,
) -> AssembledData:
    """In-memory windows over the selected episodes of the store at ``path``, normalizer from those episodes."""
    buffer = ReplayBuffer.open(path)
    if buffer.n_episodes == 0:
        raise UserError(f"dataset {path} holds no episodes")
    missing = [k for k in key_offsets if k not in buffer.keys]
    if missing:
        raise UserError(f"dataset {path} lacks required key(s) {missing} (has {', '.join(buffer.keys)})")
    mask = select_episodes(buffer, selection)
    if not mask.any():
        raise UserError("no episodes left after filtering (successful_only / tasks / max_episodes)")
    arrays = buffer.load(key_offsets)
    for k, a in arrays.items():
        if np.issubdtype(a.dtype, np.floating) and not np.all(np.isfinite(a)):
            raise UserError(f"dataset key {k!r} contains NaN or inf")
    task_index = buffer.episode_task_index
    tasks = list(buffer.meta.tasks)
    descriptions = dict(buffer.meta.task_descriptions)
    if base_tasks is not None:
        data_tasks = tasks or [UNKNOWN_TASK]
        tasks = task_vocabulary(base_tasks, data_tasks)
        task_index = np.asarray([tasks.index(t) for t in data_tasks], np.int64)[task_index]
        descriptions = {**dict(base_task_descriptions or {}), **descriptions}
    sampler = SequenceSampler(buffer.episode_ends, key_offsets, mask)
    windows = InMemoryWindows(arrays, sampler, extras={task_key: task_index})
    rows = sampler.anchor  # every step of a selected episode anchors one window
    normalizer = Normalizer.from_data({k: arrays[k][rows] for k in key_offsets if arrays[k].ndim == 2})
    discrete_dims = list(buffer.meta.discrete_action_dims)
    if discrete_action_scale != 1.0 and discrete_dims:
        normalizer.scale_dims(action_key, discrete_dims, 1.0 / discrete_action_scale)
    return AssembledData(
        windows=windows,
        normalizer=normalizer,
        obs_shapes={k: list(arrays[k].shape[1:]) for k in key_offsets if k != action_key},
        action_dim=int(arrays[action_key].shape[1]),
        tasks=tasks,
        discrete_action_dims=discrete_dims,
        task_descriptions=descriptions,
        fps=float(buffer.meta.fps),
        source=str(path),
    )
