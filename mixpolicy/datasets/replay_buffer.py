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

Appending is ordered so that a writer killed at any point leaves a readable store:
episode data first, per-episode metadata next, ``meta/episode_ends`` last. Readers
trust ``episode_ends`` alone, so rows written past its last entry are ignored (and
overwritten by the next append).

Chunks run along time. Low-dim keys get about 1 MiB chunks; uint8 images get chunks of a
few frames (about 128 KiB) so that a random window decodes little more than it uses. Every
key is compressed with Blosc zstd, bit-shuffled for numeric keys, unshuffled for images.

Stores written by diffusion_policy (zarr v2, only ``data/*`` and ``meta/episode_ends``)
open unchanged; their episodes get the task ``"unknown"``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from mixpolicy.errors import UserError

FORMAT_VERSION = 1
ATTRS_KEY = "mixpolicy"
STATS_KEY = "mixpolicy_stats"
IMAGE_CHUNK_BYTES = 128 << 10
LOWDIM_CHUNK_BYTES = 1 << 20
UNKNOWN_TASK = "unknown"


@dataclass
class KeySpec:
    """Shape (per step) and dtype of one data key."""

    shape: tuple[int, ...]
    dtype: str

    def to_json(self) -> dict:
        return {"shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, d: Mapping) -> "KeySpec":
        return cls(tuple(int(s) for s in d["shape"]), str(d["dtype"]))


@dataclass
class DatasetMeta:
    """What a policy needs to know about a dataset besides its arrays."""

    fps: float = 10.0
    tasks: list[str] = field(default_factory=list)
    obs_keys: list[str] = field(default_factory=list)
    action_key: str = "action"
    discrete_action_dims: list[int] = field(default_factory=list)
    task_descriptions: dict[str, str] = field(default_factory=dict)
    source: str = ""
    specs: dict[str, KeySpec] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)
    # store key -> the name it had in the format it was imported from (for export)
    original_keys: dict[str, str] = field(default_factory=dict)
    robot_type: str = ""

    def to_json(self) -> dict:
        d = asdict(self)
        d["specs"] = {k: v.to_json() for k, v in self.specs.items()}
        d["format_version"] = FORMAT_VERSION
        return d

    @classmethod
    def from_json(cls, d: Mapping) -> "DatasetMeta":
        version = int(d.get("format_version", FORMAT_VERSION))
        if version > FORMAT_VERSION:
            raise UserError(
                f"dataset format version {version} is newer than this mixpolicy reads ({FORMAT_VERSION})"
            )
        return cls(
            fps=float(d.get("fps", 10.0)),
            tasks=list(d.get("tasks", [])),
            obs_keys=list(d.get("obs_keys", [])),
            action_key=str(d.get("action_key", "action")),
            discrete_action_dims=[int(i) for i in d.get("discrete_action_dims", [])],
            task_descriptions=dict(d.get("task_descriptions", {})),
            source=str(d.get("source", "")),
            specs={k: KeySpec.from_json(v) for k, v in d.get("specs", {}).items()},
            sources=list(d.get("sources", [])),
            original_keys=dict(d.get("original_keys", {})),
            robot_type=str(d.get("robot_type", "")),
        )


def _compressor_for(shape: tuple[int, ...], dtype: np.dtype):
    # zstd level 3 keeps writes fast. Bit-shuffle helps float data; on rendered uint8 camera
    # frames it hurt both ratio (6.5x vs 8.4x) and random reads (1.8x slower), measured by
    # benchmarks/bench_data.py, so images go unshuffled.
    shuffle = "noshuffle" if is_image_spec(shape, dtype) else "bitshuffle"
    return BloscCodec(cname="zstd", clevel=3, shuffle=shuffle, typesize=dtype.itemsize)


def is_image_spec(shape: tuple[int, ...], dtype: np.dtype | str) -> bool:
    """uint8 arrays of (H, W, C) per step are camera frames."""
    return np.dtype(dtype) == np.uint8 and len(shape) == 3


def _time_chunk(shape: tuple[int, ...], dtype: np.dtype, target_bytes: int | None = None) -> int:
    if target_bytes is None:
        target_bytes = IMAGE_CHUNK_BYTES if is_image_spec(shape, dtype) else LOWDIM_CHUNK_BYTES
    step_bytes = max(1, int(np.prod(shape, dtype=np.int64)) * dtype.itemsize)
    return int(max(1, min(4096, target_bytes // step_bytes)))


class ReplayBuffer:
    """A zarr demonstration store; open with :meth:`open` or :meth:`create`."""

    def __init__(self, root: zarr.Group, path: Path, writable: bool):
        self.root = root
        self.path = path
        self.writable = writable
        self._check_layout()
        attrs = dict(root.attrs)
        if ATTRS_KEY in attrs:
            self.meta = DatasetMeta.from_json(attrs[ATTRS_KEY])
        else:
            self.meta = self._infer_meta()
        self._episode_ends = self._committed_ends(np.asarray(root["meta/episode_ends"][:], dtype=np.int64))
        self._validate_ends()

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, path: str | Path, mode: str = "r") -> "ReplayBuffer":
        path = Path(path)
        if not path.exists():
            raise UserError(f"dataset not found: {path}")
        if not path.is_dir():
            raise UserError(f"dataset path is not a zarr directory: {path}")
        try:
            root = zarr.open_group(str(path), mode="r" if mode == "r" else "r+")
        except Exception as exc:  # zarr raises several types for non-stores
            raise UserError(f"not a readable zarr store: {path} ({type(exc).__name__}: {exc})") from None
        return cls(root, path, writable=mode != "r")

    @classmethod
    def create(
        cls, path: str | Path, meta: DatasetMeta, overwrite: bool = False, chunk_rows: Mapping[str, int] | None = None
    ) -> "ReplayBuffer":
        """A new empty store; ``chunk_rows`` overrides the time chunk of chosen keys."""
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
        root = zarr.open_group(str(path), mode="w")
        data = root.create_group("data")
        for key, spec in meta.specs.items():
            dtype = np.dtype(spec.dtype)
            data.create_array(
                key,
                shape=(0, *spec.shape),
                chunks=(int(chunk_rows.get(key) or _time_chunk(spec.shape, dtype)), *spec.shape),
                dtype=dtype,
                compressors=_compressor_for(spec.shape, dtype),
                fill_value=0,
            )
        m = root.create_group("meta")
        m.create_array("episode_task", shape=(0,), chunks=(4096,), dtype=np.int32, fill_value=0)
        m.create_array("episode_success", shape=(0,), chunks=(4096,), dtype=bool, fill_value=False)
        m.create_array("episode_seed", shape=(0,), chunks=(4096,), dtype=np.int64, fill_value=-1)
        m.create_array("episode_source", shape=(0,), chunks=(4096,), dtype=np.int32, fill_value=0)
        m.create_array("episode_ends", shape=(0,), chunks=(4096,), dtype=np.int64, fill_value=0)
        root.attrs[ATTRS_KEY] = meta.to_json()
        return cls(root, path, writable=True)

    def _check_layout(self) -> None:
        for group in ("data", "meta"):
            if group not in self.root:
                raise UserError(f"{self.path} is not a replay buffer: no '{group}' group")
        if "episode_ends" not in self.root["meta"]:
            raise UserError(f"{self.path} is not a replay buffer: no 'meta/episode_ends'")

    def _infer_meta(self) -> DatasetMeta:
        """Metadata for a store written by another tool (diffusion_policy)."""
        specs = {}
        for key in self.root["data"].array_keys():
            arr = self.root["data"][key]
            specs[key] = KeySpec(tuple(arr.shape[1:]), str(arr.dtype))
        action_key = "action" if "action" in specs else ""
        return DatasetMeta(
            fps=10.0,
            tasks=[UNKNOWN_TASK],
            obs_keys=sorted(k for k in specs if k != action_key),
            action_key=action_key,
            source="zarr store without mixpolicy metadata",
            specs=specs,
        )

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
        from tqdm.auto import tqdm

        from mixpolicy.datasets.normalizer import RunningStats

        keys = list(keys or self.keys)
        rows = self.row_mask(episode_mask)
        selected = np.flatnonzero(rows)
        if len(selected) == 0:
            raise UserError(f"{self.path}: no steps selected to compute statistics from")
        rng = np.random.default_rng(seed)
        out = {}
        for key in keys:
            arr = self.array(key)
            running = RunningStats(seed=seed)
            if is_image_spec(tuple(arr.shape[1:]), arr.dtype):
                pick = np.sort(rng.choice(selected, size=min(max_image_frames, len(selected)), replace=False))
                blocks = [pick[i : i + 256] for i in range(0, len(pick), 256)]
                for block in tqdm(blocks, desc=f"stats {key}", disable=not progress, leave=False):
                    running.update(arr.get_orthogonal_selection((block,)), key)
            else:
                step = int(arr.chunks[0]) * max(1, (1 << 22) // max(1, int(arr.chunks[0]) * int(np.prod(arr.shape[1:], dtype=np.int64)) * arr.dtype.itemsize))
                for lo in tqdm(range(0, self.n_steps, step), desc=f"stats {key}", disable=not progress, leave=False):
                    hi = min(self.n_steps, lo + step)
                    keep = rows[lo:hi]
                    if keep.any():
                        block = np.asarray(arr[lo:hi])
                        running.update(block[keep].reshape(int(keep.sum()), -1), key)
            out[key] = running.result()
        return out

    def save_stats(self, stats: Mapping[str, Mapping[str, np.ndarray]]) -> None:
        """Store statistics in the store's attributes (merged with those already there)."""
        from mixpolicy.datasets.normalizer import stats_to_json

        if not self.writable:
            raise UserError(f"{self.path} is opened read-only")
        saved = dict(dict(self.root.attrs).get(STATS_KEY) or {})
        saved.update(stats_to_json(stats))
        self.root.attrs[STATS_KEY] = saved

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
        """
        if not self.writable:
            raise UserError(f"{self.path} is opened read-only")
        missing = set(self.meta.specs) - set(data)
        extra = set(data) - set(self.meta.specs)
        if missing or extra:
            raise UserError(
                f"episode keys do not match the dataset: missing {sorted(missing)}, unexpected {sorted(extra)}"
            )
        lengths = {k: len(v) for k, v in data.items()}
        length = next(iter(lengths.values()))
        if length == 0 or any(n != length for n in lengths.values()):
            raise UserError(f"episode keys must have one non-zero length, got {lengths}")
        for key, value in data.items():
            spec = self.meta.specs[key]
            value = np.asarray(value)
            if tuple(value.shape[1:]) != spec.shape:
                raise UserError(f"key {key!r}: step shape {value.shape[1:]} != dataset's {spec.shape}")
            if np.issubdtype(value.dtype, np.floating) and not np.all(np.isfinite(value)):
                raise UserError(f"key {key!r}: episode contains NaN or inf")
            if not np.can_cast(value.dtype, np.dtype(spec.dtype), casting="same_kind"):
                raise UserError(f"key {key!r}: dtype {value.dtype} cannot be stored as the dataset's {spec.dtype}")

        start = self.n_steps
        end = start + length
        for key, value in data.items():
            arr = self.root["data"][key]
            if arr.shape[0] < end:
                arr.resize((end, *arr.shape[1:]))
            arr[start:end] = np.asarray(value, dtype=arr.dtype)

        source = self.meta.source if source is None else str(source)
        if task not in self.meta.tasks or source not in self.meta.sources:
            if task not in self.meta.tasks:
                self.meta.tasks.append(task)
            if source not in self.meta.sources:
                self.meta.sources.append(source)
            self.root.attrs[ATTRS_KEY] = self.meta.to_json()
        e = self.n_episodes
        per_episode = {
            "episode_task": self.meta.tasks.index(task),
            "episode_success": bool(success),
            "episode_seed": int(seed),
            "episode_source": self.meta.sources.index(source),
        }
        for name, value in per_episode.items():
            if name not in self.root["meta"]:
                continue
            arr = self.root["meta"][name]
            if arr.shape[0] < e + 1:
                arr.resize((e + 1,))
            arr[e] = value
        ends = self.root["meta/episode_ends"]
        ends.resize((e + 1,))  # the commit point: readers see the episode after this write
        ends[e] = end
        self._episode_ends = np.append(self._episode_ends, np.int64(end))
        return e

    def update_meta(self, **changes: Any) -> None:
        for k, v in changes.items():
            if not hasattr(self.meta, k):
                raise UserError(f"unknown dataset meta field {k!r}")
            setattr(self.meta, k, v)
        self.root.attrs[ATTRS_KEY] = self.meta.to_json()

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
