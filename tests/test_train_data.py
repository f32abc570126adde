"""`mixpolicy train` reaches the data layer: storage by a memory budget, workers, saved stats,
normalizer modes, on-device augmentation and a validation loss."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mixpolicy.config import ConfigError, from_dict
from mixpolicy.datasets.replay_buffer import DatasetMeta, KeySpec, ReplayBuffer
from mixpolicy.datasets.sampler import InMemoryWindows, ZarrWindows
from mixpolicy.train.setup import build_training_data
from mixpolicy.train.trainer import TrainConfig, Trainer
from mixpolicy.train.validation import validation_ids

from factories import make_dataset

SMALL = dict(network=dict(width=32, depth=1, heads=2), horizon=4, n_action_steps=2, obs_hidden=32, objective=dict(num_train_timesteps=10, num_inference_steps=2))
IMAGE_POLICY = dict(SMALL, obs_keys=["proprio", "image_cam"], image_encoder=dict(crop_size=36, num_keypoints=4))
LENGTHS = (30, 25, 40, 33)  # episode 1 fails: 103 training windows


def _cfg(tmp_path, **kw) -> TrainConfig:
    d = dict(dataset=str(tmp_path / "d.zarr"), out_dir=str(tmp_path / "run"), steps=4, batch_size=8, log_every=1, progress=False, policy=SMALL, warmup_steps=2, num_threads=1)
    d.update(kw)
    return from_dict(TrainConfig, d)


def _state(run: Path) -> dict[str, torch.Tensor]:
    tensors = load_file(str(run / "checkpoints" / "last" / "training_state.safetensors"))
    return {k: v for k, v in tensors.items() if k.startswith(("model.", "ema.", "optim."))}


def _metrics(run: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def make_image_store(path, lengths=(6, 5, 7, 6), size=40, static=False, dtype="uint8", channels=3, seed=0):
    """proprio (4) + image_cam + action (3); ``static``: each episode shows one frame throughout."""
    meta = DatasetMeta(
        fps=15.0,
        obs_keys=["proprio", "image_cam"],
        action_key="action",
        specs={"proprio": KeySpec((4,), "float32"), "image_cam": KeySpec((size, size, channels), dtype), "action": KeySpec((3,), "float32")},
    )
    buf = ReplayBuffer.create(path, meta)
    rng = np.random.default_rng(seed)
    for e, n in enumerate(lengths):
        frames = rng.integers(0, 256, (1 if static else n, size, size, channels)).astype(dtype)
        buf.add_episode(
            {
                "proprio": rng.normal(size=(n, 4)).astype(np.float32),
                "image_cam": np.repeat(frames, n, 0) if static else frames,
                "action": rng.uniform(-1, 1, (n, 3)).astype(np.float32),
            },
            task=f"t{e % 2}",
            success=True,
            seed=e,
        )
    buf.close()
    return path


def assert_same_states(a: Path, b: Path) -> None:
    ref, got = _state(a), _state(b)
    assert ref.keys() == got.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=0, msg=k)


# ---------------------------------------------------------------------- storage
def test_disk_windows_give_the_in_memory_batches_and_train_identically_with_workers(tmp_path):
    make_dataset(tmp_path / "d.zarr", lengths=LENGTHS)
    mem = build_training_data(_cfg(tmp_path, data={"storage": "memory"}), {"state": range(-1, 1), "action": range(0, 4)})
    disk = build_training_data(_cfg(tmp_path, data={"storage": "disk"}), {"state": range(-1, 1), "action": range(0, 4)})
    assert isinstance(mem.windows, InMemoryWindows) and isinstance(disk.windows, ZarrWindows)
    assert (mem.storage, disk.storage) == ("memory", "disk") and len(mem.windows) == len(disk.windows) == 103
    # memory holds only the selected episodes' rows (the failed episode 1 is not loaded)
    assert mem.windows.arrays["state"].shape[0] == 30 + 40 + 33
    ids = np.random.default_rng(0).integers(0, 103, 64)
    a, b = mem.windows.batch(ids), disk.windows.batch(ids)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for p_mem, p_disk in zip(mem.normalizer.state_dict().values(), disk.normalizer.state_dict().values()):
        assert torch.equal(p_mem, p_disk)

    Trainer(_cfg(tmp_path, out_dir=str(tmp_path / "memory"), data={"storage": "memory"})).run()
    Trainer(_cfg(tmp_path, out_dir=str(tmp_path / "disk"), data={"storage": "disk"})).run()
    Trainer(_cfg(tmp_path, out_dir=str(tmp_path / "disk_workers"), data={"storage": "disk"}, loader={"num_workers": 2, "prefetch_factor": 2})).run()
    assert_same_states(tmp_path / "memory", tmp_path / "disk")
    assert_same_states(tmp_path / "memory", tmp_path / "disk_workers")
    # where windows live changes no number: a run resumed from disk ends where the in-memory one did
    Trainer(_cfg(tmp_path, out_dir=str(tmp_path / "switched"), data={"storage": "memory"})).run(until=2)
    Trainer(_cfg(tmp_path, out_dir=str(tmp_path / "switched"), data={"storage": "disk"}, resume=True)).run()
    assert_same_states(tmp_path / "memory", tmp_path / "switched")


def test_image_windows_from_disk_equal_memory_and_auto_switches_at_the_budget(tmp_path):
    make_image_store(tmp_path / "d.zarr")
    offsets = {"proprio": range(-1, 1), "image_cam": range(-1, 1), "action": range(0, 4)}
    policy = dict(IMAGE_POLICY)
    rows = 6 + 5 + 7 + 6
    data_bytes = rows * (4 * 4 + 40 * 40 * 3 + 3 * 4)

    def build(**data):
        return build_training_data(_cfg(tmp_path, policy=policy, data=data), offsets)

    fits, over = build(memory_budget_gb=data_bytes / 2**30), build(memory_budget_gb=(data_bytes - 1) / 2**30)
    assert (fits.storage, over.storage) == ("memory", "disk")
    assert isinstance(fits.windows, InMemoryWindows) and isinstance(over.windows, ZarrWindows)
    assert sorted(over.windows.cache) == ["action", "proprio"]  # low-dim keys fit the budget: kept in memory
    ids = np.arange(len(fits.windows))
    a, b = fits.windows.batch(ids), over.windows.batch(ids)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert build(storage="memory", memory_budget_gb=1e-9).storage == "memory"
    tiny = build(storage="disk", memory_budget_gb=1e-9)
    assert tiny.storage == "disk" and tiny.windows.cache == {}  # nothing fits: every key from disk


def _peak_bytes_of_training_data(tmp_path: Path, path: Path, storage: str) -> int:
    """Peak of numpy/Python allocations while building the windows and reading 8 batches."""
    cfg = _cfg(tmp_path, dataset=str(path), policy=dict(IMAGE_POLICY), data={"storage": storage, "memory_budget_gb": 1e-6})
    offsets = {"proprio": range(-1, 1), "image_cam": range(-1, 1), "action": range(0, 4)}
    tracemalloc.start()
    try:
        data = build_training_data(cfg, offsets)
        if storage == "disk":
            data.windows.chunk_cache_bytes = 256 << 10
        rng = np.random.default_rng(0)
        for _ in range(8):
            data.windows.batch(rng.integers(0, len(data.windows), 32))
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_disk_storage_keeps_memory_flat_for_a_store_ten_times_larger(tmp_path):
    small = make_image_store(tmp_path / "small.zarr", lengths=[50] * 4, size=32)  # 200 frames, 0.6 MB of images
    large = make_image_store(tmp_path / "large.zarr", lengths=[500] * 4, size=32)  # 2,000 frames, 6 MB
    _peak_bytes_of_training_data(tmp_path, small, "disk")  # first-use allocations of the libraries
    on_disk = [_peak_bytes_of_training_data(tmp_path, p, "disk") for p in (small, large)]
    loaded = _peak_bytes_of_training_data(tmp_path, large, "memory")
    assert loaded > 6_000_000  # loading holds the images
    assert on_disk[1] < 1.25 * on_disk[0], on_disk  # measured: 0.88 MB and 0.90 MB
    assert on_disk[1] < 2_000_000, on_disk


# ---------------------------------------------------------------------- normalizer
def test_saved_stats_are_used_when_they_cover_the_keys_and_modes_come_from_the_config(tmp_path):
    buf = make_dataset(tmp_path / "d.zarr", lengths=LENGTHS)
    offsets = {"state": range(-1, 1), "action": range(0, 4)}
    computed = build_training_data(_cfg(tmp_path), offsets)
    assert computed.stats_source == "computed"
    real = buf.compute_stats(["state", "action"])
    fake = {k: {n: (v * 0 + 7.0 if n == "max" else v * 0 - 3.0 if n == "min" else v) for n, v in s.items()} for k, s in real.items()}
    buf.save_stats({"state": fake["state"]})  # does not cover the action: computed from the data
    assert build_training_data(_cfg(tmp_path), offsets).stats_source == "computed"
    buf.save_stats({"action": fake["action"]})
    saved = build_training_data(_cfg(tmp_path), offsets)
    assert saved.stats_source == "saved"
    np.testing.assert_allclose(saved.normalizer.params["state"].scale.numpy(), 2 / 10)  # [-3, 7] -> [-1, 1]
    np.testing.assert_allclose(saved.normalizer.params["state"].offset.numpy(), -1 + 3 * 2 / 10, rtol=1e-6)
    ignored = build_training_data(_cfg(tmp_path, normalizer={"saved_stats": False}), offsets)
    assert ignored.stats_source == "computed"
    for p, q in zip(ignored.normalizer.state_dict().values(), computed.normalizer.state_dict().values()):
        assert torch.equal(p, q)

    modes = build_training_data(_cfg(tmp_path, normalizer={"mode": "mean_std", "modes": {"action": "identity"}, "saved_stats": False}), offsets)
    stats = ReplayBuffer.open(tmp_path / "d.zarr").compute_stats(["state"], np.array([True, False, True, True]))
    np.testing.assert_allclose(modes.normalizer.params["state"].scale.numpy(), 1 / stats["state"]["std"], rtol=1e-5)
    np.testing.assert_allclose(modes.normalizer.params["state"].offset.numpy(), -stats["state"]["mean"] / stats["state"]["std"], rtol=1e-4, atol=1e-6)
    assert torch.equal(modes.normalizer.params["action"].scale[:2], torch.ones(2))  # discrete dim scaled by policy.discrete_action_scale
    assert torch.equal(modes.normalizer.params["action"].offset, torch.zeros(3))
    with pytest.raises(ConfigError, match="'normalizer.modes.state': must be one of"):
        _cfg(tmp_path, normalizer={"modes": {"state": "zscore"}})


# ---------------------------------------------------------------------- augmentation
def test_augmentation_changes_training_batches_only_with_one_draw_per_sample(tmp_path, monkeypatch):
    make_image_store(tmp_path / "d.zarr", static=True)
    seen: list[tuple[bool, torch.Tensor]] = []

    def record(trainer):
        original = trainer.policy.compute_loss

        def compute_loss(batch, generator=None):
            seen.append((trainer.policy.training, batch["image_cam"].clone()))
            return original(batch, generator)

        monkeypatch.setattr(trainer.policy, "compute_loss", compute_loss)
        return trainer

    aug = {"shift_pad": 4, "brightness": 0.4, "contrast": 0.3}
    cfg = dict(policy=dict(IMAGE_POLICY), batch_size=4, steps=2, val_ratio=0.3, val_every=2, val_windows=4)
    t = record(Trainer(_cfg(tmp_path, out_dir=str(tmp_path / "aug"), augment=aug, **cfg)))
    t.run()
    train_batches = [x for training, x in seen if training]
    val_batches = [x for training, x in seen if not training]
    assert len(train_batches) == 2 and len(val_batches) == 1
    raw = t.windows.batch(t.sampler.global_batch(0))["image_cam"]
    x = train_batches[0]
    assert x.dtype == torch.uint8 and x.shape == raw.shape == (4, 2, 40, 40, 3)
    assert not torch.equal(x, raw)
    assert torch.equal(x[:, 0], x[:, 1])  # the same frame twice stays the same: one draw per sample
    assert not torch.equal(x[0], x[1])  # while samples differ
    # validation (eval mode) sees the frames as they are in the store
    assert torch.equal(val_batches[0], t.data.val_windows.batch(validation_ids(len(t.data.val_windows), 4))["image_cam"])

    seen.clear()
    record(Trainer(_cfg(tmp_path, out_dir=str(tmp_path / "again"), augment=aug, **cfg))).run()
    assert torch.equal(seen[0][1], x)  # reproduced from the seed
    seen.clear()
    record(Trainer(_cfg(tmp_path, out_dir=str(tmp_path / "crop"), augment={"crop_size": 36}, **cfg))).run()
    assert seen[0][1].shape == (4, 2, 36, 36, 3)  # cropped once, here; the encoder's crop of 36 leaves it
    with pytest.raises(ConfigError, match=r"'augment.crop_size': 30 contradicts policy.image_encoder.crop_size=36"):
        Trainer(_cfg(tmp_path, out_dir=str(tmp_path / "bad"), augment={"crop_size": 30}, **cfg))
    with pytest.raises(ConfigError, match="'augment': is set but policy.obs_keys has no image_<camera> key"):
        Trainer(_cfg(tmp_path, out_dir=str(tmp_path / "bad"), augment={"shift_pad": 2}, policy=dict(SMALL, obs_keys=["proprio"])))


# ---------------------------------------------------------------------- validation
def test_validation_loss_is_logged_repeatable_and_leaves_training_alone(tmp_path):
    make_dataset(tmp_path / "d.zarr", lengths=(30, 25, 40, 33, 28, 31))
    plain = Trainer(_cfg(tmp_path, out_dir=str(tmp_path / "plain"), steps=4, val_ratio=0.34))
    plain.run()
    t = Trainer(_cfg(tmp_path, out_dir=str(tmp_path / "val"), steps=4, val_ratio=0.34, val_every=2, val_windows=16))
    t.run()
    assert_same_states(tmp_path / "plain", tmp_path / "val")  # validating does not change what is trained
    val = _metrics(tmp_path / "val", "val")
    assert [r["step"] for r in val] == [2, 4]
    assert all(np.isfinite(r["loss"]) and r["windows"] == 16 for r in val)
    assert len(t.windows) + len(t.data.val_windows) == 30 + 40 + 33 + 28 + 31  # successful episodes, split
    assert not set(t.windows.sampler.episode_index.tolist()) & set(t.data.val_windows.sampler.episode_index.tolist())
    with t.ema_weights():
        first = t.validation(t.policy, t.device, None)
        assert t.validation(t.policy, t.device, None) == first  # fixed windows and noise: comparable figures
    assert first["loss"] == pytest.approx(val[-1]["loss"], rel=1e-6)
    assert (tmp_path / "val" / "tb").is_dir()
    with pytest.raises(ConfigError, match="'val_every': needs val_ratio > 0"):
        _cfg(tmp_path, val_every=5)
