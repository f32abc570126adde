"""Import LeRobotDataset v2.1 folders, the layout before v3.0 (lerobot itself is not needed)::

    meta/info.json              codebase_version "v2.1", fps, features, chunks_size,
                                data_path, video_path
    meta/episodes.jsonl         one line per episode: episode_index, tasks, length
    meta/tasks.jsonl            one line per task: task_index, task
    meta/episodes_stats.jsonl   per-episode statistics (not read: mixpolicy computes its own)
    data/chunk-XXX/episode_XXXXXX.parquet            one file per episode, one row per frame
    videos/chunk-XXX/<video_key>/episode_XXXXXX.mp4  one file per episode and camera

An episode's chunk is ``episode_index // chunks_size``. Features, key names and checks are
v3.0's (:mod:`~mixpolicy.datasets.lerobot_format`): the fps and the original feature
names are kept in the store's metadata. Each video is decoded as a stream into the
current episode's frames only, and must hold exactly as many frames as the episode's
parquet file has rows.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from mixpolicy.datasets.lerobot_common import CHUNKS_SIZE, V21, check_index, imported_meta, require, resolve_inside
from mixpolicy.datasets.replay_buffer import KeySpec, ReplayBuffer
from mixpolicy.datasets.resize import resize_frame, resized_specs
from mixpolicy.errors import UserError
from mixpolicy.utils import staged_output

MAX_JSONL_BYTES = 256 << 20


def read_jsonl(src: Path, name: str) -> list[dict]:
    """The objects of ``meta/<name>``, one JSON object a line."""
    path = src / "meta" / name
    if not path.is_file():
        raise UserError(f"LeRobot {V21} dataset {src} has no meta/{name}")
    if path.stat().st_size > MAX_JSONL_BYTES:
        raise UserError(f"{path} is over {MAX_JSONL_BYTES >> 20} MiB; not a LeRobot metadata file")
    rows = []
    with path.open(encoding="utf-8", errors="strict") as f:
        try:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise UserError(f"{path} line {i} is not valid JSON ({exc})") from None
                if not isinstance(row, dict):
                    raise UserError(f"{path} line {i} does not hold a JSON object")
                rows.append(row)
        except UnicodeDecodeError as exc:
            raise UserError(f"{path} is not UTF-8 text ({exc})") from None
    return rows


def decode_episode_video(path: Path, shape: tuple[int, ...], length: int, resize: tuple[int, int] | None = None) -> np.ndarray:
    """Every frame of one episode's mp4 as (length, H, W, 3) uint8, each resized to ``resize``
    (H, W) as it is decoded when given; its frame count must be ``length``."""
    av = require("av")
    if not path.is_file():
        raise UserError(f"missing video file {path}")
    try:
        container = av.open(str(path), format="mp4")
        stream = container.streams.video[0]
    except (av.error.FFmpegError, IndexError) as exc:
        raise UserError(f"{path} is not an mp4 video ({exc})") from None
    h, w = shape[:2]
    try:
        size = (stream.codec_context.height, stream.codec_context.width)
        if size not in ((h, w), (h + h % 2, w + w % 2)):  # h264 yuv420p pads odd sizes by one
            raise UserError(f"{path}: frames are {size[1]}x{size[0]}, the feature says {w}x{h}")
        out = np.empty((length, *(resize or (h, w)), 3), np.uint8)
        n = 0
        for frame in container.decode(stream):
            if n < length:
                out[n] = resize_frame(frame.to_ndarray(format="rgb24")[:h, :w], resize)
            n += 1  # frames past the end are counted, not kept
    except av.error.FFmpegError as exc:
        raise UserError(f"{path} is a damaged video ({exc})") from None
    finally:
        container.close()
    if n != length:
        raise UserError(f"{path} has {n} frames, its episode's parquet file has {length} rows")
    return out


def _read_episode_table(path: Path, columns: list[str], e: int):
    pq = require("pyarrow.parquet")
    if not path.is_file():
        raise UserError(f"missing data file {path} (episode {e})")
    try:
        file = pq.ParquetFile(path)
        present = file.schema_arrow.names
        absent = [c for c in columns[:-3] if c not in present]
        if absent:
            raise UserError(f"{path} lacks the column(s) {absent} of its features")
        table = file.read(columns=[c for c in columns if c in present])
    except UserError:
        raise
    except Exception as exc:  # pyarrow raises several types for damaged files
        raise UserError(f"{path} is not a readable LeRobot data file ({type(exc).__name__}: {exc})") from None
    if "episode_index" in table.column_names and set(table["episode_index"].to_pylist()) - {e}:
        raise UserError(f"{path} holds rows of another episode than {e}")
    if "frame_index" in table.column_names:
        table = table.take(np.argsort(np.asarray(table["frame_index"].to_numpy()), kind="stable"))
    return table


def import_v21(
    src: Path, dst: Path, info: dict, specs: dict[str, KeySpec], original: dict[str, str], overwrite: bool, progress: bool, max_episode_bytes: int,
    episode_arrays, resize: tuple[int, int] | None = None,
) -> ReplayBuffer:  # fmt: skip
    """A v2.1 folder (``info`` read and its feature ``specs`` checked) into a store at ``dst``;
    ``episode_arrays`` reads one episode's features as the v3.0 import does (passed in, so
    this module does not import the one that dispatches to it)."""
    features = info["features"]
    chunks_size = check_index(info.get("chunks_size", CHUNKS_SIZE), f"{src / 'meta' / 'info.json'}: chunks_size")
    if chunks_size < 1:
        raise UserError(f"{src / 'meta' / 'info.json'}: chunks_size must be >= 1")
    tasks = {check_index(t.get("task_index"), "tasks.jsonl: task_index"): str(t.get("task", "unknown")) for t in read_jsonl(src, "tasks.jsonl")}
    episodes = read_jsonl(src, "episodes.jsonl")
    for ep in episodes:
        check_index(ep.get("episode_index"), "episodes.jsonl: episode_index")
    episodes.sort(key=lambda ep: ep["episode_index"])
    meta = imported_meta(info, resized_specs(specs, resize), original, V21, src, resize)
    if dst.exists() and not overwrite:
        raise UserError(f"output {dst} already exists (pass overwrite=true to replace it)")
    names = list(original.values())
    columns = [n for n in names if features[n]["dtype"] != "video"] + ["frame_index", "task_index", "episode_index"]
    step_bytes = sum(int(np.prod(s.shape, dtype=np.int64)) * np.dtype(s.dtype).itemsize for s in meta.specs.values())
    with staged_output(dst) as tmp:
        buffer = ReplayBuffer.create(tmp, meta, overwrite=True)
        for ep in tqdm(episodes, desc="import lerobot v2.1", unit="ep", disable=not progress):
            e = ep["episode_index"]
            length = check_index(ep.get("length"), f"episode {e}: length")
            if length * step_bytes > max_episode_bytes:
                raise UserError(f"episode {e}: {length} frames of {step_bytes} bytes exceed max_episode_bytes={max_episode_bytes}")
            where = {"episode_chunk": e // chunks_size, "episode_index": e}
            path = resolve_inside(src, info["data_path"], **where)
            table = _read_episode_table(path, columns, e)
            if table.num_rows != length:
                raise UserError(f"episode {e}: meta/episodes.jsonl says {length} frames, {path} has {table.num_rows} rows")

            def video(name: str, key: str) -> np.ndarray:
                return decode_episode_video(resolve_inside(src, info["video_path"], video_key=name, **where), specs[key].shape, length, resize)

            data = episode_arrays(table, features, specs, original, e, length, video, resize)
            task_ids = table["task_index"].to_pylist()[:1] if "task_index" in table.column_names else []
            task = tasks.get(int(task_ids[0]), "unknown") if task_ids else str((ep.get("tasks") or ["unknown"])[0])
            buffer.add_episode(data, task=task, success=True, seed=-1)
        buffer.close()
    return ReplayBuffer.open(dst)
