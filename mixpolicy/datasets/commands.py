"""What ``mixpolicy data info | validate | stats | convert | view`` do: configs and functions."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from mixpolicy.config import check
from mixpolicy.datasets.normalizer import MODES, Normalizer
from mixpolicy.datasets.replay_buffer import DatasetMeta, KeySpec, ReplayBuffer, is_image_spec
from mixpolicy.datasets.resize import check_size, resize_frames, resize_note
from mixpolicy.datasets.selection import EpisodeSelection, select_episodes
from mixpolicy.errors import UserError
from mixpolicy.utils import staged_output
from mixpolicy.video import write_video

FORMATS = ("auto", "zarr", "lerobot", "robomimic")
VIEW_SUFFIXES = (".png", ".mp4", ".rrd")


@dataclass
class DataInfoConfig:
    path: str = ""
    episodes: bool = False  # also list every episode (task, success, length, seed, source)
    json: bool = False  # print machine-readable JSON

    def __post_init__(self):
        check(bool(self.path), "path", "a dataset path is required (PATH or path=data/demo.zarr)")


@dataclass
class DataValidateConfig:
    path: str = ""
    progress: bool = True

    def __post_init__(self):
        check(bool(self.path), "path", "a dataset path is required (PATH or path=data/demo.zarr)")


@dataclass
class DataStatsConfig:
    path: str = ""
    keys: list[str] = field(default_factory=list)  # empty: every key
    tasks: list[str] = field(default_factory=list)
    successful_only: bool = False
    max_image_frames: int = 2000  # images are sampled, low-dim keys read in full
    mode: str = "min_max"  # shows the normalization this mode would apply
    write: bool = True  # save into the store's attributes
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        check(bool(self.path), "path", "a dataset path is required (PATH or path=data/demo.zarr)")
        check(self.max_image_frames >= 1, "max_image_frames", "must be >= 1")
        check(self.mode in MODES, "mode", f"must be one of {MODES}")


@dataclass
class DataConvertConfig:
    src: str = ""
    out: str = ""
    src_format: str = "auto"  # auto | zarr | lerobot | robomimic
    out_format: str = "zarr"  # zarr | lerobot
    use_videos: bool = False  # lerobot export: cameras as mp4 instead of PNG frames
    obs_keys: list[str] = field(default_factory=list)  # robomimic: obs keys to import (empty: all)
    filter_key: str = ""  # robomimic: a mask/<filter_key> subset such as train or valid
    tasks: list[str] = field(default_factory=list)  # export only these tasks
    successful_only: bool = False
    max_episodes: int = 0
    image_chunk_frames: int = 0  # zarr output: frames per image chunk (0: about 128 KiB)
    resize: list[int] = field(default_factory=list)  # zarr output: camera frames to [height, width] (scale to cover, centre crop)
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self):
        check_size(self.resize, "resize")
        check(not self.resize or self.out_format == "zarr", "resize", "applies to zarr output (out_format=zarr)")
        check(bool(self.src), "src", "a source dataset is required (SRC or src=...)")
        check(bool(self.out), "out", "an output path is required (OUT or out=...)")
        check(self.src_format in FORMATS, "src_format", f"must be one of {FORMATS}")
        check(self.out_format in ("zarr", "lerobot"), "out_format", "must be zarr or lerobot")
        check(self.max_episodes >= 0, "max_episodes", "must be >= 0 (0 means all)")
        check(self.image_chunk_frames >= 0, "image_chunk_frames", "must be >= 0")
        check(Path(self.src).resolve() != Path(self.out).resolve(), "out", "must differ from src (the source is never written over)")


@dataclass
class DataViewConfig:
    path: str = ""
    episode: int = 0
    out: str = ""  # .png: contact sheet; .mp4: video; .rrd: Rerun recording (default: <dataset>_ep<N>.png)
    keys: list[str] = field(default_factory=list)  # image keys side by side (empty: all)
    frames: int = 16  # frames on a contact sheet, evenly spaced
    columns: int = 8
    fps: float = 0.0  # video frame rate (0: the dataset's)
    scale: int = 2  # upscale small frames by this integer factor

    def __post_init__(self):
        check(bool(self.path), "path", "a dataset path is required (PATH or path=data/demo.zarr)")
        check(self.episode >= 0, "episode", "must be >= 0")
        check(self.frames >= 1, "frames", "must be >= 1")
        check(self.columns >= 1, "columns", "must be >= 1")
        check(self.fps >= 0, "fps", "must be >= 0")
        check(1 <= self.scale <= 8, "scale", "must be in [1, 8]")
        check(not self.out or Path(self.out).suffix.lower() in VIEW_SUFFIXES, "out", "must end in .png, .mp4 or .rrd")


# ---------------------------------------------------------------------- info
def data_info(cfg: DataInfoConfig) -> dict[str, Any]:
    buffer = ReplayBuffer.open(cfg.path)
    summary = buffer.summary()
    summary["success_rate"] = float(buffer.episode_success.mean()) if buffer.n_episodes else float("nan")
    summary["sources"] = sorted(set(buffer.episode_sources))
    summary["stats_saved_for"] = sorted(buffer.stats or {})
    summary["chunks"] = {k: list(buffer.array(k).chunks) for k in buffer.keys}
    summary["zarr_format"] = int(buffer.root.metadata.zarr_format)
    if cfg.episodes:
        summary["episode_table"] = buffer.episode_table()
    return summary


def format_info(info: dict[str, Any]) -> str:
    lines = [
        f"{info['path']}: {info['episodes']} episodes, {info['steps']} steps, mean length {info['mean_length']:.1f}, "
        f"fps {info['fps']:g}, zarr v{info['zarr_format']}, success rate {info['success_rate']:.2f}",
        "keys:",
    ]
    for k, v in info["keys"].items():
        lines.append(f"  {k:24s} {v['dtype']:8s} {str(tuple(v['shape'])):16s} chunk {info['chunks'][k][0]} steps")
    lines.append("episodes per task:")
    lines += [f"  {t:32s} {n}" for t, n in info["episodes_per_task"].items()]
    lines.append(f"sources: {', '.join(s or '-' for s in info['sources'])}")
    lines.append(f"saved stats: {', '.join(info['stats_saved_for']) or 'none (mixpolicy data stats PATH)'}")
    if "episode_table" in info:
        lines.append(f"{'episode':>7s} {'length':>6s} {'success':>7s} {'seed':>6s}  task / source")
        for e in info["episode_table"]:
            lines.append(f"{e['episode']:7d} {e['length']:6d} {str(e['success']):>7s} {e['seed']:6d}  {e['task']} / {e['source']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------- stats
def data_stats(cfg: DataStatsConfig) -> dict[str, Any]:
    buffer = ReplayBuffer.open(cfg.path, mode="r+" if cfg.write else "r")
    keys = cfg.keys or buffer.keys
    unknown = sorted(set(keys) - set(buffer.keys))
    if unknown:
        raise UserError(f"{cfg.path}: no key(s) {unknown} (has {', '.join(buffer.keys)})")
    mask = select_episodes(buffer, EpisodeSelection(tasks=list(cfg.tasks), successful_only=cfg.successful_only))
    stats = buffer.compute_stats(keys, mask, max_image_frames=cfg.max_image_frames, seed=cfg.seed, progress=cfg.progress)
    if cfg.write:
        buffer.save_stats(stats)
    buffer.close()  # release the write lock now, not at garbage collection
    norm = Normalizer.from_stats(stats, cfg.mode)
    return {
        "path": cfg.path,
        "episodes": int(mask.sum()),
        "written": cfg.write,
        "stats": {k: {n: np.round(np.asarray(v, np.float64), 6).tolist() for n, v in s.items()} for k, s in stats.items()},
        "normalizer": {
            k: {"scale": norm.params[k].scale.tolist(), "offset": norm.params[k].offset.tolist()} for k in keys
        },
    }


# ---------------------------------------------------------------------- convert
def detect_format(path: Path) -> str:
    if path.is_file() and path.suffix.lower() in (".hdf5", ".h5"):
        return "robomimic"
    if (path / "meta" / "info.json").is_file():
        return "lerobot"
    if (path / "zarr.json").is_file() or (path / ".zgroup").is_file():
        return "zarr"
    if not path.exists():
        raise UserError(f"source not found: {path}")
    raise UserError(f"cannot tell the format of {path}; pass src_format=zarr|lerobot|robomimic")


def copy_store(
    src: ReplayBuffer, out: Path, mask: np.ndarray, image_chunk_frames: int = 0, overwrite: bool = False, progress: bool = True,
    resize: tuple[int, int] | None = None,
) -> ReplayBuffer:
    """Re-write selected episodes of a store (any zarr version) in this package's layout,
    camera frames resized to ``resize`` (H, W) when given (:mod:`~mixpolicy.datasets.resize`)."""
    if out.exists() and not overwrite:
        raise UserError(f"output {out} already exists (pass overwrite=true to replace it)")
    old = src.meta
    specs = {k: KeySpec(tuple(src.array(k).shape[1:]), str(src.array(k).dtype)) for k in src.keys}
    resized = [k for k, s in specs.items() if resize and is_image_spec(s.shape, s.dtype) and s.dtype == "uint8"]
    for k in resized:
        specs[k] = KeySpec((*resize, specs[k].shape[2]), "uint8")
    meta = DatasetMeta(
        fps=old.fps,
        tasks=[],
        obs_keys=[k for k in old.obs_keys if k in specs],
        action_key=old.action_key,
        discrete_action_dims=list(old.discrete_action_dims),
        task_descriptions=dict(old.task_descriptions),
        source=old.source + resize_note(resize if resized else None),
        specs=specs,
        original_keys=dict(old.original_keys),
        robot_type=old.robot_type,
    )
    if not meta.action_key:
        raise UserError(f"{src.path} has no 'action' key; cannot convert it to a mixpolicy store")
    chunk_rows = {k: image_chunk_frames for k, s in specs.items() if image_chunk_frames and is_image_spec(s.shape, s.dtype)}
    tasks, success, seeds, sources = src.episode_tasks, src.episode_success, src.episode_seeds, src.episode_sources
    with staged_output(out) as tmp:
        dst = ReplayBuffer.create(tmp, meta, overwrite=True, chunk_rows=chunk_rows)
        for e in tqdm(np.flatnonzero(mask), desc="convert", unit="ep", disable=not progress):
            data = src.get_episode(int(e))
            data.update({k: resize_frames(data[k], resize) for k in resized})
            dst.add_episode(data, task=tasks[e], success=bool(success[e]), seed=int(seeds[e]), source=sources[e])
        stats = {k: v for k, v in (src.stats or {}).items() if k not in resized}  # resized frames have new statistics
        if stats:
            dst.save_stats(stats)
        dst.close()
    return ReplayBuffer.open(out)


def data_convert(cfg: DataConvertConfig) -> dict[str, Any]:
    src, out = Path(cfg.src), Path(cfg.out)
    fmt = detect_format(src) if cfg.src_format == "auto" else cfg.src_format
    if not src.exists():
        raise UserError(f"source not found: {src}")
    if out.exists() and not cfg.overwrite:
        raise UserError(f"output {out} already exists (pass overwrite=true to replace it)")
    selection = EpisodeSelection(tasks=list(cfg.tasks), successful_only=cfg.successful_only, max_episodes=cfg.max_episodes)
    resize = check_size(cfg.resize, "resize")
    # LeRobot frames are resized as they are decoded (no full-size staging copy); other sources after import
    import_resize = resize if fmt == "lerobot" else None
    copy_resize = None if import_resize else resize
    filtered = bool(cfg.tasks or cfg.successful_only or cfg.max_episodes or cfg.image_chunk_frames or copy_resize)
    if fmt == "zarr":
        buffer = ReplayBuffer.open(src)
    elif cfg.out_format == "zarr" and not filtered:
        # straight import: write the store directly at `out`
        buffer = _import(fmt, src, out, cfg, resize=import_resize)
        return {"src": str(src), "src_format": fmt, "out": str(out), "out_format": "zarr", "episodes": buffer.n_episodes, "steps": buffer.n_steps}
    else:
        staging = out.with_name(out.name + ".import.zarr")
        buffer = _import(fmt, src, staging, cfg, overwrite=True, resize=import_resize)
    try:
        mask = select_episodes(buffer, selection)
        if not mask.any():
            raise UserError("no episodes left after filtering (tasks / successful_only / max_episodes)")
        if cfg.out_format == "zarr":
            result = copy_store(buffer, out, mask, cfg.image_chunk_frames, cfg.overwrite, cfg.progress, copy_resize)
            n, steps = result.n_episodes, result.n_steps
        else:
            from mixpolicy.datasets.lerobot_format import export_lerobot

            export_lerobot(buffer, out, mask, use_videos=cfg.use_videos, overwrite=cfg.overwrite, progress=cfg.progress)
            n, steps = int(mask.sum()), int(buffer.episode_lengths[mask].sum())
    finally:
        if fmt != "zarr":
            shutil.rmtree(out.with_name(out.name + ".import.zarr"), ignore_errors=True)
    return {"src": str(src), "src_format": fmt, "out": str(out), "out_format": cfg.out_format, "episodes": n, "steps": steps}


def _import(fmt: str, src: Path, dst: Path, cfg: DataConvertConfig, overwrite: bool | None = None, resize: tuple[int, int] | None = None) -> ReplayBuffer:
    overwrite = cfg.overwrite if overwrite is None else overwrite
    if fmt == "lerobot":
        from mixpolicy.datasets.lerobot_format import import_lerobot

        return import_lerobot(src, dst, overwrite=overwrite, progress=cfg.progress, resize=resize)
    from mixpolicy.datasets.robomimic_format import import_robomimic

    return import_robomimic(src, dst, obs_keys=list(cfg.obs_keys) or None, filter_key=cfg.filter_key, overwrite=overwrite, progress=cfg.progress)


# ---------------------------------------------------------------------- view
def _plot(values: np.ndarray, height: int, width: int, title: str) -> np.ndarray:
    """A small line plot of (T, D) values as an RGB image (one colour per dimension)."""
    import cv2

    img = np.full((height, width, 3), 255, np.uint8)
    values = np.nan_to_num(values.reshape(len(values), -1).astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = values.min(), values.max()
    span = hi - lo if hi > lo else 1.0
    xs = np.linspace(4, width - 4, len(values))
    for d in range(values.shape[1]):
        colour = tuple(int(c) for c in (np.array([(d * 67) % 255, (d * 139 + 80) % 255, (d * 29 + 160) % 255])))
        ys = height - 4 - (values[:, d] - lo) / span * (height - 24)
        pts = np.stack([xs, ys], 1).astype(np.int32)
        cv2.polylines(img, [pts], False, colour, 1, cv2.LINE_AA)
    cv2.putText(img, title, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    return img


def record_episode(buffer: ReplayBuffer, episode: int, out: Path, cameras: list[str]) -> dict[str, Any]:
    """A Rerun recording of one episode: the cameras, every other key as scalar series, the outcome."""
    from mixpolicy.viewer import Recording

    ep = buffer.get_episode(episode)
    n = int(buffer.episode_lengths[episode])
    task, action_key = buffer.episode_tasks[episode], buffer.meta.action_key
    rec = Recording(out, name=f"{Path(buffer.path).name} episode {episode}", fps=buffer.meta.fps)
    success = bool(buffer.episode_success[episode])
    fields = {"dataset": buffer.path, "episode": episode, "task": task, "description": buffer.meta.task_descriptions.get(task, ""),
              "length": n, "success": success, "seed": int(buffer.episode_seeds[episode]), "source": buffer.episode_sources[episode] or buffer.meta.source,
              "fps": buffer.meta.fps}  # fmt: skip
    rec.annotate(fields)
    for key in cameras:
        rec.images(f"camera/{key}", ep[key])
    image_keys = [k for k in buffer.keys if len(buffer.array(k).shape) == 4 and buffer.array(k).shape[-1] in (1, 3)]
    for key in buffer.keys:
        if key not in image_keys:  # low-dim keys, (T, ...) flattened to one series per value
            rec.series(action_key if key == action_key else f"state/{key}", ep[key].reshape(n, -1))
    rec.outcome(n - 1, success, f"episode {'succeeded' if success else 'did not succeed'} ({n} steps, task {task})")
    rec.close()
    return {"out": str(out), "frames": n, "keys": cameras}


def data_view(cfg: DataViewConfig) -> dict[str, Any]:
    import cv2

    out = Path(cfg.out) if cfg.out else Path(f"{Path(cfg.path).with_suffix('')}_ep{cfg.episode}.png")
    if out.suffix.lower() == ".rrd":
        from mixpolicy.viewer import require_rerun

        require_rerun()
    buffer = ReplayBuffer.open(cfg.path)
    if cfg.episode >= buffer.n_episodes:
        raise UserError(f"episode {cfg.episode} out of range: {cfg.path} has {buffer.n_episodes} episodes")
    # uint8 (H, W, C) keys, and float ones such as diffusion_policy's PushT `img` (0..255)
    image_keys = [k for k in buffer.keys if len(buffer.array(k).shape) == 4 and buffer.array(k).shape[-1] in (1, 3)]
    keys = cfg.keys or image_keys
    bad = sorted(set(keys) - set(image_keys))
    if bad:
        raise UserError(f"{cfg.path}: {bad} are not image keys (image keys: {image_keys or 'none'})")
    if out.suffix.lower() == ".rrd":
        return record_episode(buffer, cfg.episode, out, keys)
    ep = buffer.get_episode(cfg.episode, keys + [buffer.meta.action_key] if buffer.meta.action_key else keys)
    n = len(next(iter(ep.values())))
    title = f"episode {cfg.episode} ({buffer.episode_tasks[cfg.episode]}, {n} steps)"
    out.parent.mkdir(parents=True, exist_ok=True)
    for k in keys:
        if ep[k].dtype != np.uint8:
            x = np.nan_to_num(ep[k].astype(np.float64))
            ep[k] = np.clip(x * (255.0 if x.max(initial=0) <= 1.0 else 1.0), 0, 255).astype(np.uint8)
        if ep[k].shape[-1] == 1:
            ep[k] = ep[k].repeat(3, axis=-1)
    if keys:
        frames = np.concatenate([ep[k] for k in keys], axis=2)  # cameras side by side
        if cfg.scale > 1:
            frames = frames.repeat(cfg.scale, axis=1).repeat(cfg.scale, axis=2)
    if out.suffix.lower() == ".mp4":
        if not keys:
            raise UserError(f"{cfg.path} has no image keys to make a video of")
        fps = cfg.fps or buffer.meta.fps
        if not fps > 0:
            raise UserError(f"{cfg.path} records no frame rate; pass fps=<frames per second>")
        write_video(out, frames, fps)
        return {"out": str(out), "frames": n, "keys": keys}
    if keys:
        pick = np.unique(np.linspace(0, n - 1, min(cfg.frames, n)).round().astype(int))
        tiles = []
        for i in pick:
            tile = frames[i].copy()
            cv2.putText(tile, f"t={i}", (2, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (255, 255, 0), 1, cv2.LINE_AA)
            tiles.append(tile)
        cols = min(cfg.columns, len(tiles))
        rows = -(-len(tiles) // cols)
        tiles += [np.zeros_like(tiles[0])] * (rows * cols - len(tiles))
        sheet = np.concatenate([np.concatenate(tiles[r * cols : (r + 1) * cols], axis=1) for r in range(rows)], axis=0)
    else:
        sheet = np.zeros((0, 640, 3), np.uint8)
    width = max(sheet.shape[1], 320)
    parts = [np.pad(sheet, ((0, 0), (0, width - sheet.shape[1]), (0, 0)), constant_values=255)] if keys else []
    if buffer.meta.action_key in ep:
        parts.append(_plot(ep[buffer.meta.action_key], 120, width, f"{title}: {buffer.meta.action_key}"))
    image = np.concatenate(parts, axis=0)
    if not cv2.imwrite(str(out), cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
        raise UserError(f"cannot write {out}")
    return {"out": str(out), "frames": int(len(pick)) if keys else 0, "keys": keys}
