"""Import and export LeRobotDataset v3.0 folders with pyarrow (lerobot itself is not needed).

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
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from mixpolicy.datasets.replay_buffer import DatasetMeta, KeySpec, ReplayBuffer, is_image_spec
from mixpolicy.errors import UserError
from mixpolicy.utils import staged_output

CODEBASE_VERSION = "v3.0"
CHUNK_FILE = "chunk-{chunk_index:03d}/file-{file_index:03d}"
DATA_PATH = "data/" + CHUNK_FILE + ".parquet"
VIDEO_PATH = "videos/{video_key}/" + CHUNK_FILE + ".mp4"
EPISODES_PATH = "meta/episodes/" + CHUNK_FILE + ".parquet"
BOOKKEEPING = ("timestamp", "frame_index", "episode_index", "index", "task_index")
CHUNKS_SIZE = 1000  # files per chunk folder, as lerobot
DATA_FILE_MB = 100


def _require(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"LeRobot import/export needs {module}: pip install 'mixpolicy[interop]'") from None


def to_store_key(name: str) -> str:
    if name.startswith("observation.images."):
        return "image_" + name[len("observation.images.") :].replace(".", "_")
    if name.startswith("observation."):
        return name[len("observation.") :].replace(".", "_")
    return name.replace(".", "_")


def to_lerobot_name(key: str) -> str:
    if key == "action":
        return "action"
    if key.startswith("image_"):
        return "observation.images." + key[len("image_") :]
    return "observation." + key


# ---------------------------------------------------------------------- reading
def read_info(src: Path) -> dict:
    info_file = src / "meta" / "info.json"
    if not info_file.is_file():
        raise UserError(f"not a LeRobot dataset: {src} has no meta/info.json")
    try:
        info = json.loads(info_file.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{info_file} is not valid JSON ({exc})") from None
    version = info.get("codebase_version")
    if version != CODEBASE_VERSION:
        raise UserError(
            f"unsupported LeRobot dataset version {version!r} in {info_file}: mixpolicy reads {CODEBASE_VERSION} "
            "(convert older datasets with lerobot's convert_dataset_v21_to_v30 first)"
        )
    for field in ("fps", "features", "data_path"):
        if field not in info:
            raise UserError(f"{info_file} lacks {field!r}")
    return info


def _read_tasks(src: Path) -> dict[int, str]:
    pq = _require("pyarrow.parquet")
    path = src / "meta" / "tasks.parquet"
    if not path.is_file():
        raise UserError(f"LeRobot dataset {src} has no meta/tasks.parquet")
    table = pq.read_table(path)
    names = [n for n in ("task", "__index_level_0__") if n in table.column_names]
    if "task_index" not in table.column_names or not names:
        raise UserError(f"{path} needs a task_index column and the task strings")
    return dict(zip(table["task_index"].to_pylist(), table[names[0]].to_pylist()))


def _read_episodes(src: Path) -> list[dict]:
    pq = _require("pyarrow.parquet")
    files = sorted((src / "meta" / "episodes").glob("chunk-*/file-*.parquet"))
    if not files:
        raise UserError(f"LeRobot dataset {src} has no meta/episodes/chunk-*/file-*.parquet")
    rows = []
    for f in files:
        table = pq.read_table(f)
        keep = [c for c in table.column_names if not c.startswith("stats/")]
        rows.extend(table.select(keep).to_pylist())
    rows.sort(key=lambda r: r["episode_index"])
    return rows


def _decode_png(value: Any) -> np.ndarray:
    from PIL import Image

    raw = value["bytes"] if isinstance(value, dict) else value
    if raw is None:
        raise UserError("an image cell holds no bytes (images stored as external paths are not supported)")
    return np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))


class _VideoReader:
    """Frames of one mp4 file by timestamp; decodes each file once, in order."""

    def __init__(self, path: Path):
        av = _require("av")
        if not path.is_file():
            raise UserError(f"missing video file {path}")
        self.frames: list[tuple[float, np.ndarray]] = []
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            for frame in container.decode(stream):
                self.frames.append((float(frame.pts * stream.time_base), frame.to_ndarray(format="rgb24")))
        self.times = np.array([t for t, _ in self.frames])

    def clip(self, start: float, n: int, fps: float) -> np.ndarray:
        wanted = start + np.arange(n) / fps
        idx = np.searchsorted(self.times, wanted - 0.5 / fps)
        if len(self.frames) == 0 or idx.max(initial=0) >= len(self.frames):
            raise UserError(f"video ends before timestamp {wanted[-1]:.3f} s")
        return np.stack([self.frames[i][1] for i in idx])


def import_lerobot(src: str | Path, dst: str | Path, overwrite: bool = False, progress: bool = True) -> ReplayBuffer:
    """Convert a LeRobotDataset v3.0 folder into a mixpolicy zarr store at ``dst``."""
    pq = _require("pyarrow.parquet")
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise UserError(f"LeRobot dataset not found: {src}")
    info = read_info(src)
    fps = float(info["fps"])
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
        if f["dtype"] in ("image", "video"):
            specs[key] = KeySpec(tuple(int(s) for s in f["shape"]), "uint8")
        else:
            dtype = "float32" if f["dtype"].startswith("float") or f["dtype"] == "bool" else f["dtype"]
            try:
                numeric = np.issubdtype(np.dtype(dtype), np.number)
            except TypeError:
                numeric = False
            if not numeric:
                raise UserError(f"feature {name!r} has dtype {f['dtype']!r}, which mixpolicy cannot import (numbers, images, videos)")
            specs[key] = KeySpec(tuple(int(s) for s in f["shape"]), dtype)
    tasks = _read_tasks(src)
    episodes = _read_episodes(src)
    meta = DatasetMeta(
        fps=fps,
        obs_keys=[k for k in specs if k != "action"],
        action_key="action",
        source=f"lerobot {CODEBASE_VERSION}: {src.name}",
        specs=specs,
        original_keys=original,
        robot_type=str(info.get("robot_type") or ""),
    )
    if dst.exists() and not overwrite:
        raise UserError(f"output {dst} already exists (pass overwrite=true to replace it)")
    videos: dict[tuple[str, int, int], _VideoReader] = {}
    data_files: dict[tuple[int, int], Any] = {}
    with staged_output(dst) as tmp:
        buffer = ReplayBuffer.create(tmp, meta, overwrite=True)
        for ep in tqdm(episodes, desc="import lerobot", unit="ep", disable=not progress):
            file_key = (int(ep["data/chunk_index"]), int(ep["data/file_index"]))
            if file_key not in data_files:
                data_files.clear()  # episodes come file by file: hold one data file at a time
                path = src / info["data_path"].format(chunk_index=file_key[0], file_index=file_key[1])
                if not path.is_file():
                    raise UserError(f"missing data file {path}")
                data_files[file_key] = pq.read_table(path)
            table = data_files[file_key]
            ep_col = np.asarray(table["episode_index"].to_numpy())
            rows = np.flatnonzero(ep_col == ep["episode_index"])
            if len(rows) != int(ep["length"]):
                raise UserError(
                    f"episode {ep['episode_index']}: meta says {ep['length']} frames, data file has {len(rows)}"
                )
            part = table.take(rows)
            if "frame_index" in part.column_names:
                order = np.argsort(np.asarray(part["frame_index"].to_numpy()), kind="stable")
                part = part.take(order)
            data = {}
            for key, name in original.items():
                kind = features[name]["dtype"]
                if kind == "image":
                    data[key] = np.stack([_decode_png(v) for v in part[name].to_pylist()])
                elif kind == "video":
                    vkey = (name, int(ep[f"videos/{name}/chunk_index"]), int(ep[f"videos/{name}/file_index"]))
                    if vkey not in videos:
                        videos.clear()
                        videos[vkey] = _VideoReader(
                            src / info["video_path"].format(video_key=name, chunk_index=vkey[1], file_index=vkey[2])
                        )
                    data[key] = videos[vkey].clip(float(ep[f"videos/{name}/from_timestamp"]), len(rows), fps)
                else:
                    values = np.asarray(part[name].to_pylist(), dtype=np.dtype(specs[key].dtype))
                    data[key] = values.reshape((len(rows), *specs[key].shape))
            task_ids = part["task_index"].to_pylist() if "task_index" in part.column_names else []
            task = tasks.get(int(task_ids[0]), "unknown") if task_ids else (ep.get("tasks") or ["unknown"])[0]
            buffer.add_episode(data, task=task, success=True, seed=-1)
    return ReplayBuffer.open(dst)


# ---------------------------------------------------------------------- writing
def _feature(spec: KeySpec, use_videos: bool, fps: float) -> dict:
    if is_image_spec(spec.shape, spec.dtype):
        h, w, c = spec.shape
        f = {"dtype": "video" if use_videos else "image", "shape": [h, w, c], "names": ["height", "width", "channels"]}
        if use_videos:
            f["info"] = {
                "video.height": h,
                "video.width": w,
                "video.codec": "h264",
                "video.pix_fmt": "yuv420p",
                "video.is_depth_map": False,
                "video.fps": fps,
                "video.channels": c,
                "has_audio": False,
            }
        return f
    return {"dtype": spec.dtype, "shape": list(spec.shape), "names": None}


def _hf_feature(f: dict) -> dict:
    """The HF datasets feature JSON lerobot stores in each data file's schema metadata."""
    if f["dtype"] == "image":
        return {"_type": "Image"}
    return {"feature": {"dtype": f["dtype"], "_type": "Value"}, "length": int(np.prod(f["shape"])), "_type": "List"}


