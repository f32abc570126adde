"""LeRobot export: a store's episodes as a LeRobotDataset v3.0 folder (see lerobot_format)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from mixpolicy.datasets.lerobot_common import (
    CHUNKS_SIZE,
    CODEBASE_VERSION,
    DATA_FILE_MB,
    DATA_PATH,
    EPISODES_PATH,
    VIDEO_PATH,
    check_name,
    require,
    to_lerobot_name,
)
from mixpolicy.datasets.replay_buffer import KeySpec, ReplayBuffer, is_image_spec
from mixpolicy.video import VideoWriter
from mixpolicy.errors import UserError
from mixpolicy.utils import staged_output


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
    pa = require("pyarrow")
    pq = require("pyarrow.parquet")
    if use_videos:
        require("av")
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise UserError(f"output {dst} already exists (pass overwrite=true to replace it)")
    meta = buffer.meta
    keys = buffer.keys
    # names come from the store's attributes and become file and folder names: plain only
    names = {k: check_name(meta.original_keys.get(k) or to_lerobot_name(k), f"{buffer.path}: feature name of key {k!r}") for k in keys}
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
        video_writers: dict[str, VideoWriter] = {}
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
                            path = tmp / VIDEO_PATH.format(video_key=names[k], **_chunk_file(video_file[k]))
                            # near-lossless, every frame a keyframe: random access stays exact to the frame
                            video_writers[k] = VideoWriter(path, fps, options={"crf": "10", "g": "1"})
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

