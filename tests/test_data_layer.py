"""Normalizer modes and streaming stats, episode selection, zarr-backed windows, augmentation."""

import numpy as np
import pytest
import torch
import zarr

from mixpolicy.datasets.augment import BatchImageAugment, ImageAugmentConfig
from mixpolicy.datasets.normalizer import Normalizer, RunningStats
from mixpolicy.datasets.replay_buffer import DatasetMeta, KeySpec, ReplayBuffer
from mixpolicy.datasets.sampler import InMemoryWindows, SequenceSampler, ZarrWindows, make_windows, window_loader
from mixpolicy.datasets.selection import EpisodeSelection, select_episodes
from mixpolicy.errors import UserError


def make_image_dataset(path, lengths=(6, 9, 4, 7), size=12, chunk=None):
    """state[:, 0] = 100 e + t; image pixel values encode (e, t) too."""
    meta = DatasetMeta(
        obs_keys=["state", "image_cam"],
        specs={"state": KeySpec((3,), "float32"), "image_cam": KeySpec((size, size, 3), "uint8"), "action": KeySpec((2,), "float32")},
    )
    buf = ReplayBuffer.create(path, meta, chunk_rows={"image_cam": chunk} if chunk else None)
    rng = np.random.default_rng(1)
    for e, n in enumerate(lengths):
        t = np.arange(n)
        state = np.stack([100 * e + t, rng.normal(size=n), rng.normal(size=n)], 1).astype(np.float32)
        image = rng.integers(0, 255, size=(n, size, size, 3), dtype=np.uint8)
        image[:, 0, 0, 0] = 10 * e + t
        buf.add_episode({"state": state, "image_cam": image, "action": rng.normal(size=(n, 2)).astype(np.float32)}, task=f"t{e % 2}", success=e != 2)
    return buf