def _png(frame: np.ndarray) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(frame).save(out, format="PNG", compress_level=1)
    return out.getvalue()


def _lerobot_stats(stats: dict[str, np.ndarray], image: bool, count: int) -> dict:
    out = {}
    for name in ("min", "max", "mean", "std", "q01", "q99"):
        v = np.asarray(stats[name], np.float64)
        if image:  # lerobot keeps image stats per channel as (C, 1, 1), in [0, 1]
            v = (v / 255.0).reshape(-1, 1, 1)
        out[name] = v.tolist()
    out["count"] = [int(count)]
    return out


class _VideoWriter:
    def __init__(self, path: Path, fps: float, width: int, height: int):
        av = _require("av")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.container = av.open(str(path), mode="w")
        self.stream = self.container.add_stream("libx264", rate=int(round(fps)))
        self.stream.width, self.stream.height = width, height
        self.stream.pix_fmt = "yuv420p"
        # near-lossless, every frame a keyframe: random access stays exact to the frame
        self.stream.options = {"crf": "10", "g": "1"}
        self.av = av

    def write(self, frames: np.ndarray) -> None:
        for f in frames:
            for packet in self.stream.encode(self.av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                self.container.mux(packet)

    def close(self) -> None:
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()


def _chunk_file(i: int) -> dict:
    return {"chunk_index": i // CHUNKS_SIZE, "file_index": i % CHUNKS_SIZE}


def export_lerobot(
    buffer: ReplayBuffer,
    dst: str | Path,
    episode_mask: np.ndarray | None = None,
    use_videos: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    robot_type: str = "",
) -> Path:
    """Write the store's (selected) episodes as a LeRobotDataset v3.0 folder at ``dst``."""
    pa = _require("pyarrow")
    pq = _require("pyarrow.parquet")
    if use_videos:
        _require("av")
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise UserError(f"output {dst} already exists (pass overwrite=true to replace it)")
    meta = buffer.meta
    keys = buffer.keys
    names = {k: meta.original_keys.get(k) or to_lerobot_name(k) for k in keys}
    specs = {k: KeySpec(tuple(buffer.array(k).shape[1:]), str(buffer.array(k).dtype)) for k in keys}
    fps = float(meta.fps)
    features = {names[k]: _feature(specs[k], use_videos, fps) for k in keys}
    image_keys = [k for k in keys if is_image_spec(specs[k].shape, specs[k].dtype)]
    if episode_mask is None:
        episode_mask = np.ones(buffer.n_episodes, bool)
    selected = np.flatnonzero(episode_mask)
    if len(selected) == 0:
        raise UserError(f"{buffer.path}: no episodes to export")
    tasks_of = buffer.episode_tasks
    task_names = list(dict.fromkeys(tasks_of[e] for e in selected))
    task_index = {t: i for i, t in enumerate(task_names)}

    with staged_output(dst) as tmp:
        (tmp / "meta").mkdir(parents=True)
        bookkeeping = {
            "timestamp": {"dtype": "float32", "shape": [1], "names": None},
            "frame_index": {"dtype": "int64", "shape": [1], "names": None},
            "episode_index": {"dtype": "int64", "shape": [1], "names": None},
            "index": {"dtype": "int64", "shape": [1], "names": None},
            "task_index": {"dtype": "int64", "shape": [1], "names": None},
        }
        hf_features = {names[k]: _hf_feature(features[names[k]]) for k in keys if not (use_videos and k in image_keys)}
        hf_features.update({n: {"dtype": f["dtype"], "_type": "Value"} for n, f in bookkeeping.items()})
        schema_meta = {b"huggingface": json.dumps({"info": {"features": hf_features}}).encode()}
        step_bytes = sum(int(np.prod(specs[k].shape)) * np.dtype(specs[k].dtype).itemsize for k in keys)
        frames_per_file = max(1, (DATA_FILE_MB << 20) // max(1, step_bytes // (4 if image_keys else 1)))

        episode_rows: list[dict] = []
        pending: list[Any] = []
        pending_frames = 0
        data_file = 0
        video_file: dict[str, int] = {k: 0 for k in image_keys}
        video_writers: dict[str, _VideoWriter] = {}
        video_time: dict[str, float] = {k: 0.0 for k in image_keys}
        index = 0

        def flush():
            nonlocal pending, pending_frames, data_file
            if pending:
                table = pa.concat_tables(pending).replace_schema_metadata(schema_meta)
                path = tmp / DATA_PATH.format(**_chunk_file(data_file))
                path.parent.mkdir(parents=True, exist_ok=True)
                pq.write_table(table, path)
                data_file += 1
            pending, pending_frames = [], 0

        try:
            for new_index, e in enumerate(tqdm(selected, desc="export lerobot", unit="ep", disable=not progress)):
                ep = buffer.get_episode(int(e))
                n = len(ep[keys[0]])
                if pending_frames and pending_frames + n > frames_per_file:
                    flush()
                columns: dict[str, Any] = {}
                for k in keys:
                    x = ep[k]
                    if k in image_keys and use_videos:
                        if k not in video_writers:
                            h, w, _ = specs[k].shape
                            path = tmp / VIDEO_PATH.format(video_key=names[k], **_chunk_file(video_file[k]))
                            video_writers[k] = _VideoWriter(path, fps, w, h)
                        video_writers[k].write(x)
                        continue
                    if k in image_keys:
                        columns[names[k]] = pa.array([{"bytes": _png(f), "path": None} for f in x], type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
                    else:
                        flat = np.asarray(x).reshape(n, -1)
                        columns[names[k]] = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat.shape[1])
                t = np.arange(n)
                columns["timestamp"] = pa.array((t / fps).astype(np.float32))
                columns["frame_index"] = pa.array(t.astype(np.int64))
                columns["episode_index"] = pa.array(np.full(n, new_index, np.int64))
                columns["index"] = pa.array(index + t.astype(np.int64))
                columns["task_index"] = pa.array(np.full(n, task_index[tasks_of[e]], np.int64))
                pending.append(pa.table(columns))
                row = {
                    "episode_index": new_index,
                    "tasks": [tasks_of[e]],
                    "length": n,
                    "data/chunk_index": _chunk_file(data_file)["chunk_index"],
                    "data/file_index": _chunk_file(data_file)["file_index"],
                    "dataset_from_index": index,
                    "dataset_to_index": index + n,
                }
                for k in image_keys if use_videos else []:
                    row[f"videos/{names[k]}/chunk_index"] = _chunk_file(video_file[k])["chunk_index"]
                    row[f"videos/{names[k]}/file_index"] = _chunk_file(video_file[k])["file_index"]
                    row[f"videos/{names[k]}/from_timestamp"] = video_time[k]
                    video_time[k] += n / fps
                    row[f"videos/{names[k]}/to_timestamp"] = video_time[k]
                row["meta/episodes/chunk_index"] = 0
                row["meta/episodes/file_index"] = 0
                episode_rows.append(row)
                pending_frames += n
                index += n
            flush()
            for w in video_writers.values():
                w.close()

            ep_path = tmp / EPISODES_PATH.format(chunk_index=0, file_index=0)
            ep_path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.Table.from_pylist(episode_rows), ep_path)
            pandas_meta = {
                "index_columns": ["__index_level_0__"],
                "column_indexes": [],
                "columns": [
                    {"name": "task_index", "field_name": "task_index", "pandas_type": "int64", "numpy_type": "int64", "metadata": None},
                    {"name": None, "field_name": "__index_level_0__", "pandas_type": "unicode", "numpy_type": "object", "metadata": None},
                ],
                "pandas_version": "2.2.0",
            }
            tasks_table = pa.table(
                {"task_index": pa.array(range(len(task_names)), pa.int64()), "__index_level_0__": pa.array(task_names, pa.string())}
            ).replace_schema_metadata({b"pandas": json.dumps(pandas_meta).encode()})
            pq.write_table(tasks_table, tmp / "meta" / "tasks.parquet")

            stats = buffer.compute_stats(keys, episode_mask=episode_mask)
            lr_stats = {names[k]: _lerobot_stats(stats[k], k in image_keys, int(stats[k]["count"])) for k in keys}
            (tmp / "meta" / "stats.json").write_text(json.dumps(lr_stats, indent=2))
            info = {
                "codebase_version": CODEBASE_VERSION,
                "robot_type": robot_type or meta.robot_type or None,
                "total_episodes": len(selected),
                "total_frames": index,
                "total_tasks": len(task_names),
                "chunks_size": CHUNKS_SIZE,
                "data_files_size_in_mb": DATA_FILE_MB,
                "video_files_size_in_mb": 200,
                "fps": int(fps) if float(fps).is_integer() else fps,
                "splits": {"train": f"0:{len(selected)}"},
                "data_path": DATA_PATH,
                "video_path": VIDEO_PATH if (use_videos and image_keys) else None,
                "features": {**features, **bookkeeping},
            }
            (tmp / "meta" / "info.json").write_text(json.dumps(info, indent=4))
        except BaseException:
            for w in video_writers.values():
                try:
                    w.close()
                except Exception:
                    pass
            raise
    return dst

