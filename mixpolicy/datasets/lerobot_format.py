"""Import and export LeRobotDataset v3.0 folders with pyarrow (lerobot itself is not needed);
v2.1 folders import too (:mod:`~mixpolicy.datasets.lerobot_v21`, the same features and checks).

A v3.0 dataset::

    meta/info.json                               codebase_version "v3.0", fps, features, paths
    meta/stats.json                              per-feature min/max/mean/std/count/q01..q99
    meta/tasks.parquet                           task string (pandas index) -> task_index
    meta/episodes/chunk-XXX/file-YYY.parquet     one row per episode: length, tasks, row range,
                                                 data file, video files and timestamps
    data/chunk-XXX/file-YYY.parquet              one row per frame: features, timestamp,
                                                 frame_index, episode_index, index, task_index
    videos/<key>/chunk-XXX/file-YYY.mp4          episodes of a camera concatenated in time

Image features are PNG bytes in a ``struct<bytes, path>`` column (HF datasets' Image);
video features are mp4 files (decoded and encoded with PyAV).

Key names: ``observation.state`` <-> ``state``, ``observation.images.<cam>`` <-> ``image_<cam>``,
``observation.<x>`` <-> ``<x>``, ``action`` <-> ``action``; the original names are kept in the
store's metadata so an exported dataset uses them again. Needs the ``interop`` extra
(pyarrow, av).

Import treats the folder as untrusted (see :mod:`~mixpolicy.datasets.lerobot_common`): path
templates and feature names are checked, image cells must be PNGs of the declared size,
videos are read as mp4 only, and memory stays bounded: a data file is read one row group
at a time (only the groups holding the current episode), a video is decoded as a stream
(only the current episode's frames are held), and an episode larger than
``max_episode_bytes`` is refused.
"""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from mixpolicy.datasets.lerobot_common import (  # noqa: F401  (to_lerobot_name: part of this module's API)
    BOOKKEEPING,
    CODEBASE_VERSION,
    READ_VERSIONS,
    V21,
    check_index,
    check_name,
    check_template,
    imported_meta,
    require,
    resolve_inside,
    to_lerobot_name,
    to_store_key,
)
from mixpolicy.datasets.lerobot_export import export_lerobot  # noqa: F401  (re-exported)
from mixpolicy.datasets.replay_buffer import KeySpec, ReplayBuffer
from mixpolicy.datasets.resize import resize_frame, resized_specs
from mixpolicy.errors import UserError
from mixpolicy.utils import staged_output

MAX_EPISODE_BYTES = 4 << 30
MAX_INFO_BYTES = 16 << 20