# ---------------------------------------------------------------------- normalizer
def test_normalizer_modes_map_their_statistics_to_the_documented_ranges():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=(20000, 3)).astype(np.float32)
    t = torch.from_numpy(x)
    mm = Normalizer.from_data({"x": x}).normalize("x", t)
    np.testing.assert_allclose(mm.min(0).values, -1, atol=1e-5)
    np.testing.assert_allclose(mm.max(0).values, 1, atol=1e-5)
    ms = Normalizer.from_data({"x": x}, "mean_std").normalize("x", t)
    np.testing.assert_allclose(ms.mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(ms.std(0, unbiased=False), 1, atol=1e-4)
    q = Normalizer.from_data({"x": x}, "quantile").normalize("x", t)
    np.testing.assert_allclose((q < -1).float().mean(0), 0.01, atol=0.003)
    np.testing.assert_allclose((q > 1).float().mean(0), 0.01, atol=0.003)
    ident = Normalizer.from_data({"x": x}, {"x": "identity"})
    assert torch.equal(ident.normalize("x", t), t)
    for mode in ("min_max", "mean_std", "quantile", "identity"):
        n = Normalizer.from_data({"x": x}, mode)
        np.testing.assert_allclose(n.unnormalize("x", n.normalize("x", t)), x, rtol=1e-5, atol=1e-4)
        # every mode keeps the checkpoint layout: two buffers per key
        assert sorted(n.state_dict()) == ["params.x.offset", "params.x.scale"]
    with pytest.raises(UserError, match="unknown normalization mode 'zscore'"):
        Normalizer.from_data({"x": x}, "zscore")


def test_running_stats_streamed_in_chunks_equal_the_whole_array():
    rng = np.random.default_rng(1)
    x = rng.uniform(-5, 7, size=(5003, 4)) * [1, 10, 0.1, 3]
    s = RunningStats(max_sample=1000, seed=0)
    for lo in range(0, len(x), 777):
        s.update(x[lo : lo + 777])
    r = s.result()
    np.testing.assert_allclose(r["mean"], x.mean(0), rtol=1e-10)
    np.testing.assert_allclose(r["std"], x.std(0), rtol=1e-10)
    np.testing.assert_array_equal(r["min"], x.min(0))
    np.testing.assert_array_equal(r["max"], x.max(0))
    assert int(r["count"]) == 5003
    # the quantiles come from a 1000-row uniform sample: close to the exact ones
    exact = np.quantile(x, [0.01, 0.99], axis=0)
    span = x.max(0) - x.min(0)
    assert np.all(np.abs(r["q01"] - exact[0]) < 0.03 * span)
    assert np.all(np.abs(r["q99"] - exact[1]) < 0.03 * span)


def test_store_stats_are_computed_streaming_saved_and_reloaded(tmp_path):
    buf = make_image_dataset(tmp_path / "d.zarr")
    mask = np.array([True, False, True, True])
    stats = buf.compute_stats(["state", "image_cam"], mask)
    rows = buf.row_mask(mask)
    state = buf.load(["state"])["state"][rows]
    np.testing.assert_allclose(stats["state"]["mean"], state.mean(0), rtol=1e-6)
    np.testing.assert_allclose(stats["state"]["max"], state.max(0))
    assert stats["image_cam"]["mean"].shape == (3,)  # images: per channel
    buf.save_stats(stats)
    again = ReplayBuffer.open(tmp_path / "d.zarr").stats
    np.testing.assert_allclose(again["state"]["q99"], stats["state"]["q99"])
    norm = Normalizer.from_stats(again, {"state": "mean_std"})
    np.testing.assert_allclose(norm.normalize("state", torch.from_numpy(state)).mean(0), 0, atol=1e-4)
    with pytest.raises(UserError, match="read-only"):
        ReplayBuffer.open(tmp_path / "d.zarr").save_stats(stats)


# ---------------------------------------------------------------------- store metadata and selection
def test_episode_source_table_and_image_chunking(tmp_path):
    buf = make_image_dataset(tmp_path / "d.zarr", size=84)
    buf.add_episode(
        {"state": np.zeros((2, 3), np.float32), "image_cam": np.zeros((2, 84, 84, 3), np.uint8), "action": np.zeros((2, 2), np.float32)},
        task="t9",
        source="teleop",
    )
    reopened = ReplayBuffer.open(tmp_path / "d.zarr")
    assert reopened.episode_sources == [""] * 4 + ["teleop"]
    table = reopened.episode_table()
    assert table[4] == {"episode": 4, "task": "t9", "success": True, "length": 2, "seed": -1, "source": "teleop"}
    assert table[2]["success"] is False and table[1]["length"] == 9
    # images are chunked a few frames at a time, low-dim keys in large chunks
    assert reopened.array("image_cam").chunks[0] == 6
    assert reopened.array("state").chunks[0] == 4096
    with pytest.raises(UserError, match="no spec"):
        ReplayBuffer.create(tmp_path / "x.zarr", DatasetMeta(specs={"action": KeySpec((1,), "float32")}), chunk_rows={"img": 2})


def test_episode_selection_filters_and_split(tmp_path):
    meta = DatasetMeta(specs={"action": KeySpec((1,), "float32")})
    buf = ReplayBuffer.create(tmp_path / "d.zarr", meta)
    for e in range(30):
        buf.add_episode({"action": np.full((2, 1), e, np.float32)}, task=f"task{e % 3}", success=e % 5 != 0)
    assert select_episodes(buf).all()
    ok = select_episodes(buf, EpisodeSelection(successful_only=True))
    assert ok.sum() == 24 and not ok[0] and not ok[5]
    t1 = select_episodes(buf, EpisodeSelection(tasks=["task1"], max_episodes=4))
    assert np.flatnonzero(t1).tolist() == [1, 4, 7, 10]
    train = select_episodes(buf, EpisodeSelection(val_ratio=0.2, split="train", seed=3))
    val = select_episodes(buf, EpisodeSelection(val_ratio=0.2, split="val", seed=3))
    assert not (train & val).any() and (train | val).all()
    assert val.sum() == 6
    assert sorted(np.array(buf.episode_tasks)[val]) == ["task0"] * 2 + ["task1"] * 2 + ["task2"] * 2  # stratified
    assert np.array_equal(val, select_episodes(buf, EpisodeSelection(val_ratio=0.2, split="val", seed=3)))
    assert not np.array_equal(val, select_episodes(buf, EpisodeSelection(val_ratio=0.2, split="val", seed=4)))
    with pytest.raises(UserError, match=r"tasks \['nope'\] have no episodes"):
        select_episodes(buf, EpisodeSelection(tasks=["nope"]))
    with pytest.raises(UserError, match="split=val needs val_ratio"):
        EpisodeSelection(split="val")


# ---------------------------------------------------------------------- windows
def test_vectorized_index_matches_per_episode_loop():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 20, size=50)
    ends = np.cumsum(lengths)
    mask = rng.random(50) < 0.7
    s = SequenceSampler(ends, {"x": [0]}, mask)
    starts = ends - lengths
    loop = np.concatenate([np.arange(a, b) for a, b, m in zip(starts, ends, mask) if m])
    np.testing.assert_array_equal(s.anchor, loop)


