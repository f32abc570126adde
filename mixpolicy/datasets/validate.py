"""Check a store and list every problem found, instead of stopping at the first.

Looks at: the layout (groups, ``meta/episode_ends``), episode ends (1-D, strictly
increasing), each key's length against the committed steps, dtype and step shape against
the recorded key specs, missing and unexpected keys, per-episode metadata lengths and task
indices, chunk files missing under committed rows (in stores that write every chunk, a
missing file is lost data that zarr would read back as zeros), chunks that cannot be read
or decoded, and NaN/inf in float keys (with the episodes they are in). Reads chunk-aligned
blocks, so memory stays bounded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from mixpolicy.datasets.store_io import chunk_files
from mixpolicy.datasets.store_meta import ATTRS_KEY, LAYOUT_KEY, PER_EPISODE_ARRAYS, DatasetMeta


def validate_store(path: str | Path, progress: bool = False) -> list[str]:
    """Every problem in the store at ``path`` as one line each; empty when it is sound."""
    import zarr

    path = Path(path)
    if not path.exists():
        return [f"dataset not found: {path}"]
    if not path.is_dir():
        return [f"not a zarr directory: {path}"]
    try:
        root = zarr.open_group(str(path), mode="r")
    except Exception as exc:
        return [f"not a readable zarr store: {type(exc).__name__}: {exc}"]
    problems: list[str] = []
    for group in ("data", "meta"):
        if group not in root:
            problems.append(f"no '{group}' group")
    if problems:
        return problems
    if "episode_ends" not in root["meta"]:
        return ["no 'meta/episode_ends' array"]

    meta = None
    if ATTRS_KEY in root.attrs:
        try:
            meta = DatasetMeta.from_json(root.attrs[ATTRS_KEY])
        except Exception as exc:
            problems.append(f"unreadable mixpolicy metadata: {exc}")

    try:
        ends = np.asarray(root["meta/episode_ends"][:], np.int64)
    except Exception as exc:
        return problems + [f"meta/episode_ends cannot be read: {type(exc).__name__}: {exc}"]
    if ends.ndim != 1:
        return problems + [f"meta/episode_ends must be 1-D, has shape {ends.shape}"]
    if len(ends) and ends[-1] == 0:
        ends = ends[:-1]  # an uncommitted trailing entry (writer stopped mid-commit): not a problem
    if len(ends) and ends[0] <= 0:
        problems.append(f"meta/episode_ends starts at {ends[0]}: episode 0 is empty")
    bad = np.flatnonzero(np.diff(ends) <= 0)
    if len(bad):
        problems.append(f"meta/episode_ends is not strictly increasing at episode(s) {(bad + 1).tolist()[:10]}")
        return problems
    n_steps = int(ends[-1]) if len(ends) else 0
    n_episodes = len(ends)

    data_keys = sorted(root["data"].array_keys())
    if meta is not None:
        for k in sorted(set(meta.specs) - set(data_keys)):
            problems.append(f"key {k!r} is in the metadata but missing from data/")
        for k in sorted(set(data_keys) - set(meta.specs)):
            problems.append(f"data/{k} has no key spec in the metadata")
        if meta.action_key and meta.action_key not in data_keys:
            problems.append(f"action key {meta.action_key!r} is missing from data/")
    every_chunk_written = bool(dict(root.attrs).get(LAYOUT_KEY, {}).get("every_chunk_written"))
    if every_chunk_written:
        problems += _missing_chunks("meta/episode_ends", root["meta/episode_ends"], n_episodes)
    for name in PER_EPISODE_ARRAYS:
        if every_chunk_written and name in root["meta"]:
            problems += _missing_chunks(f"meta/{name}", root["meta"][name], n_episodes)
        if name in root["meta"] and root["meta"][name].shape[0] < n_episodes:
            problems.append(f"meta/{name} has {root['meta'][name].shape[0]} entries for {n_episodes} episodes")
    if meta is not None and "episode_task" in root["meta"] and n_episodes:
        try:
            task_idx = np.asarray(root["meta/episode_task"][:n_episodes])
            if len(task_idx) and (task_idx.min() < 0 or task_idx.max() >= max(1, len(meta.tasks))):
                problems.append(f"meta/episode_task holds indices outside the {len(meta.tasks)} known tasks")
        except Exception as exc:
            problems.append(f"meta/episode_task cannot be read: {type(exc).__name__}: {exc}")

    for key in data_keys:
        arr = root["data"][key]
        if arr.shape[0] < n_steps:
            problems.append(f"data/{key} has {arr.shape[0]} rows but episode_ends says {n_steps}")
        if meta is not None and key in meta.specs:
            spec = meta.specs[key]
            if tuple(arr.shape[1:]) != tuple(spec.shape):
                problems.append(f"data/{key} step shape {tuple(arr.shape[1:])} differs from its spec {tuple(spec.shape)}")
            if str(arr.dtype) != spec.dtype:
                problems.append(f"data/{key} dtype {arr.dtype} differs from its spec {spec.dtype}")
        rows = min(n_steps, arr.shape[0])
        if every_chunk_written:
            problems += _missing_chunks(f"data/{key}", arr, rows)
        chunk = int(arr.chunks[0])
        is_float = np.issubdtype(arr.dtype, np.floating)
        bad_rows: list[np.ndarray] = []
        corrupt = 0
        for lo in tqdm(range(0, rows, chunk), desc=f"check {key}", disable=not progress, leave=False):
            hi = min(rows, lo + chunk)
            try:
                block = np.asarray(arr[lo:hi])
            except Exception as exc:
                corrupt += 1
                if corrupt <= 5:
                    problems.append(f"data/{key}: chunk {lo // chunk} (rows {lo}-{hi - 1}) cannot be decoded: {type(exc).__name__}: {exc}")
                continue
            if is_float:
                finite = np.isfinite(block.reshape(len(block), -1)).all(axis=1)
                if not finite.all():
                    bad_rows.append(lo + np.flatnonzero(~finite))
        if corrupt > 5:
            problems.append(f"data/{key}: {corrupt} corrupt chunks in all")
        if bad_rows:
            rows_bad = np.concatenate(bad_rows)
            episodes = np.unique(np.searchsorted(ends, rows_bad, side="right"))
            problems.append(
                f"data/{key} has NaN or inf in {len(rows_bad)} step(s) of episode(s) {episodes.tolist()[:10]}"
                + (" ..." if len(episodes) > 10 else "")
            )
    return problems


def _missing_chunks(name: str, arr, rows: int) -> list[str]:
    """One line naming the chunk files of rows ``0:rows`` that do not exist (none when all do)."""
    missing = [(i, p) for i, p in chunk_files(arr, 0, min(rows, arr.shape[0])) if not p.is_file()]
    if not missing:
        return []
    chunk, (first, path) = int(arr.chunks[0]), missing[0]
    return [
        f"{name}: {len(missing)} chunk file(s) under committed rows are missing, first {path.name!r} of chunk {first} "
        f"(rows {first * chunk}-{min(rows, (first + 1) * chunk) - 1}); zarr would read them as zeros"
    ]
