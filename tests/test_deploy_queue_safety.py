"""Action queue (timestamps, seams) and the safety filter (bounds, delta, jerk)."""

import numpy as np
import pytest

from mixpolicy.deploy.action_queue import ActionQueue
from mixpolicy.deploy.safety import SafetyConfig, SafetyFilter
from mixpolicy.config import ConfigError


def const_chunk(value, h=6, dim=2):
    return np.full((h, dim), float(value))


def test_past_actions_are_dropped_and_ticks_map_to_chunk_indices():
    q = ActionQueue(2)
    chunk = np.arange(12, dtype=float).reshape(6, 2)
    info = q.merge(chunk, start_tick=10, now=13)  # planned at tick 10, arrived at tick 13
    assert info.dropped == 3 and info.kept == 3
    assert q.depth(13) == 3 and q.end_tick() == 15
    action, _ = q.pop(13)
    np.testing.assert_array_equal(action, chunk[3])
    action, _ = q.pop(15)  # tick 14 is in the past now
    np.testing.assert_array_equal(action, chunk[5])
    assert q.pop(16) is None and len(q) == 0


def test_seam_none_replaces_and_reports_the_raw_jump():
    q = ActionQueue(2, seam="none")
    q.merge(const_chunk(0.0), 0, 0)
    info = q.merge(const_chunk(1.0), 2, 3)
    assert info.raw_jump == pytest.approx(1.0)
    a, src = q.pop(3)
    np.testing.assert_array_equal(a, [1.0, 1.0])
    assert src == 2


def test_seam_blend_moves_linearly_from_old_to_new():
    q = ActionQueue(2, seam="blend", blend_steps=3)
    q.merge(const_chunk(0.0, h=10), 0, 0)
    q.merge(const_chunk(1.0, h=10), 2, 2)
    got = [q.pop(t)[0][0] for t in range(2, 8)]
    np.testing.assert_allclose(got, [0.25, 0.5, 0.75, 1.0, 1.0, 1.0])


def test_seam_ensemble_is_the_weighted_mean_of_all_predictions():
    coeff = 0.5
    q = ActionQueue(1, seam="ensemble", ensemble_coeff=coeff)
    q.merge(np.full((4, 1), 0.0), 0, 0)
    q.merge(np.full((4, 1), 1.0), 1, 1)
    q.merge(np.full((4, 1), 2.0), 2, 2)
    w = np.exp(-coeff * np.arange(3))  # oldest prediction first
    a, _ = q.pop(3)
    assert a[0] == pytest.approx((w * [0, 1, 2]).sum() / w.sum())


def test_discrete_dims_are_never_averaged():
    q = ActionQueue(2, seam="blend", blend_steps=4, discrete_dims=[1])
    q.merge(np.tile([0.0, -1.0], (6, 1)), 0, 0)
    q.merge(np.tile([1.0, 1.0], (6, 1)), 1, 1)
    a, _ = q.pop(1)
    assert a[1] == 1.0 and 0 < a[0] < 1


def test_safety_bounds_delta_and_jerk():
    f = SafetyFilter([-1, -1], [1, 1], max_delta=[0.3, 0.3], max_jerk=[0.1, 0.1])
    np.testing.assert_allclose(f.filter([2.0, -5.0]), [1.0, -1.0])  # bounds
    np.testing.assert_allclose(f.filter([0.0, 0.0]), [0.7, -0.7])  # delta limit
    np.testing.assert_allclose(f.filter([0.0, 0.0]), [0.4, -0.4])  # delta 0.3 again: jerk 0
    out = f.filter([0.4, -0.4])  # wants delta 0 from -0.3: jerk limit allows -0.2
    np.testing.assert_allclose(out, [0.2, -0.2])
    with pytest.raises(ValueError, match="non-finite"):
        f.filter([np.nan, 0.0])


def test_discrete_dims_are_bounded_but_not_rate_limited():
    f = SafetyFilter([-1, -1], [1, 1], max_delta=[0.1, 0.1], discrete_dims=[1])
    f.filter([0.0, -1.0])
    np.testing.assert_allclose(f.filter([1.0, 1.0]), [0.1, 1.0])


def test_safety_config_validation():
    with pytest.raises(ConfigError, match="safety.max_delta"):
        SafetyConfig(max_delta=[0.0])
    with pytest.raises(ConfigError, match="safety.action_low"):
        SafetyConfig(action_low=[0.0], action_high=[])
    from mixpolicy.errors import UserError

    with pytest.raises(UserError, match="3 values for 2 action dims"):
        SafetyFilter.from_config(SafetyConfig(max_jerk=[1, 1, 1]), 2, [-1, -1], [1, 1])