@pytest.mark.parametrize("chunk", [None, 1, 5])
def test_zarr_windows_equal_in_memory_windows(tmp_path, chunk):
    buf = make_image_dataset(tmp_path / "d.zarr", chunk=chunk)
    offsets = {"state": range(-1, 1), "image_cam": [-1, 0], "action": range(0, 5)}
    mask = np.array([True, True, False, True])
    extras = {"task": buf.episode_task_index}
    mem = make_windows(buf, offsets, mask, extras)
    disk = make_windows(buf, offsets, mask, extras, in_memory=False, cache_keys=["action"])
    assert isinstance(mem, InMemoryWindows) and isinstance(disk, ZarrWindows)
    assert len(mem) == len(disk) == 6 + 9 + 7
    ids = np.random.default_rng(0).integers(0, len(mem), size=40)
    a, b = mem.batch(ids), disk.batch(ids)
    assert set(a) == set(b) == {"state", "image_cam", "action", "task"}
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert b["image_cam"].dtype == torch.uint8 and b["image_cam"].shape == (40, 2, 12, 12, 3)
    # first window of episode 1: previous frame is edge-padded, pixel (0,0,0) encodes (e, t)
    first_of_ep1 = int(np.flatnonzero(disk.sampler.episode_index == 1)[0])
    assert disk[first_of_ep1]["image_cam"][:, 0, 0, 0].tolist() == [10, 10]


