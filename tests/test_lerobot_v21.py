"""LeRobot v2.1 import: one parquet file per episode, one mp4 per episode and camera."""

import json
from pathlib import Path

import numpy as np
import pytest

from mixpolicy.cli import main
from mixpolicy.datasets.lerobot_format import import_lerobot
from mixpolicy.datasets.replay_buffer import ReplayBuffer
from mixpolicy.errors import UserError
from test_cli import assert_one_line_error

pa = pytest.importorskip("pyarrow", reason="the interop extra (pyarrow) is not installed")
pq = pytest.importorskip("pyarrow.parquet", reason="the interop extra (pyarrow) is not installed")
av = pytest.importorskip("av", reason="the interop extra (av) is not installed")

FPS = 10
CAMERAS = {"observation.images.front": (12, 16), "observation.images.wrist": (8, 8)}  # (H, W)
BOOKKEEPING = [("timestamp", "float32"), ("frame_index", "int64"), ("episode_index", "int64"), ("index", "int64"), ("task_index", "int64")]


def camera_frames(e: int, n: int, h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(1000 * e + seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def write_mp4(path: Path, frames: np.ndarray, fps: int = FPS) -> None:
    """Lossless RGB h264, so decoded frames equal the written ones exactly."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format="mp4") as out:
        stream = out.add_stream("libx264rgb", rate=fps, options={"crf": "0", "preset": "ultrafast"})
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "rgb24"
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def write_lerobot_v21(root: Path, lengths=(5, 3), chunks_size=1000) -> Path:
    """A LeRobotDataset v2.1 folder written file by file, as lerobot 2.x lays it out."""
    features = {
        "observation.state": {"dtype": "float32", "shape": [3], "names": ["x", "y", "z"]},
        "action": {"dtype": "float32", "shape": [2], "names": ["a", "b"]},
        **{k: {"dtype": "video", "shape": [h, w, 3], "names": ["height", "width", "channels"],
               "info": {"video.fps": float(FPS), "video.codec": "h264"}} for k, (h, w) in CAMERAS.items()},
        **{k: {"dtype": d, "shape": [1], "names": None} for k, d in BOOKKEEPING},
    }  # fmt: skip
    info = {
        "codebase_version": "v2.1", "robot_type": "arm", "fps": FPS, "chunks_size": chunks_size,
        "total_episodes": len(lengths), "total_frames": sum(lengths), "total_chunks": 1, "total_videos": 2 * len(lengths),
        "data_path": "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
        "video_path": "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4",
        "features": features,
    }  # fmt: skip
    (root / "meta").mkdir(parents=True)
    (root / "meta" / "info.json").write_text(json.dumps(info))
    tasks = ["pick the cube", "open the drawer"]
    (root / "meta" / "tasks.jsonl").write_text("".join(json.dumps({"task_index": i, "task": t}) + "\n" for i, t in enumerate(tasks)))
    episodes, stats, index = [], [], 0
    for e, n in enumerate(lengths):
        chunk = e // chunks_size
        rows = [
            {"observation.state": [100.0 * e + t, 1.0, -1.0], "action": [float(t), float(e)], "timestamp": t / FPS,
             "frame_index": t, "episode_index": e, "index": index + t, "task_index": e % 2}
            for t in range(n)
        ]  # fmt: skip
        path = root / "data" / f"chunk-{chunk:03d}" / f"episode_{e:06d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows[::-1]), path)  # row order must not matter
        for i, (key, (h, w)) in enumerate(CAMERAS.items()):
            write_mp4(root / "videos" / f"chunk-{chunk:03d}" / key / f"episode_{e:06d}.mp4", camera_frames(e, n, h, w, i))
        episodes.append({"episode_index": e, "tasks": [tasks[e % 2]], "length": n})
        stats.append({"episode_index": e, "stats": {"action": {"min": [0.0, 0.0], "max": [1.0, 1.0]}}})
        index += n
    (root / "meta" / "episodes.jsonl").write_text("".join(json.dumps(x) + "\n" for x in episodes))
    (root / "meta" / "episodes_stats.jsonl").write_text("".join(json.dumps(x) + "\n" for x in stats))
    return root


def test_v21_import_keeps_frames_fps_names_and_tasks(tmp_path):
    src = write_lerobot_v21(tmp_path / "lr", lengths=(5, 3), chunks_size=1)  # one chunk folder per episode
    store = import_lerobot(src, tmp_path / "out.zarr", progress=False)
    assert store.episode_lengths.tolist() == [5, 3]
    assert store.meta.fps == FPS
    assert store.meta.original_keys == {
        "state": "observation.state", "action": "action",
        "image_front": "observation.images.front", "image_wrist": "observation.images.wrist",
    }  # fmt: skip
    assert store.episode_tasks == ["pick the cube", "open the drawer"]
    assert store.meta.source == "lerobot v2.1: lr"
    for e, n in enumerate((5, 3)):
        ep = store.get_episode(e)
        np.testing.assert_array_equal(ep["state"][:, 0], 100.0 * e + np.arange(n))
        np.testing.assert_array_equal(ep["action"][:, 0], np.arange(n))
        np.testing.assert_array_equal(ep["image_front"], camera_frames(e, n, 12, 16, 0))
        np.testing.assert_array_equal(ep["image_wrist"], camera_frames(e, n, 8, 8, 1))


def test_v21_convert_cli_and_frame_count_mismatch(tmp_path, capsys):
    src = write_lerobot_v21(tmp_path / "lr")
    code = main(["data", "convert", f"src={src}", f"out={tmp_path}/a.zarr", "progress=false"])
    assert code == 0 and "(lerobot)" in capsys.readouterr().out
    assert ReplayBuffer.open(tmp_path / "a.zarr").n_episodes == 2
    # one frame too many in episode 1's wrist video: refused, nothing written
    write_mp4(src / "videos" / "chunk-000" / "observation.images.wrist" / "episode_000001.mp4", camera_frames(1, 4, 8, 8, 1))
    code = main(["data", "convert", f"src={src}", f"out={tmp_path}/b.zarr", "progress=false"])
    assert_one_line_error(code, capsys.readouterr().err, r"episode_000001.mp4 has 4 frames, its episode's parquet file has 3 rows")
    write_mp4(src / "videos" / "chunk-000" / "observation.images.wrist" / "episode_000001.mp4", camera_frames(1, 2, 8, 8, 1))
    with pytest.raises(UserError, match="has 2 frames, its episode's parquet file has 3 rows"):
        import_lerobot(src, tmp_path / "b.zarr", progress=False)
    assert not (tmp_path / "b.zarr").exists() and not (tmp_path / "b.zarr.partial").exists()


def test_v21_bad_metadata_is_one_error(tmp_path):
    src = write_lerobot_v21(tmp_path / "lr", lengths=(2,))
    (src / "meta" / "episodes.jsonl").write_text('{"episode_index": 0, "length": 2}\nnot json\n')
    with pytest.raises(UserError, match=r"episodes.jsonl line 2 is not valid JSON"):
        import_lerobot(src, tmp_path / "x.zarr", progress=False)
    (src / "meta" / "episodes.jsonl").write_text('{"episode_index": 0, "length": 3}\n')
    with pytest.raises(UserError, match=r"episode 0: meta/episodes.jsonl says 3 frames, .* has 2 rows"):
        import_lerobot(src, tmp_path / "x.zarr", progress=False)
    info = json.loads((src / "meta" / "info.json").read_text())
    info["data_path"] = "../data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
    (src / "meta" / "info.json").write_text(json.dumps(info))
    with pytest.raises(UserError, match="must be a relative path inside the dataset"):
        import_lerobot(src, tmp_path / "x.zarr", progress=False)


def test_resize_covers_then_centre_crops():
    from mixpolicy.datasets.resize import cover_size, resize_frames

    assert cover_size(12, 16, (6, 8)) == (6, 8)  # same aspect: plain scaling
    assert cover_size(12, 16, (8, 8)) == (8, 11)  # wider source: the width overflows, then is cropped
    # a 4x8 frame with a left half 0 and right half 200, shrunk to 2x2: the centre 2 columns of a 2x4 image
    frame = np.zeros((1, 4, 8, 3), np.uint8)
    frame[:, :, 4:] = 200
    out = resize_frames(frame, (2, 2))
    assert out.shape == (1, 2, 2, 3)
    np.testing.assert_array_equal(out[0, :, :, 0], [[0, 200], [0, 200]])
    stripes = np.zeros((1, 8, 8, 3), np.uint8)
    stripes[:, :, ::2] = 255  # area interpolation averages: no aliasing to black or white
    assert np.all(resize_frames(stripes, (4, 4)) == 128)
    assert resize_frames(frame, (4, 8)) is frame


def test_convert_resize_is_a_declared_step(tmp_path, capsys):
    src = write_lerobot_v21(tmp_path / "lr")
    code = main(["data", "convert", f"src={src}", f"out={tmp_path}/r.zarr", "resize=[8,10]", "progress=false"])
    assert code == 0, capsys.readouterr().err
    store = ReplayBuffer.open(tmp_path / "r.zarr")
    ep = store.get_episode(0)
    assert ep["image_front"].shape == (5, 8, 10, 3) and ep["image_wrist"].shape == (5, 8, 10, 3)
    from mixpolicy.datasets.resize import resize_frames

    np.testing.assert_array_equal(ep["image_front"], resize_frames(camera_frames(0, 5, 12, 16, 0), (8, 10)))
    np.testing.assert_array_equal(ep["state"][:, 0], np.arange(5))  # low-dim keys untouched
    assert "resized to 8x10" in store.meta.source and store.meta.fps == FPS
    capsys.readouterr()
    code = main(["data", "convert", f"src={src}", f"out={tmp_path}/bad.zarr", "resize=[4]"])
    assert_one_line_error(code, capsys.readouterr().err, r"'resize': must be \[height, width\]")
    code = main(["data", "convert", f"src={tmp_path}/r.zarr", f"out={tmp_path}/lr2", "resize=[8,8]", "out_format=lerobot"])
    assert_one_line_error(code, capsys.readouterr().err, r"'resize': applies to zarr output")


@pytest.mark.parametrize("layout", ["v2.1 mp4", "v3.0 mp4", "v3.0 png"])
def test_convert_resizes_frames_as_they_are_decoded(tmp_path, capsys, monkeypatch, layout):
    """LeRobot frames reach the store already resized (no full-size staging copy), equal to
    resizing the full-size import; a filter beside resize gives the same frames."""
    from mixpolicy.datasets.lerobot_format import export_lerobot, import_lerobot
    from mixpolicy.datasets.resize import resize_frames
    from test_data_interop import write_lerobot_v30
    from test_data_layer import make_image_dataset

    if layout == "v2.1 mp4":
        src = write_lerobot_v21(tmp_path / "lr")
    elif layout == "v3.0 mp4":
        src = export_lerobot(make_image_dataset(tmp_path / "d.zarr", lengths=(5, 6), size=16), tmp_path / "lr", use_videos=True, progress=False)
    else:
        src = write_lerobot_v30(tmp_path / "lr", size=12)
    full = import_lerobot(src, tmp_path / "full.zarr", progress=False)
    cams = [k for k in full.keys if k.startswith("image_")]
    seen: list[tuple] = []
    real_add = ReplayBuffer.add_episode

    def add_episode(self, data, **kw):
        seen.append({k: data[k].shape for k in cams})
        return real_add(self, data, **kw)

    monkeypatch.setattr(ReplayBuffer, "add_episode", add_episode)
    code = main(["data", "convert", f"src={src}", f"out={tmp_path}/r.zarr", "resize=[8,10]", "progress=false"])
    assert code == 0, capsys.readouterr().err
    assert len(seen) == full.n_episodes and all(s[1:] == (8, 10, 3) for shapes in seen for s in shapes.values())
    store = ReplayBuffer.open(tmp_path / "r.zarr")
    assert "resized to 8x10" in store.meta.source and store.meta.specs[cams[0]].shape == (8, 10, 3)
    for e in range(full.n_episodes):
        for k in cams:
            np.testing.assert_array_equal(store.get_episode(e)[k], resize_frames(full.get_episode(e)[k], (8, 10)))
    code = main(["data", "convert", f"src={src}", f"out={tmp_path}/one.zarr", "resize=[8,10]", "max_episodes=1", "progress=false"])
    assert code == 0, capsys.readouterr().err
    one = ReplayBuffer.open(tmp_path / "one.zarr")
    assert one.n_episodes == 1
    np.testing.assert_array_equal(one.get_episode(0)[cams[0]], store.get_episode(0)[cams[0]])
    assert all(s[1:] == (8, 10, 3) for shapes in seen for s in shapes.values())  # the filtered run's staging store too
    assert not list(tmp_path.glob("*.import.zarr"))


def test_convert_resizes_a_zarr_store_after_reading_it(tmp_path, capsys):
    from mixpolicy.datasets.resize import resize_frames
    from test_data_layer import make_image_dataset

    src = make_image_dataset(tmp_path / "d.zarr", lengths=(3, 4), size=16)
    code = main(["data", "convert", f"src={tmp_path / 'd.zarr'}", f"out={tmp_path / 'r.zarr'}", "resize=[8,12]", "progress=false"])
    assert code == 0, capsys.readouterr().err
    out = ReplayBuffer.open(tmp_path / "r.zarr")
    assert out.meta.source.endswith("frames resized to 8x12 (cover, centre crop)")
    np.testing.assert_array_equal(out.get_episode(1)["image_cam"], resize_frames(src.get_episode(1)["image_cam"], (8, 12)))
