"""LeRobot v3.0 import/export, robomimic HDF5 import, store validation and the data CLI."""

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from mixpolicy.cli import main
from mixpolicy.datasets.lerobot_format import export_lerobot, import_lerobot
from mixpolicy.datasets.replay_buffer import ReplayBuffer
from mixpolicy.datasets.robomimic_format import import_robomimic
from mixpolicy.datasets.validate import validate_store
from mixpolicy.errors import UserError
from test_cli import assert_one_line_error, tree_digest
from test_data_layer import make_image_dataset

pa = pytest.importorskip("pyarrow", reason="the interop extra (pyarrow) is not installed")
pq = pytest.importorskip("pyarrow.parquet", reason="the interop extra (pyarrow) is not installed")


def write_lerobot_v30(root: Path, lengths=(4, 3), version="v3.0", size=6):
    """A LeRobotDataset v3.0 folder written field by field (independent of our exporter)."""
    from PIL import Image

    (root / "meta" / "episodes" / "chunk-000").mkdir(parents=True)
    (root / "data" / "chunk-000").mkdir(parents=True)
    features = {
        "observation.state": {"dtype": "float32", "shape": [3], "names": None},
        "action": {"dtype": "float32", "shape": [2], "names": None},
        "observation.images.top": {"dtype": "image", "shape": [size, size, 3], "names": ["height", "width", "channels"]},
        **{k: {"dtype": d, "shape": [1], "names": None} for k, d in [("timestamp", "float32"), ("frame_index", "int64"), ("episode_index", "int64"), ("index", "int64"), ("task_index", "int64")]},
    }
    info = {"codebase_version": version, "fps": 15, "features": features, "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet", "video_path": None, "robot_type": "arm"}
    (root / "meta" / "info.json").write_text(json.dumps(info))
    tasks = ["pick the cube", "open the drawer"]
    pq.write_table(pa.table({"task_index": [0, 1], "task": tasks}), root / "meta" / "tasks.parquet")
    rows, eps, index = [], [], 0
    for e, n in enumerate(lengths):
        for t in range(n):
            img = np.full((size, size, 3), 20 * e + t, np.uint8)
            img[0, 0] = [1, 2, 3]
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
            rows.append({
                "observation.state": [100.0 * e + t, 1.0, -1.0],
                "action": [float(t), float(e)],
                "observation.images.top": {"bytes": buf.getvalue(), "path": None},
                "timestamp": t / 15, "frame_index": t, "episode_index": e, "index": index + t, "task_index": e % 2,
            })
        eps.append({"episode_index": e, "tasks": [tasks[e % 2]], "length": n, "data/chunk_index": 0, "data/file_index": 0, "dataset_from_index": index, "dataset_to_index": index + n})
        index += n
    pq.write_table(pa.Table.from_pylist(rows[::-1]), root / "data" / "chunk-000" / "file-000.parquet")  # row order must not matter
    pq.write_table(pa.Table.from_pylist(eps), root / "meta" / "episodes" / "chunk-000" / "file-000.parquet")
    return root


def test_import_lerobot_v30_reads_frames_tasks_and_images(tmp_path):
    src = write_lerobot_v30(tmp_path / "lr")
    buf = import_lerobot(src, tmp_path / "out.zarr", progress=False)
    assert buf.n_episodes == 2 and buf.episode_lengths.tolist() == [4, 3]
    assert buf.keys == ["action", "image_top", "state"]
    assert buf.episode_tasks == ["pick the cube", "open the drawer"]
    assert buf.meta.fps == 15 and buf.meta.robot_type == "arm"
    assert buf.meta.original_keys["image_top"] == "observation.images.top"
    ep = buf.get_episode(1)
    np.testing.assert_array_equal(ep["state"][:, 0], [100, 101, 102])
    np.testing.assert_array_equal(ep["action"][:, 0], [0, 1, 2])
    np.testing.assert_array_equal(ep["image_top"][:, 3, 3, 0], [20, 21, 22])
    np.testing.assert_array_equal(ep["image_top"][0, 0, 0], [1, 2, 3])
    assert ep["image_top"].dtype == np.uint8


