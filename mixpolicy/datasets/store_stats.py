"""Per-key statistics of a store, read in bounded memory."""

from __future__ import annotations

from typing import Iterable

import numpy as np

from mixpolicy.datasets.store_meta import is_image_spec
from mixpolicy.errors import UserError


def compute_store_stats(
    buffer,
    keys: Iterable[str] | None = None,
    episode_mask: np.ndarray | None = None,
    max_image_frames: int = 2000,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, dict[str, np.ndarray]]:
    """See :meth:`ReplayBuffer.compute_stats`."""
    from tqdm.auto import tqdm

    from mixpolicy.datasets.normalizer import RunningStats

    keys = list(keys or buffer.keys)
    rows = buffer.row_mask(episode_mask)
    selected = np.flatnonzero(rows)
    if len(selected) == 0:
        raise UserError(f"{buffer.path}: no steps selected to compute statistics from")
    rng = np.random.default_rng(seed)
    out = {}
    for key in keys:
        arr = buffer.array(key)
        running = RunningStats(seed=seed)
        if is_image_spec(tuple(arr.shape[1:]), arr.dtype):
            pick = np.sort(rng.choice(selected, size=min(max_image_frames, len(selected)), replace=False))
            blocks = [pick[i : i + 256] for i in range(0, len(pick), 256)]
            for block in tqdm(blocks, desc=f"stats {key}", disable=not progress, leave=False):
                running.update(arr.get_orthogonal_selection((block,)), key)
        else:
            step = int(arr.chunks[0]) * max(1, (1 << 22) // max(1, int(arr.chunks[0]) * int(np.prod(arr.shape[1:], dtype=np.int64)) * arr.dtype.itemsize))
            for lo in tqdm(range(0, buffer.n_steps, step), desc=f"stats {key}", disable=not progress, leave=False):
                hi = min(buffer.n_steps, lo + step)
                keep = rows[lo:hi]
                if keep.any():
                    block = np.asarray(arr[lo:hi])
                    running.update(block[keep].reshape(int(keep.sum()), -1), key)
        out[key] = running.result()
    return out
