import numpy as np
import pytest
import zarr

from mixpolicy.datasets.replay_buffer import DatasetMeta, KeySpec, ReplayBuffer
from mixpolicy.errors import UserError
from factories import make_dataset


def test_round_trip_with_metadata(tmp_path, dataset_factory):
    dataset_factory(lengths=(5, 3, 7))
    buf = ReplayBuffer.open(tmp_path / "d.zarr")
    assert buf.n_episodes == 3 and buf.n_steps == 15
    np.testing.assert_array_equal(buf.episode_ends, [5, 8, 15])
    np.testing.assert_array_equal(buf.episode_lengths, [5, 3, 7])
    assert buf.episode_tasks == ["task-a", "task-b", "task-a"]
    assert buf.episode_success.tolist() == [True, False, True]
    assert buf.episode_seeds.tolist() == [0, 1, 2]
    assert buf.meta.fps == 10.0 and buf.meta.discrete_action_dims == [2]
    assert buf.meta.specs["state"].shape == (6,)
    ep = buf.get_episode(1)
    np.testing.assert_array_equal(ep["state"][:, 0], [100, 101, 102])
    assert ep["action"].dtype == np.float32
    # the layout is diffusion_policy's: data/<key> time-major, meta/episode_ends
    root = zarr.open_group(str(tmp_path / "d.zarr"), mode="r")
    assert root["data/state"].shape == (15, 6)
    assert root["meta/episode_ends"][:].tolist() == [5, 8, 15]


def test_add_episode_validates_shapes_keys_and_nan(tmp_path, dataset_factory):
    buf = dataset_factory(lengths=(2,))
    with pytest.raises(UserError, match="step shape"):
        buf.add_episode({"state": np.zeros((3, 5), np.float32), "action": np.zeros((3, 3), np.float32)})
    with pytest.raises(UserError, match="missing"):
        buf.add_episode({"state": np.zeros((3, 6), np.float32)})
    bad = np.zeros((3, 3), np.float32)
    bad[1, 1] = np.nan
    with pytest.raises(UserError, match="NaN"):
        buf.add_episode({"state": np.zeros((3, 6), np.float32), "action": bad})
    with pytest.raises(UserError, match="one non-zero length"):
        buf.add_episode({"state": np.zeros((3, 6), np.float32), "action": np.zeros((2, 3), np.float32)})
    # nothing of the rejected episodes became visible
    assert ReplayBuffer.open(tmp_path / "d.zarr").n_steps == 2


def test_rows_past_episode_ends_are_ignored(tmp_path, dataset_factory):
    """A writer killed after writing data but before committing episode_ends."""
    buf = dataset_factory(lengths=(4, 4))
    arr = buf.root["data/state"]
    arr.resize((12, 6))  # uncommitted rows of a third episode
    ends = buf.root["meta/episode_ends"]
    ends.resize((3,))  # grown but never filled: holds the fill value 0
    buf.close()  # the killed writer's lock went with its process
    reopened = ReplayBuffer.open(tmp_path / "d.zarr", mode="r+")
    assert reopened.n_episodes == 2 and reopened.n_steps == 8
    reopened.add_episode({"state": np.ones((2, 6), np.float32), "action": np.ones((2, 3), np.float32)}, task="t")
    again = ReplayBuffer.open(tmp_path / "d.zarr")
    assert again.episode_ends.tolist() == [4, 8, 10]
    np.testing.assert_array_equal(again.get_episode(2)["state"], np.ones((2, 6)))


def test_reads_diffusion_policy_v2_store(tmp_path):
    """The layout of pusht_cchi_v7_replay.zarr: zarr v2, data/{img,state,action}, meta/episode_ends."""
    path = tmp_path / "pusht_cchi_v7_replay.zarr"
    root = zarr.open_group(str(path), mode="w", zarr_format=2)
    n = 9
    root.create_array("data/img", shape=(n, 96, 96, 3), chunks=(4, 96, 96, 3), dtype="float32")
    root.create_array("data/state", shape=(n, 5), chunks=(n, 5), dtype="float32")
    root.create_array("data/action", shape=(n, 2), chunks=(n, 2), dtype="float32")
    root.create_array("meta/episode_ends", shape=(2,), chunks=(2,), dtype="int64")
    root["data/state"][:] = np.arange(n * 5, dtype=np.float32).reshape(n, 5)
    root["meta/episode_ends"][:] = [4, 9]
    buf = ReplayBuffer.open(path)
    assert buf.n_episodes == 2 and buf.episode_lengths.tolist() == [4, 5]
    assert buf.keys == ["action", "img", "state"]
    assert buf.meta.action_key == "action" and buf.meta.obs_keys == ["img", "state"]
    assert buf.episode_tasks == ["unknown", "unknown"]
    np.testing.assert_array_equal(buf.get_episode(1, ["state"])["state"][0], np.arange(20, 25))


def test_open_errors_name_the_problem(tmp_path):
    with pytest.raises(UserError, match="dataset not found"):
        ReplayBuffer.open(tmp_path / "nope.zarr")
    (tmp_path / "file.zarr").write_text("x")
    with pytest.raises(UserError, match="not a zarr directory"):
        ReplayBuffer.open(tmp_path / "file.zarr")
    zarr.open_group(str(tmp_path / "empty.zarr"), mode="w")
    with pytest.raises(UserError, match="no 'data' group"):
        ReplayBuffer.open(tmp_path / "empty.zarr")
    make_dataset(tmp_path / "d.zarr")
    with pytest.raises(UserError, match="already exists"):
        make_dataset(tmp_path / "d.zarr")
    meta = DatasetMeta(specs={"state": KeySpec((2,), "float32")})
    with pytest.raises(UserError, match="action key"):
        ReplayBuffer.create(tmp_path / "x.zarr", meta)


def test_mismatched_lengths_are_reported(tmp_path, dataset_factory):
    buf = dataset_factory(lengths=(4, 4))
    buf.root["data/action"].resize((6, 3))
    with pytest.raises(UserError, match="data/action has 6 rows"):
        ReplayBuffer.open(tmp_path / "d.zarr")