def test_lerobot_export_import_round_trip_is_exact_with_png_frames(tmp_path):
    store = make_image_dataset(tmp_path / "d.zarr", size=8)
    mask = np.array([True, False, True, True])
    out = export_lerobot(store, tmp_path / "lr", episode_mask=mask, progress=False)
    info = json.loads((out / "meta" / "info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["total_episodes"] == 3 and info["total_frames"] == 6 + 4 + 7
    assert info["features"]["observation.images.cam"]["dtype"] == "image"
    stats = json.loads((out / "meta" / "stats.json").read_text())
    assert np.asarray(stats["observation.images.cam"]["mean"]).shape == (3, 1, 1)
    back = import_lerobot(out, tmp_path / "back.zarr", progress=False)
    assert back.episode_tasks == ["t0", "t0", "t1"]
    for new, old in enumerate([0, 2, 3]):
        a, b = store.get_episode(old), back.get_episode(new)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


def test_lerobot_video_export_round_trip_is_close(tmp_path):
    pytest.importorskip("av", reason="mp4 export needs PyAV (interop extra)")
    store = make_image_dataset(tmp_path / "d.zarr", lengths=(5, 6), size=16)
    out = export_lerobot(store, tmp_path / "lr", use_videos=True, progress=False)
    assert sorted(p.name for p in (out / "videos" / "observation.images.cam" / "chunk-000").iterdir()) == ["file-000.mp4"]
    ep_meta = pq.read_table(out / "meta" / "episodes" / "chunk-000" / "file-000.parquet").to_pylist()
    assert ep_meta[1]["videos/observation.images.cam/from_timestamp"] == pytest.approx(5 / 10)
    back = import_lerobot(out, tmp_path / "back.zarr", progress=False)
    assert back.episode_lengths.tolist() == [5, 6]
    np.testing.assert_array_equal(back.get_episode(1)["state"], store.get_episode(1)["state"])
    assert back.get_episode(1)["image_cam"].shape == (6, 16, 16, 3)


def test_lerobot_bad_input_one_error_and_nothing_written(tmp_path):
    src = write_lerobot_v30(tmp_path / "old", version="v2.0")
    with pytest.raises(UserError, match="unsupported LeRobot dataset version 'v2.0'.*reads v3.0, v2.1"):
        import_lerobot(src, tmp_path / "out.zarr", progress=False)
    assert not (tmp_path / "out.zarr").exists() and not (tmp_path / "out.zarr.partial").exists()
    with pytest.raises(UserError, match="no meta/info.json"):
        import_lerobot(tmp_path, tmp_path / "out.zarr", progress=False)
    good = write_lerobot_v30(tmp_path / "lr")
    (good / "data" / "chunk-000" / "file-000.parquet").write_bytes(b"not parquet")
    with pytest.raises(Exception):
        import_lerobot(good, tmp_path / "out.zarr", progress=False)
    assert not (tmp_path / "out.zarr").exists() and not (tmp_path / "out.zarr.partial").exists()


# ---------------------------------------------------------------------- robomimic
def write_robomimic(path: Path, lengths=(5, 3), with_actions=True):
    h5py = pytest.importorskip("h5py", reason="robomimic import needs h5py (interop extra)")
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        data.attrs["env_args"] = json.dumps({"env_name": "Lift", "type": 1, "env_kwargs": {"control_freq": 20}})
        data.attrs["total"] = int(sum(lengths))
        for i, n in enumerate(lengths):
            g = data.create_group(f"demo_{i}")
            g.attrs["num_samples"] = n
            if with_actions:
                g.create_dataset("actions", data=np.tile(np.arange(n, dtype=np.float64)[:, None], (1, 7)) + i)
            g.create_dataset("obs/robot0_eef_pos", data=np.full((n, 3), 10.0 * i))
            g.create_dataset("obs/agentview_image", data=np.full((n, 8, 8, 3), i + 1, np.uint8))
            g.create_dataset("rewards", data=np.zeros(n))
        f.create_dataset("mask/train", data=np.array([b"demo_1"]))
    return path


def test_import_robomimic_hdf5(tmp_path):
    src = write_robomimic(tmp_path / "low_dim.hdf5", lengths=(5, 3, 4))
    buf = import_robomimic(src, tmp_path / "out.zarr", progress=False)
    assert buf.n_episodes == 3 and buf.episode_lengths.tolist() == [5, 3, 4]
    assert buf.keys == ["action", "agentview_image", "robot0_eef_pos"]
    assert buf.episode_tasks == ["Lift"] * 3 and buf.meta.fps == 20
    ep = buf.get_episode(2)
    np.testing.assert_array_equal(ep["action"][:, 0], [2, 3, 4, 5])
    assert ep["agentview_image"].dtype == np.uint8 and ep["agentview_image"][0, 0, 0, 0] == 3
    sub = import_robomimic(src, tmp_path / "train.zarr", obs_keys=["robot0_eef_pos"], filter_key="train", progress=False)
    assert sub.n_episodes == 1 and sub.keys == ["action", "robot0_eef_pos"]
    np.testing.assert_array_equal(sub.get_episode(0)["robot0_eef_pos"][0], [10, 10, 10])


def test_robomimic_bad_input(tmp_path):
    src = write_robomimic(tmp_path / "no_actions.hdf5", with_actions=False)
    with pytest.raises(UserError, match="demo demo_0 has no 'actions' dataset"):
        import_robomimic(src, tmp_path / "out.zarr", progress=False)
    assert not (tmp_path / "out.zarr").exists()
    good = write_robomimic(tmp_path / "ok.hdf5")
    with pytest.raises(UserError, match=r"obs key\(s\) \['joint_pos'\] not in the demos"):
        import_robomimic(good, tmp_path / "out.zarr", obs_keys=["joint_pos"], progress=False)
    with pytest.raises(UserError, match="no filter key 'valid'"):
        import_robomimic(good, tmp_path / "out.zarr", filter_key="valid", progress=False)
    (tmp_path / "junk.hdf5").write_bytes(b"junk")
    with pytest.raises(UserError, match="not a readable HDF5 file"):
        import_robomimic(tmp_path / "junk.hdf5", tmp_path / "out.zarr", progress=False)


# ---------------------------------------------------------------------- validate
def test_validate_lists_every_problem(tmp_path):
    path = tmp_path / "d.zarr"
    assert validate_store(make_image_dataset(path, chunk=2).path) == []
    root = zarr.open_group(str(path), mode="r+")
    state = root["data/state"]
    state[2, 1] = np.nan  # episode 0
    state[20, 0] = np.inf  # episode 3
    root["data/action"].resize((10, 2))  # truncated key
    chunk_file = next(p for p in sorted((path / "data" / "image_cam" / "c").rglob("*")) if p.is_file())
    chunk_file.write_bytes(b"garbage, not blosc")  # corrupt chunk
    attrs = dict(root.attrs["mixpolicy"])
    attrs["specs"]["state"]["dtype"] = "float64"  # dtype drift
    attrs["specs"]["proprio"] = {"shape": [4], "dtype": "float32"}  # a key that was never written
    root.attrs["mixpolicy"] = attrs
    problems = validate_store(path)
    text = "\n".join(problems)
    assert "data/action has 10 rows but episode_ends says 26" in text
    assert "data/state has NaN or inf in 2 step(s) of episode(s) [0, 3]" in text
    assert "data/image_cam: chunk 0 (rows 0-1) cannot be decoded" in text
    assert "data/state dtype float32 differs from its spec float64" in text
    assert "key 'proprio' is in the metadata but missing from data/" in text
    assert len(problems) == 5
    assert validate_store(tmp_path / "none.zarr") == [f"dataset not found: {tmp_path / 'none.zarr'}"]


# ---------------------------------------------------------------------- CLI
def run(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_data_cli_info_validate_stats_view(capsys, tmp_path):
    path = make_image_dataset(tmp_path / "d.zarr", size=16).path
    code, out, _ = run(capsys, "data", "info", f"path={path}", "episodes=true")
    assert code == 0 and "4 episodes, 26 steps" in out and "image_cam" in out and "t1" in out
    code, out, _ = run(capsys, "data", "validate", f"path={path}", "progress=false")
    assert code == 0 and "no problems found" in out
    code, out, _ = run(capsys, "data", "stats", f"path={path}", "keys=[state]", "mode=mean_std", "progress=false")
    assert code == 0 and json.loads(out)["stats"]["state"]["max"][0] == 306.0
    assert ReplayBuffer.open(path).stats["state"]["min"][0] == 0.0
    code, out, _ = run(capsys, "data", "view", f"path={path}", "episode=1", f"out={tmp_path}/ep1.png")
    import cv2

    sheet = cv2.imread(str(tmp_path / "ep1.png"))
    assert code == 0 and sheet.shape[:2] == (2 * 32 + 120, 320)  # 9 frames in 2 rows of 8 (padded to 320 px) + plot
    code, out, _ = run(capsys, "data", "view", f"path={path}", "episode=1", f"out={tmp_path}/ep1.mp4")
    cap = cv2.VideoCapture(str(tmp_path / "ep1.mp4"))
    assert code == 0 and int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 9
    code, _, err = run(capsys, "data", "view", f"path={path}", "episode=9")
    assert_one_line_error(code, err, "episode 9 out of range")
    # problems: exit 1 and one line each
    zarr.open_group(str(path), mode="r+")["data/action"].resize((3, 2))
    code, out, err = run(capsys, "data", "validate", f"path={path}", "progress=false")
    assert code == 1 and out.strip().splitlines() == [f"{path}: data/action has 3 rows but episode_ends says 26"]


def test_data_cli_convert_and_bad_input(capsys, tmp_path):
    path = make_image_dataset(tmp_path / "d.zarr", size=8).path
    before = tree_digest(path)
    code, out, _ = run(capsys, "data", "convert", f"src={path}", f"out={tmp_path}/lr", "out_format=lerobot", "successful_only=true", "progress=false")
    assert code == 0 and "wrote 3 episodes" in out
    code, out, _ = run(capsys, "data", "convert", f"src={tmp_path}/lr", f"out={tmp_path}/back.zarr", "image_chunk_frames=2", "progress=false")
    assert code == 0 and "(lerobot)" in out
    back = ReplayBuffer.open(tmp_path / "back.zarr")
    assert back.n_episodes == 3 and back.array("image_cam").chunks[0] == 2
    np.testing.assert_array_equal(back.get_episode(2)["image_cam"], ReplayBuffer.open(path).get_episode(3)["image_cam"])
    assert tree_digest(path) == before  # the source is never written
    code, _, err = run(capsys, "data", "convert", f"src={path}", f"out={path}")
    assert_one_line_error(code, err, "'out': must differ from src")
    code, _, err = run(capsys, "data", "convert", f"src={path}", f"out={tmp_path}/back.zarr")
    assert_one_line_error(code, err, "already exists")
    write_robomimic(tmp_path / "no_actions.hdf5", with_actions=False)
    code, _, err = run(capsys, "data", "convert", f"src={tmp_path}/no_actions.hdf5", f"out={tmp_path}/rm.zarr")
    assert_one_line_error(code, err, "has no 'actions' dataset")
    write_lerobot_v30(tmp_path / "v20", version="v2.0")
    code, _, err = run(capsys, "data", "convert", f"src={tmp_path}/v20", f"out={tmp_path}/x.zarr")
    assert_one_line_error(code, err, "unsupported LeRobot dataset version 'v2.0'")
    code, _, err = run(capsys, "data", "frobnicate")
    assert_one_line_error(code, err, "unknown data command 'frobnicate'")
    code, _, err = run(capsys, "data", "info")
    assert_one_line_error(code, err, r"missing required option\(s\) path")
    assert not any(p.name.endswith(".partial") for p in tmp_path.iterdir())
    shutil.rmtree(tmp_path / "lr")


def test_data_view_low_dim_store_and_float_images(capsys, tmp_path, dataset_factory):
    import cv2

    dataset_factory("lowdim.zarr")  # no cameras: the sheet is the action plot
    code, _, _ = run(capsys, "data", "view", f"path={tmp_path}/lowdim.zarr", f"out={tmp_path}/a.png")
    assert code == 0 and cv2.imread(str(tmp_path / "a.png")).shape == (120, 640, 3)
    code, _, err = run(capsys, "data", "view", f"path={tmp_path}/lowdim.zarr", f"out={tmp_path}/a.mp4")
    assert_one_line_error(code, err, "has no image keys to make a video of")
    root = zarr.open_group(str(tmp_path / "pusht.zarr"), mode="w", zarr_format=2)  # diffusion_policy: float img 0..255
    root.create_array("data/img", shape=(6, 8, 8, 3), chunks=(3, 8, 8, 3), dtype="float32")
    root.create_array("data/action", shape=(6, 2), chunks=(6, 2), dtype="float32")
    root.create_array("meta/episode_ends", shape=(1,), chunks=(1,), dtype="int64")
    root["data/img"][:] = 200.0
    root["meta/episode_ends"][:] = [6]
    code, _, _ = run(capsys, "data", "view", f"path={tmp_path}/pusht.zarr", f"out={tmp_path}/p.png", "scale=1")
    sheet = cv2.imread(str(tmp_path / "p.png"))
    # the frame label's glyphs differ between OpenCV 4 and 5: the brightest pixel of the tile is the frame's value
    assert code == 0 and sheet.shape == (8 + 120, 320, 3) and sheet[:8, :8, 0].max() == 200
