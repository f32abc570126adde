"""Training windows assembled from a store for the time offsets a policy declares.

The policy says which keys it reads at which offsets from the current step
(``key_offsets``); this module opens the store, checks the keys, selects episodes (and
the validation episodes, when asked), decides where the windows live, cuts them and fits
the normalizer. It knows nothing of policies: the caller passes the offsets, the keys that
must be camera frames and the key under which windows carry their task index.

Where windows live (:class:`WindowOptions`): ``memory`` loads the selected episodes' rows
of the window keys (:class:`InMemoryWindows`); ``disk`` reads the rows each batch needs
from the store (:class:`ZarrWindows`; low-dim keys are kept in memory when they fit the
budget); ``auto`` loads when the selected rows x bytes per row of the window keys fit
``memory_budget_bytes``, else reads from disk. Both give the same windows in the same
order, so the same seed trains on the same batches either way.

The normalizer (low-dim keys) uses the statistics ``mixpolicy data stats`` saved in the
store when they cover every normalized key, else statistics streamed over the selected
training episodes (``ReplayBuffer.compute_stats``), never a whole load.

A run that continues from a checkpoint passes the checkpoint's task list as
``base_tasks``: the vocabulary keeps those tasks at their indices and appends the
store's other tasks, and every window's task index points into that vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from mixpolicy.datasets.chunks import RowReader
from mixpolicy.datasets.normalizer import DEFAULT_MODE, Normalizer
from mixpolicy.datasets.replay_buffer import UNKNOWN_TASK, ReplayBuffer
from mixpolicy.datasets.sampler import InMemoryWindows, SequenceSampler, WindowDataset, ZarrWindows
from mixpolicy.datasets.selection import EpisodeSelection, select_episodes
from mixpolicy.errors import UserError

STORAGES = ("auto", "memory", "disk")


@dataclass
class WindowOptions:
    """Where windows live and how low-dim keys are normalized."""

    storage: str = "auto"  # auto | memory | disk
    memory_budget_bytes: int = 4 << 30
    normalizer_mode: str = DEFAULT_MODE
    normalizer_modes: Mapping[str, str] = field(default_factory=dict)  # key -> mode, overrides normalizer_mode
    saved_stats: bool = True  # use the store's saved statistics when they cover every normalized key


@dataclass
class AssembledData:
    """Windows of the selected episodes and what a policy needs to know about them."""

    windows: WindowDataset
    normalizer: Normalizer  # low-dim keys only; images are normalized inside the image encoder
    obs_shapes: dict[str, list[int]]
    action_dim: int
    tasks: list[str]  # the task vocabulary: a window's task index i means tasks[i]
    discrete_action_dims: list[int] = field(default_factory=list)
    task_descriptions: dict[str, str] = field(default_factory=dict)
    fps: float = 0.0
    source: str = ""
    val_windows: WindowDataset | None = None  # windows of the validation episodes (same storage)
    storage: str = "memory"  # where the windows live: memory | disk
    data_bytes: int = 0  # selected rows x bytes per row of the window keys
    stats_source: str = "computed"  # saved (the store's) | computed (streamed over the training episodes)


def task_vocabulary(base: Sequence[str], data_tasks: Sequence[str]) -> list[str]:
    """``base`` in its order, then the tasks of ``data_tasks`` it lacks."""
    vocab = list(base)
    vocab += [t for t in data_tasks if t not in vocab]
    return vocab


def check_keys(buffer: ReplayBuffer, keys: Sequence[str], image_keys: Sequence[str]) -> None:
    """Every window key exists; camera keys hold uint8 (H, W, 3) frames. One line naming the key."""
    missing = [k for k in keys if k not in buffer.keys]
    if missing:
        raise UserError(f"dataset {buffer.path} lacks required key(s) {missing} (has {', '.join(buffer.keys)})")
    for k in image_keys:
        arr = buffer.array(k)
        shape, dtype = tuple(arr.shape[1:]), np.dtype(arr.dtype)
        if dtype != np.uint8:
            raise UserError(f"dataset key {k!r} holds {dtype} images; camera keys must be uint8 (H, W, 3) frames in [0, 255]")
        if len(shape) != 3 or shape[-1] != 3:
            raise UserError(f"dataset key {k!r} has frames of shape {shape}; camera keys must be (H, W, 3) RGB")


def row_bytes(buffer: ReplayBuffer, key: str) -> int:
    arr = buffer.array(key)
    return int(np.prod(arr.shape[1:], dtype=np.int64)) * np.dtype(arr.dtype).itemsize


def fit_normalizer(buffer: ReplayBuffer, keys: Sequence[str], mask: np.ndarray, options: WindowOptions) -> tuple[Normalizer, str]:
    """Normalizer of ``keys`` and where its statistics came from (``saved`` or ``computed``)."""
    unknown = sorted(set(options.normalizer_modes) - set(keys))
    if unknown:
        raise UserError(f"normalizer.modes names key(s) {unknown} that are not normalized (normalized: {', '.join(keys)})")
    saved = buffer.stats if options.saved_stats else None
    if saved and all(k in saved for k in keys):
        stats, source = {k: saved[k] for k in keys}, "saved"
        for k in keys:
            dims, want = np.shape(stats[k]["min"]), tuple(buffer.array(k).shape[1:])
            if dims != want:
                raise UserError(
                    f"{buffer.path}: saved stats of {k!r} have shape {dims}, the data {want}; "
                    f"rerun `mixpolicy data stats path={buffer.path}` or pass normalizer.saved_stats=false"
                )
    else:
        stats, source = buffer.compute_stats(keys, mask), "computed"
    modes = {k: options.normalizer_modes.get(k, options.normalizer_mode) for k in keys}
    return Normalizer.from_stats(stats, modes), source


def _load_rows(buffer: ReplayBuffer, keys: Sequence[str], rows: np.ndarray) -> dict[str, np.ndarray]:
    """The given sorted rows of ``keys``; chunk by chunk, each decoded once."""
    if len(rows) == buffer.n_steps:
        return buffer.load(keys)
    return {k: RowReader(buffer.array(k), cache_bytes=0).read(rows) for k in keys}


def _windows(
    buffer: ReplayBuffer,
    key_offsets: Mapping[str, range],
    masks: Sequence[np.ndarray | None],
    extras: Mapping[str, np.ndarray],
    in_memory: bool,
    cache_keys: Sequence[str],
) -> list[WindowDataset | None]:
    """One window dataset per mask (None for a None mask), all over the same storage."""
    used = np.logical_or.reduce([m for m in masks if m is not None])
    if in_memory:
        # Only the used episodes' rows are loaded; windows still count in store rows.
        arrays = _load_rows(buffer, list(key_offsets), np.flatnonzero(buffer.row_mask(used)))
        for k, a in arrays.items():
            if np.issubdtype(a.dtype, np.floating) and not np.all(np.isfinite(a)):
                raise UserError(f"dataset key {k!r} contains NaN or inf")
        samplers = [None if m is None else SequenceSampler(buffer.episode_ends, key_offsets, m) for m in masks]
        return [None if s is None else InMemoryWindows(arrays, s, extras, held_episodes=used) for s in samplers]
    out: list[WindowDataset | None] = []
    for i, m in enumerate(masks):
        sampler = None if m is None else SequenceSampler(buffer.episode_ends, key_offsets, m)
        out.append(None if m is None else ZarrWindows(buffer.path, sampler, extras, cache_keys if i == 0 else ()))
    return out


def assemble_training_data(
    path: str,
    key_offsets: Mapping[str, range],
    action_key: str,
    selection: EpisodeSelection,
    task_key: str,
    base_tasks: Sequence[str] | None = None,
    base_task_descriptions: Mapping[str, str] | None = None,
    discrete_action_scale: float = 1.0,
    image_keys: Sequence[str] = (),
    options: WindowOptions | None = None,
    val_selection: EpisodeSelection | None = None,
) -> AssembledData:
    """Windows over the selected episodes of the store at ``path`` (and over ``val_selection``'s)."""
    options = options or WindowOptions()
    if options.storage not in STORAGES:
        raise UserError(f"data.storage={options.storage!r}; choose from {', '.join(STORAGES)}")
    buffer = ReplayBuffer.open(path)
    if buffer.n_episodes == 0:
        raise UserError(f"dataset {path} holds no episodes")
    check_keys(buffer, list(key_offsets), image_keys)
    mask = select_episodes(buffer, selection)
    if not mask.any():
        raise UserError("no episodes left after filtering (successful_only / tasks / max_episodes)")
    val_mask = select_episodes(buffer, val_selection) if val_selection is not None else None
    if val_mask is not None and not val_mask.any():
        raise UserError(f"val_ratio={val_selection.val_ratio} leaves no validation episode (a task needs 2 or more episodes to give one)")
    task_index = buffer.episode_task_index
    tasks = list(buffer.meta.tasks)
    descriptions = dict(buffer.meta.task_descriptions)
    if base_tasks is not None:
        data_tasks = tasks or [UNKNOWN_TASK]
        tasks = task_vocabulary(base_tasks, data_tasks)
        task_index = np.asarray([tasks.index(t) for t in data_tasks], np.int64)[task_index]
        descriptions = {**dict(base_task_descriptions or {}), **descriptions}

    used = mask if val_mask is None else mask | val_mask
    data_bytes = int(buffer.row_mask(used).sum()) * sum(row_bytes(buffer, k) for k in key_offsets)
    in_memory = options.storage == "memory" or (options.storage == "auto" and data_bytes <= options.memory_budget_bytes)
    lowdim = [k for k in key_offsets if buffer.array(k).ndim == 2]
    # ZarrWindows keeps cached keys whole (every row of the store): only when they fit the budget.
    cache = [] if sum(row_bytes(buffer, k) for k in lowdim) * buffer.n_steps > options.memory_budget_bytes else lowdim
    windows, val_windows = _windows(buffer, key_offsets, [mask, val_mask], {task_key: task_index}, in_memory, cache)

    normalizer, stats_source = fit_normalizer(buffer, lowdim, mask, options)
    discrete_dims = list(buffer.meta.discrete_action_dims)
    if discrete_action_scale != 1.0 and discrete_dims:
        normalizer.scale_dims(action_key, discrete_dims, 1.0 / discrete_action_scale)
    return AssembledData(
        windows=windows,
        normalizer=normalizer,
        obs_shapes={k: list(buffer.array(k).shape[1:]) for k in key_offsets if k != action_key},
        action_dim=int(buffer.array(action_key).shape[1]),
        tasks=tasks,
        discrete_action_dims=discrete_dims,
        task_descriptions=descriptions,
        fps=float(buffer.meta.fps),
        source=str(path),
        val_windows=val_windows,
        storage="memory" if in_memory else "disk",
        data_bytes=data_bytes,
        stats_source=stats_source,
    )
