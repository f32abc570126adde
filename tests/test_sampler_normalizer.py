import numpy as np
import pytest
import torch

from mixpolicy.datasets.normalizer import Normalizer
from mixpolicy.datasets.sampler import InMemoryWindows, SequenceSampler
from mixpolicy.errors import UserError


def test_windows_pad_with_edge_values_at_episode_boundaries():
    ends = np.array([5, 8])  # episodes [0, 5) and [5, 8)
    s = SequenceSampler(ends, {"obs": range(-1, 1), "act": range(0, 4)})
    assert len(s) == 8
    rows = s.rows(np.arange(8))
    # first step of each episode repeats itself as the previous observation
    np.testing.assert_array_equal(rows["obs"][0], [0, 0])
    np.testing.assert_array_equal(rows["obs"][5], [5, 5])
    np.testing.assert_array_equal(rows["obs"][6], [5, 6])
    # actions past an episode's end repeat its last step, never the next episode's
    np.testing.assert_array_equal(rows["act"][3], [3, 4, 4, 4])
    np.testing.assert_array_equal(rows["act"][4], [4, 4, 4, 4])
    np.testing.assert_array_equal(rows["act"][6], [6, 7, 7, 7])


def test_episode_mask_selects_windows_and_extras_follow_episodes():
    ends = np.array([2, 5, 6])
    s = SequenceSampler(ends, {"x": range(0, 1)}, episode_mask=np.array([True, False, True]))
    assert len(s) == 3
    np.testing.assert_array_equal(s.anchor, [0, 1, 5])
    w = InMemoryWindows({"x": np.arange(6, dtype=np.float32)[:, None]}, s, extras={"task": np.array([7, 8, 9])})
    b = w.batch(np.array([0, 2]))
    assert b["x"].shape == (2, 1, 1)
    assert b["task"].tolist() == [7, 9]
    assert w[1]["x"].item() == 1.0


def test_sampler_rejects_bad_input():
    with pytest.raises(UserError, match="mask"):
        SequenceSampler(np.array([3]), {"x": [0]}, episode_mask=np.array([True, True]))
    with pytest.raises(UserError, match="at least one key"):
        SequenceSampler(np.array([3]), {})
    s = SequenceSampler(np.array([3]), {"x": [0]})
    with pytest.raises(UserError, match="needed by the policy"):
        InMemoryWindows({"y": np.zeros((3, 1))}, s)


def test_normalizer_round_trip_and_constant_dims():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(100, 4)).astype(np.float32) * [1, 10, 0.1, 0]
    x[:, 3] = 5.0  # constant dimension
    n = Normalizer.from_data({"x": x})
    t = torch.from_numpy(x)
    y = n.normalize("x", t)
    assert y[:, :3].min() >= -1 - 1e-5 and y[:, :3].max() <= 1 + 1e-5
    np.testing.assert_allclose(y[:, :3].min(0).values, -1, atol=1e-5)
    np.testing.assert_allclose(y[:, :3].max(0).values, 1, atol=1e-5)
    assert torch.all(y[:, 3] == 0)  # guarded: no division by a zero range
    np.testing.assert_allclose(n.unnormalize("x", y), x, rtol=1e-5, atol=1e-4)


def test_normalizer_rejects_nan():
    x = np.zeros((4, 2))
    x[1, 1] = np.nan
    with pytest.raises(UserError, match="NaN"):
        Normalizer.from_data({"a": x})