# ---------------------------------------------------------------------- reading
def read_info(src: Path) -> dict:
    info_file = src / "meta" / "info.json"
    if not info_file.is_file():
        raise UserError(f"not a LeRobot dataset: {src} has no meta/info.json")
    if info_file.stat().st_size > MAX_INFO_BYTES:
        raise UserError(f"{info_file} is over {MAX_INFO_BYTES >> 20} MiB; not a LeRobot info file")
    try:
        info = json.loads(info_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{info_file} is not valid JSON ({exc})") from None
    if not isinstance(info, dict):
        raise UserError(f"{info_file} does not hold a JSON object")
    version = info.get("codebase_version")
    if version not in READ_VERSIONS:
        raise UserError(
            f"unsupported LeRobot dataset version {version!r} in {info_file}: mixpolicy reads {', '.join(READ_VERSIONS)} "
            "(convert other versions with lerobot's conversion scripts first)"
        )
    for field in ("fps", "features", "data_path"):
        if field not in info:
            raise UserError(f"{info_file} lacks {field!r}")
    if not isinstance(info["features"], dict):
        raise UserError(f"{info_file}: 'features' must be an object")
    check_template(info["data_path"], "data_path", src, version)
    if info.get("video_path") is not None:
        check_template(info["video_path"], "video_path", src, version)
    for name in info["features"]:
        check_name(name, f"{info_file}: feature name")
    return info


def _read_tasks(src: Path) -> dict[int, str]:
    pq = require("pyarrow.parquet")
    path = src / "meta" / "tasks.parquet"
    if not path.is_file():
        raise UserError(f"LeRobot dataset {src} has no meta/tasks.parquet")
    table = pq.read_table(path)
    names = [n for n in ("task", "__index_level_0__") if n in table.column_names]
    if "task_index" not in table.column_names or not names:
        raise UserError(f"{path} needs a task_index column and the task strings")
    return dict(zip(table["task_index"].to_pylist(), table[names[0]].to_pylist()))


def _read_episodes(src: Path) -> list[dict]:
    pq = require("pyarrow.parquet")
    files = sorted((src / "meta" / "episodes").glob("chunk-*/file-*.parquet"))
    if not files:
        raise UserError(f"LeRobot dataset {src} has no meta/episodes/chunk-*/file-*.parquet")
    rows = []
    for f in files:
        pf = pq.ParquetFile(f)
        keep = [c for c in pf.schema_arrow.names if not c.startswith("stats/")]
        for i in range(pf.num_row_groups):
            rows.extend(pf.read_row_group(i, columns=keep).to_pylist())
    rows.sort(key=lambda r: r["episode_index"])
    return rows


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _decode_png(value: Any, shape: tuple[int, ...]) -> np.ndarray:
    from PIL import Image

    raw = value["bytes"] if isinstance(value, dict) else value
    if raw is None:
        raise UserError("an image cell holds no bytes (images stored as external paths are not supported)")
    if raw[:8] != PNG_SIGNATURE or raw[12:16] != b"IHDR":
        raise UserError("an image cell is not a PNG (only PNG frames are imported)")
    w, h = struct.unpack(">II", raw[16:24])  # the size, from the header, before anything is decoded
    if (h, w) != tuple(shape[:2]):
        raise UserError(f"an image cell is {w}x{h} pixels, its feature says {shape[1]}x{shape[0]}")
    try:
        image = Image.open(io.BytesIO(raw), formats=["PNG"])
        return np.asarray(image.convert("RGB"))
    except OSError as exc:
        raise UserError(f"an image cell is a damaged PNG ({exc})") from None


class _VideoReader:
    """Frames of one mp4 file by timestamp, decoded as a stream: only the clip asked for is held."""

    def __init__(self, path: Path, shape: tuple[int, ...], resize: tuple[int, int] | None = None):
        self.av = require("av")
        if not path.is_file():
            raise UserError(f"missing video file {path}")
        self.path, self.shape, self.resize = path, shape, resize
        self._open()

    def _open(self) -> None:
        try:
            self.container = self.av.open(str(self.path), format="mp4")
            stream = self.container.streams.video[0]
        except (self.av.error.FFmpegError, IndexError) as exc:
            raise UserError(f"{self.path} is not an mp4 video ({exc})") from None
        h, w = self.shape[:2]
        size = (stream.codec_context.height, stream.codec_context.width)
        # h264 yuv420p needs even sizes: a writer pads odd ones by one row / column.
        if size not in ((h, w), (h + h % 2, w + w % 2)):
            raise UserError(f"{self.path}: frames are {size[1]}x{size[0]}, the feature says {w}x{h}")
        self.frames = ((float(f.pts * stream.time_base), f) for f in self.container.decode(stream))
        self.current = next(self.frames, None)
        self.previous_time = -np.inf

    def clip(self, start: float, n: int, fps: float) -> np.ndarray:
        wanted = start + np.arange(n) / fps - 0.5 / fps
        if self.previous_time >= wanted[0]:  # an earlier clip than the last one: decode again from the start
            self.container.close()
            self._open()
        out = []
        for t in wanted:  # the first frame at or after each wanted time, as np.searchsorted
            while self.current is not None and self.current[0] < t:
                self.previous_time = self.current[0]
                self.current = next(self.frames, None)
            if self.current is None:
                raise UserError(f"video {self.path} ends before timestamp {t + 0.5 / fps:.3f} s")
            out.append(resize_frame(self.current[1].to_ndarray(format="rgb24")[: self.shape[0], : self.shape[1]], self.resize))
        return np.stack(out)

    def close(self) -> None:
        self.container.close()


class _DataFile:
    """One data parquet file, read a row group at a time (only the groups holding an episode)."""

    def __init__(self, path: Path):
        pq = require("pyarrow.parquet")
        if not path.is_file():
            raise UserError(f"missing data file {path}")
        try:
            self.file = pq.ParquetFile(path)
            groups = range(self.file.num_row_groups)
            self.episode = np.concatenate(
                [np.zeros(0, np.int64)] + [self.file.read_row_group(i, columns=["episode_index"])["episode_index"].to_numpy() for i in groups]
            )
        except Exception as exc:  # pyarrow raises several types for damaged files
            raise UserError(f"{path} is not a readable LeRobot data file ({type(exc).__name__}: {exc})") from None
        sizes = [self.file.metadata.row_group(i).num_rows for i in groups]
        self.group_start = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

    def episode_rows(self, episode: int, columns: list[str]):
        pa = require("pyarrow")
        rows = np.flatnonzero(self.episode == episode)
        if len(rows) == 0:
            return None, rows
        groups = np.unique(np.searchsorted(self.group_start, rows, side="right") - 1)
        table = pa.concat_tables([self.file.read_row_group(int(g), columns=columns) for g in groups])
        read = np.concatenate([np.arange(self.group_start[g], self.group_start[g + 1]) for g in groups])
        local = np.searchsorted(read, rows)  # rows within the groups read
        return table.take(local), rows


def _step_bytes(spec: KeySpec) -> int:
    return int(np.prod(spec.shape, dtype=np.int64)) * np.dtype(spec.dtype).itemsize


def feature_specs(info: dict, src: Path) -> tuple[dict[str, KeySpec], dict[str, str]]:
    """Store key -> KeySpec and store key -> original LeRobot name, for the non-bookkeeping features."""
    features = info["features"]
    names = [n for n in features if n not in BOOKKEEPING]
    if "action" not in names:
        raise UserError(f"LeRobot dataset {src} has no 'action' feature")
    specs, original = {}, {}
    for name in names:
        f = features[name]
        key = to_store_key(name)
        if key in specs:
            raise UserError(f"features {original[key]!r} and {name!r} both map to store key {key!r}")
        original[key] = name
        try:
            shape = tuple(int(s) for s in f["shape"])
        except (KeyError, TypeError, ValueError):
            raise UserError(f"feature {name!r} has no valid 'shape'") from None
        if any(s < 1 for s in shape):
            raise UserError(f"feature {name!r} has shape {list(shape)}; every size must be >= 1")
        if f["dtype"] in ("image", "video"):
            if len(shape) != 3 or shape[2] != 3:
                raise UserError(f"feature {name!r}: {f['dtype']} shape {list(shape)} is not (height, width, 3)")
            specs[key] = KeySpec(shape, "uint8")
        else:
            dtype = "float32" if f["dtype"].startswith("float") or f["dtype"] == "bool" else f["dtype"]
            try:
                numeric = np.issubdtype(np.dtype(dtype), np.number)
            except TypeError:
                numeric = False
            if not numeric:
                raise UserError(f"feature {name!r} has dtype {f['dtype']!r}, which mixpolicy cannot import (numbers, images, videos)")
            specs[key] = KeySpec(shape, dtype)
    if any(features[n]["dtype"] == "video" for n in names) and info.get("video_path") is None:
        raise UserError(f"{src / 'meta' / 'info.json'} has video features but no video_path")
    return specs, original


def episode_arrays(
    part, features: dict, specs: dict[str, KeySpec], original: dict[str, str], e: int, length: int, video, resize: tuple[int, int] | None = None
) -> dict[str, np.ndarray]:  # fmt: skip
    """One episode's arrays from its parquet rows ``part``; ``video(name, key)`` decodes a video
    feature; PNG frames are resized to ``resize`` one at a time (videos: by ``video``)."""
    data = {}
    for key, name in original.items():
        kind = features[name]["dtype"]
        if kind == "image":
            data[key] = np.stack([resize_frame(_decode_png(v, specs[key].shape), resize) for v in part[name].to_pylist()])
        elif kind == "video":
            data[key] = video(name, key)
        else:
            values = np.asarray(part[name].to_pylist(), dtype=np.dtype(specs[key].dtype))
            if values.size != length * int(np.prod(specs[key].shape)):
                raise UserError(f"episode {e}: feature {name!r} has {values.size} values for {length} frames of shape {list(specs[key].shape)}")
            data[key] = values.reshape((length, *specs[key].shape))
    return data


def import_lerobot(
    src: str | Path,
    dst: str | Path,
    overwrite: bool = False,
    progress: bool = True,
    max_episode_bytes: int = MAX_EPISODE_BYTES,
    resize: tuple[int, int] | None = None,
) -> ReplayBuffer:
    """Convert a LeRobotDataset v3.0 (or v2.1, :mod:`~mixpolicy.datasets.lerobot_v21`) folder into a
    mixpolicy zarr store at ``dst``; camera frames are resized to ``resize`` (H, W) as they are
    decoded (:mod:`~mixpolicy.datasets.resize`), so no full-size copy is written or held."""
    require("pyarrow.parquet")
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise UserError(f"LeRobot dataset not found: {src}")
    info = read_info(src)
    fps = float(info["fps"])
    features = info["features"]
    specs, original = feature_specs(info, src)
    if info["codebase_version"] == V21:
        from mixpolicy.datasets.lerobot_v21 import import_v21

        return import_v21(src, dst, info, specs, original, overwrite, progress, max_episode_bytes, episode_arrays, resize)
    names = list(original.values())
    tasks = _read_tasks(src)
    episodes = _read_episodes(src)
    meta = imported_meta(info, resized_specs(specs, resize), original, CODEBASE_VERSION, src, resize)
    if dst.exists() and not overwrite:
        raise UserError(f"output {dst} already exists (pass overwrite=true to replace it)")
    columns = [n for n in names if features[n]["dtype"] != "video"] + ["frame_index", "task_index", "episode_index"]
    step_bytes = sum(_step_bytes(s) for s in meta.specs.values())  # what one episode holds in memory
    videos: dict[str, tuple[Path, _VideoReader]] = {}
    data_file: tuple[Path, _DataFile] | None = None
    with staged_output(dst) as tmp:
        buffer = ReplayBuffer.create(tmp, meta, overwrite=True)
        for ep in tqdm(episodes, desc="import lerobot", unit="ep", disable=not progress):
            e = check_index(ep.get("episode_index"), "episode_index")
            length = check_index(ep.get("length"), f"episode {e}: length")
            if length * step_bytes > max_episode_bytes:
                raise UserError(f"episode {e}: {length} frames of {step_bytes} bytes exceed max_episode_bytes={max_episode_bytes}")
            fields = {k: check_index(ep.get(f"data/{k}"), f"episode {e}: data/{k}") for k in ("chunk_index", "file_index")}
            path = resolve_inside(src, info["data_path"], **fields)
            if data_file is None or data_file[0] != path:
                data_file = (path, _DataFile(path))  # episodes come file by file: one data file at a time
            absent = [c for c in columns[:-3] if c not in data_file[1].file.schema_arrow.names]
            if absent:
                raise UserError(f"{path} lacks the column(s) {absent} of its features")
            part, rows = data_file[1].episode_rows(e, [c for c in columns if c in data_file[1].file.schema_arrow.names])
            if len(rows) != length:
                raise UserError(f"episode {e}: meta says {length} frames, data file has {len(rows)}")
            if "frame_index" in part.column_names:
                order = np.argsort(np.asarray(part["frame_index"].to_numpy()), kind="stable")
                part = part.take(order)

            def clip(name: str, key: str) -> np.ndarray:
                vfields = {k: check_index(ep.get(f"videos/{name}/{k}"), f"episode {e}: videos/{name}/{k}") for k in ("chunk_index", "file_index")}
                vpath = resolve_inside(src, info["video_path"], video_key=name, **vfields)
                if name not in videos or videos[name][0] != vpath:
                    if name in videos:
                        videos[name][1].close()
                    videos[name] = (vpath, _VideoReader(vpath, specs[key].shape, resize))
                return videos[name][1].clip(float(ep[f"videos/{name}/from_timestamp"]), length, fps)

            data = episode_arrays(part, features, specs, original, e, length, clip, resize)
            task_ids = part["task_index"].to_pylist() if "task_index" in part.column_names else []
            task = tasks.get(int(task_ids[0]), "unknown") if task_ids else (ep.get("tasks") or ["unknown"])[0]
            buffer.add_episode(data, task=task, success=True, seed=-1)
        for _, reader in videos.values():
            reader.close()
        buffer.close()
    return ReplayBuffer.open(dst)