def test_window_loader_with_workers_delivers_the_same_windows(tmp_path):
    buf = make_image_dataset(tmp_path / "d.zarr", chunk=3)
    offsets = {"state": [-1, 0], "image_cam": [0], "action": range(0, 3)}
    disk = make_windows(buf, offsets, in_memory=False)
    mem = make_windows(buf, offsets)
    seen = []
    for batch in window_loader(disk, batch_size=8, num_workers=2, seed=5, drop_last=False):
        ep = batch["state"][:, 1, 0].numpy()
        # state[:, 0] = 100 e + t identifies each window's anchor row
        rows = np.array([buf.episode_starts[int(v // 100)] + int(v % 100) for v in ep])
        ids = np.searchsorted(mem.sampler.anchor, rows)
        ref = mem.batch(ids)
        for k in offsets:
            assert torch.equal(batch[k], ref[k]), k
        seen.extend(ids.tolist())
    assert sorted(seen) == list(range(len(mem)))  # every window once per epoch


def test_zarr_windows_read_diffusion_policy_v2_store(tmp_path):
    path = tmp_path / "v2.zarr"
    root = zarr.open_group(str(path), mode="w", zarr_format=2)
    n = 11
    root.create_array("data/img", shape=(n, 8, 8, 3), chunks=(3, 8, 8, 3), dtype="uint8")
    root.create_array("data/action", shape=(n, 2), chunks=(n, 2), dtype="float32")
    root.create_array("meta/episode_ends", shape=(2,), chunks=(2,), dtype="int64")
    img = np.arange(n * 8 * 8 * 3).reshape(n, 8, 8, 3).astype(np.uint8)
    root["data/img"][:] = img
    root["data/action"][:] = np.arange(2 * n).reshape(n, 2)
    root["meta/episode_ends"][:] = [5, 11]
    buf = ReplayBuffer.open(path)
    w = make_windows(buf, {"img": [-1, 0], "action": [0, 1]}, in_memory=False)
    b = w.batch(np.array([0, 5, 10]))
    np.testing.assert_array_equal(b["img"][1].numpy(), img[[5, 5]])
    np.testing.assert_array_equal(b["action"][2].numpy(), [[20, 21], [20, 21]])
    # converted to this package's v3 layout (as `mixpolicy data convert` does), unchanged
    from mixpolicy.datasets.commands import copy_store

    v3 = copy_store(buf, tmp_path / "v3.zarr", np.ones(2, bool), progress=False)
    assert v3.root.metadata.zarr_format == 3 and v3.episode_lengths.tolist() == [5, 6]
    np.testing.assert_array_equal(v3.get_episode(1)["img"], img[5:])


# ---------------------------------------------------------------------- augmentation
def test_batch_augment_crop_shift_and_colour_per_sample():
    x = torch.randint(0, 256, (6, 2, 10, 10, 3), dtype=torch.uint8)
    aug = BatchImageAugment(ImageAugmentConfig(crop_size=8, shift_pad=2, brightness=0.3, contrast=0.3, saturation=0.3, hue=0.1, hue_groups=2))
    g = torch.Generator().manual_seed(0)
    y = aug(x, g)
    assert y.shape == (6, 2, 3, 8, 8) and y.dtype == torch.float32
    assert 0 <= y.min() and y.max() <= 1
    aug.eval()
    centre = aug(x)
    torch.testing.assert_close(centre, x[:, :, 1:9, 1:9].permute(0, 1, 4, 2, 3).float() / 255)
    assert aug(x[:, 0]).shape == (6, 3, 8, 8)

    # a shift moves both frames of a sample the same way, and samples differently
    frame = torch.arange(100, dtype=torch.uint8).reshape(1, 1, 10, 10, 1).repeat(16, 2, 1, 1, 3)
    shifted = BatchImageAugment(ImageAugmentConfig(shift_pad=3))(frame, torch.Generator().manual_seed(1))
    assert torch.equal(shifted[:, 0], shifted[:, 1])
    assert len({tuple(s[0, 0, 5].tolist()) for s in shifted}) > 1
    # brightness draws one factor per sample
    flat = torch.full((16, 1, 4, 4, 3), 128, dtype=torch.uint8)
    bright = BatchImageAugment(ImageAugmentConfig(brightness=0.5))(flat, torch.Generator().manual_seed(2))
    per_sample = bright.flatten(1).std(1)
    assert torch.all(per_sample < 1e-6) and bright[:, 0, 0, 0, 0].unique().numel() == 16


def test_damaged_chunks_and_wrong_dtypes_are_one_clear_error(tmp_path):
    buf = make_image_dataset(tmp_path / "d.zarr", chunk=2)
    with pytest.raises(UserError, match="key 'image_cam': dtype float64 cannot be stored as the dataset's uint8"):
        buf.add_episode({"state": np.zeros((2, 3), np.float32), "image_cam": np.zeros((2, 12, 12, 3)), "action": np.zeros((2, 2), np.float32)})
    buf.add_episode({"state": np.zeros((2, 3)), "image_cam": np.zeros((2, 12, 12, 3), np.uint8), "action": np.zeros((2, 2), np.int64)})
    (tmp_path / "d.zarr" / "data" / "image_cam" / "c" / "1" / "0" / "0" / "0").write_bytes(b"\x00broken")
    reopened = ReplayBuffer.open(tmp_path / "d.zarr")
    with pytest.raises(UserError, match=r"data/image_cam rows 0-5 cannot be read .*mixpolicy data validate"):
        reopened.get_episode(0)
    with pytest.raises(UserError, match="cannot be read"):
        reopened.load(["image_cam"])
    windows = make_windows(reopened, {"image_cam": [0]}, in_memory=False)
    with pytest.raises(UserError, match="chunk cannot be decoded"):
        windows.batch(np.arange(6))
    assert windows.batch(np.array([0, 1]))["image_cam"].shape == (2, 1, 12, 12, 3)  # intact chunks still read
