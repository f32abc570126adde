"""Property test of SafetyFilter: bad bounds are refused, every output keeps every limit."""

import numpy as np
import pytest

from mixpolicy.config import ConfigError
from mixpolicy.deploy.safety import SafetyConfig, SafetyFilter
from mixpolicy.errors import UserError

TOL = 1e-9


def random_bounds(rng, dim):
    low = rng.uniform(-3, 1, dim)
    high = low + rng.uniform(0.0, 3, dim) * (rng.random(dim) > 0.1)  # some dims have low == high
    return low, high


def test_construction_refuses_bounds_it_could_not_enforce():
    rng = np.random.default_rng(0)
    bad_values = (np.nan, np.inf, -np.inf)
    refused = 0
    for _ in range(300):
        dim = int(rng.integers(1, 8))
        low, high = random_bounds(rng, dim)
        kind = rng.integers(4)
        i = int(rng.integers(dim))
        if kind == 0:
            low[i] = bad_values[rng.integers(3)]
        elif kind == 1:
            high[i] = bad_values[rng.integers(3)]
        elif kind == 2:
            low[i], high[i] = high[i] + 0.5, low[i]  # reversed
        else:
            continue
        with pytest.raises(UserError, match="not finite|low > high"):
            SafetyFilter(low, high)
        refused += 1
    assert refused > 150
    for delta in ([np.nan] * 2, [0.0, 0.1], [-1.0, 1.0], [np.inf, 1.0]):
        with pytest.raises(UserError, match="max_delta must be 2 finite values > 0"):
            SafetyFilter([-1, -1], [1, 1], max_delta=delta)
    with pytest.raises(UserError, match="max_jerk"):
        SafetyFilter([-1, -1], [1, 1], max_jerk=[np.nan, 1.0])
    with pytest.raises(UserError, match="low has 2 values and high 3"):
        SafetyFilter([-1, -1], [1, 1, 1])
    with pytest.raises(UserError, match="discrete dims"):
        SafetyFilter([-1, -1], [1, 1], discrete_dims=[2])
    # The config refuses them too, naming the field.
    with pytest.raises(ConfigError, match="safety.action_low.*finite"):
        SafetyConfig(action_low=[float("nan")], action_high=[1.0])
    with pytest.raises(ConfigError, match="safety.action_low.*<= action_high"):
        SafetyConfig(action_low=[1.0], action_high=[0.0])
    with pytest.raises(ConfigError, match="safety.max_jerk"):
        SafetyConfig(max_jerk=[float("inf")])


def test_every_output_is_finite_in_bounds_and_within_delta_and_jerk_limits():
    rng = np.random.default_rng(1)
    for case in range(200):
        dim = int(rng.integers(1, 7))
        low, high = random_bounds(rng, dim)
        delta = rng.uniform(0.01, 0.5, dim)
        jerk = rng.uniform(0.005, 0.2, dim) if rng.random() < 0.8 else None
        discrete = [int(d) for d in np.flatnonzero(rng.random(dim) < 0.2)]
        f = SafetyFilter(low, high, delta, jerk, discrete)
        cont = np.ones(dim, bool)
        cont[discrete] = False
        # An episode that starts far from its first chunk: the pose at one end, actions at the other.
        pose = np.where(rng.random(dim) < 0.5, low, high) if case % 2 else rng.uniform(low, high)
        f.reset(pose)
        prev, prev_d = pose, np.zeros(dim)
        target = np.where(pose == low, high + 5, low - 5)
        for step in range(80):
            a = target if step < 20 else rng.normal(0, 4, dim)  # far away, then anywhere (out of bounds too)
            out = f.filter(a)
            assert np.all(np.isfinite(out))
            assert np.all(out >= low - TOL) and np.all(out <= high + TOL)
            d = out - prev
            assert np.all(np.abs(d[cont]) <= delta[cont] + TOL), (case, step)
            if jerk is not None:
                assert np.all(np.abs(d - prev_d)[cont] <= jerk[cont] + TOL), (case, step)
            f.check_sendable(out)
            prev, prev_d = out, d


def test_first_action_is_limited_from_the_seeded_pose():
    f = SafetyFilter([-1, -1], [1, 1], max_delta=[0.1, 0.1], max_jerk=[0.05, 0.05])
    f.reset(np.array([0.8, -0.8]))
    np.testing.assert_allclose(f.filter([-1.0, 1.0]), [0.75, -0.75])  # jerk from rest: 0.05
    np.testing.assert_allclose(f.filter([-1.0, 1.0]), [0.65, -0.65])
    with pytest.raises(ValueError, match="outside the action bounds in dims \\[1\\]"):
        f.reset(np.array([0.0, 1.5]))
    with pytest.raises(ValueError, match="not 2 finite values"):
        f.reset(np.array([0.0, np.nan]))


def test_the_filter_brakes_before_a_bound_instead_of_stopping_there():
    f = SafetyFilter([0.0], [1.0], max_delta=[0.2], max_jerk=[0.02])
    f.reset(np.array([0.0]))
    xs = [f.filter([5.0])[0] for _ in range(200)]
    d = np.diff([0.0, *xs])
    assert xs[-1] == pytest.approx(1.0, abs=0.02) and max(xs) <= 1.0
    assert np.all(np.abs(np.diff([0.0, *d])) <= 0.02 + TOL)


def test_a_stop_command_keeps_bounds_and_delta_but_not_jerk():
    f = SafetyFilter([-1.0], [1.0], max_delta=[0.3], max_jerk=[0.05])
    f.reset(np.array([0.0]))
    for _ in range(10):
        x = f.filter([1.0])
    out = f.filter(x, stop=True)  # hold where it is: the step drops to zero at once
    np.testing.assert_allclose(out, x)
    with pytest.raises(ValueError, match="refused to send"):
        f.check_sendable(np.array([np.nan]))
    with pytest.raises(ValueError, match="refused to send"):
        f.check_sendable(np.array([1.5]))


def test_real_robots_take_limits_and_discrete_dims_from_the_local_config():
    # A remote spec marking every dim discrete would switch rate limiting off.
    cfg = SafetyConfig(action_low=[-1.0], action_high=[1.0], max_delta=[0.1])
    f = SafetyFilter.from_config(cfg, 2, [-9, -9], [9, 9], discrete_dims=[0, 1], local_limits=True)
    assert f.rate_limited.tolist() == [True, True] and f.high.tolist() == [1.0, 1.0]
    f.reset(np.zeros(2))
    np.testing.assert_allclose(f.filter([1.0, -1.0]), [0.1, -0.1])
    with pytest.raises(UserError, match="a real robot needs local limits"):
        SafetyFilter.from_config(SafetyConfig(max_delta=[0.1]), 2, [-1, -1], [1, 1], local_limits=True)
    with pytest.raises(UserError, match="a real robot needs local limits"):
        SafetyFilter.from_config(SafetyConfig(action_low=[-1.0], action_high=[1.0]), 2, [-1, -1], [1, 1], local_limits=True)
    # The policy's training range with a NaN (a broken normalizer) is refused when the filter is built.
    with pytest.raises(UserError, match="action bounds \\(robot or training range\\) are not finite"):
        SafetyFilter.from_config(SafetyConfig(), 2, [np.nan, -1], [1, 1])
