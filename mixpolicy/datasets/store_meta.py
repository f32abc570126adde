"""What a store records besides its arrays: key specs, dataset metadata, chunk layout."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Mapping

import numpy as np
from zarr.codecs import BloscCodec

from mixpolicy.errors import UserError

FORMAT_VERSION = 1
ATTRS_KEY = "mixpolicy"
STATS_KEY = "mixpolicy_stats"
# {"every_chunk_written": true}: every chunk of the committed rows has a file (zarr skips
# chunks equal to the fill value unless told otherwise), so a missing file is damage
LAYOUT_KEY = "mixpolicy_layout"
IMAGE_CHUNK_BYTES = 128 << 10
LOWDIM_CHUNK_BYTES = 1 << 20
UNKNOWN_TASK = "unknown"
PER_EPISODE_ARRAYS = ("episode_task", "episode_success", "episode_seed", "episode_source")


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


def infer_meta(root) -> DatasetMeta:
    """Metadata for a store written by another tool (diffusion_policy)."""
    specs = {}
    for key in root["data"].array_keys():
        arr = root["data"][key]
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


def compressor_for(shape: tuple[int, ...], dtype: np.dtype):
    # zstd level 3 keeps writes fast. Bit-shuffle helps float data; on rendered uint8 camera
    # frames it hurt both ratio (6.5x vs 8.4x) and random reads (1.8x slower), measured by
    # benchmarks/bench_data.py, so images go unshuffled.
    shuffle = "noshuffle" if is_image_spec(shape, dtype) else "bitshuffle"
    return BloscCodec(cname="zstd", clevel=3, shuffle=shuffle, typesize=dtype.itemsize)


def is_image_spec(shape: tuple[int, ...], dtype: np.dtype | str) -> bool:
    """uint8 arrays of (H, W, C) per step are camera frames."""
    return np.dtype(dtype) == np.uint8 and len(shape) == 3


def time_chunk(shape: tuple[int, ...], dtype: np.dtype, target_bytes: int | None = None) -> int:
    if target_bytes is None:
        target_bytes = IMAGE_CHUNK_BYTES if is_image_spec(shape, dtype) else LOWDIM_CHUNK_BYTES
    step_bytes = max(1, int(np.prod(shape, dtype=np.int64)) * dtype.itemsize)
    return int(max(1, min(4096, target_bytes // step_bytes)))
