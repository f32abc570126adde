"""Safety layer between the action queue and the robot.

Every command sent to the robot, hold commands included, passes ``SafetyFilter.filter``:
action bounds, then a per-step delta limit (first difference) and a jerk limit (second
difference: the change of the per-step delta). The filter keeps its own history of
executed actions, seeded at every episode start with the robot's current pose, so the
limits hold from the first action on and across chunk seams. Discrete dims (the
gripper) are bounded but not rate-limited: they switch between two values by design.

Faults (``FAULTS``) stop the run cleanly: the loop sends the robot's hold action through
the filter (built from the last safe action) and leaves.
"""

from __future__ import annotations

import signal
import threading
from dataclasses import dataclass, field

import numpy as np

from mixpolicy.config import check
from mixpolicy.errors import UserError

# Every fault the control loop records, with what it means.
FAULTS = {
    "nan_action": "the policy returned a non-finite action",
    "bad_chunk": "the policy returned a chunk of the wrong shape",
    "stale_observation": "an observation older than safety.max_obs_age_ms",
    "bad_timestamp": "an observation timestamp that is not finite or lies in the future",
    "inference_overrun": "the action queue ran dry after the first chunk",
    "first_chunk_timeout": "no chunk within loop.first_chunk_timeout_s of the episode start",
    "inference_error": "the policy call raised",
    "robot_error": "the robot reported an error, or one of its calls raised",
    "bad_hold": "the robot's hold action is not finite or has the wrong shape",
    "start_out_of_bounds": "the robot's pose at the episode start lies outside the action bounds",
    "unsafe_action": "an action failed the last check before the robot (finite, within bounds)",
    "estop": "ControlLoop.estop() was called",
    "sigint": "SIGINT (Ctrl-C)",
    "sigterm": "SIGTERM",
}


@dataclass
class SafetyConfig:
    action_low: list[float] = field(default_factory=list)  # empty: the robot's bounds, else the training data range
    action_high: list[float] = field(default_factory=list)
    max_delta: list[float] = field(default_factory=list)  # per dim, or one value for all; empty: no limit
    max_jerk: list[float] = field(default_factory=list)  # per dim, or one value for all; empty: no limit
    discrete_dims: list[int] = field(default_factory=list)  # real robots: dims exempt from the rate limits (a policy's own are not trusted)
    max_obs_age_ms: float = 100.0
    stop_on_overrun: bool = True  # false: hold and wait for the late chunk instead of stopping

    def __post_init__(self):
        check(len(self.action_low) == len(self.action_high), "safety.action_low", "action_low and action_high need the same length")
        check(all(np.isfinite(v) for v in [*self.action_low, *self.action_high]), "safety.action_low", "bounds must be finite")
        check(all(lo <= hi for lo, hi in zip(self.action_low, self.action_high)), "safety.action_low", "must be <= action_high")
        check(all(np.isfinite(v) and v > 0 for v in self.max_delta), "safety.max_delta", "limits must be finite and > 0")
        check(all(np.isfinite(v) and v > 0 for v in self.max_jerk), "safety.max_jerk", "limits must be finite and > 0")
        check(all(v >= 0 for v in self.discrete_dims), "safety.discrete_dims", "dims must be >= 0")
        check(self.max_obs_age_ms > 0, "safety.max_obs_age_ms", "must be > 0")


def _per_dim(values: list[float], dim: int, name: str) -> np.ndarray | None:
    if not values:
        return None
    if len(values) == 1:
        return np.full(dim, float(values[0]))
    if len(values) != dim:
        raise UserError(f"safety.{name} has {len(values)} values for {dim} action dims (give 1 or {dim})")
    return np.asarray(values, np.float64)


def _braking_delta(room: np.ndarray, max_jerk: np.ndarray) -> np.ndarray:
    """The largest step toward a bound ``room`` away after which the step can still shrink by
    ``max_jerk`` per tick to zero without passing the bound.

    After a step d the position advances d + sum_k max(d - k J, 0) before stopping, which is
    (m + 1) d - J m (m + 1) / 2 with m = floor(d / J); solved for d.
    """
    room = np.maximum(room, 0.0)
    m = np.floor((np.sqrt(1.0 + 8.0 * room / max_jerk) - 1.0) / 2.0)
    return room / (m + 1.0) + max_jerk * m / 2.0


def _limit(values, dim: int, name: str) -> np.ndarray | None:
    if values is None:
        return None
    v = np.asarray(values, np.float64)
    if v.shape != (dim,) or not np.all(np.isfinite(v)) or not np.all(v > 0):
        raise UserError(f"{name} must be {dim} finite values > 0, got {v.tolist()}")
    return v


class SafetyFilter:
    """Bounds, delta and jerk limits; construction rejects bounds it could not enforce."""

    def __init__(self, low, high, max_delta=None, max_jerk=None, discrete_dims=(), source: str = "action bounds"):
        self.low = np.asarray(low, np.float64).reshape(-1)
        self.high = np.asarray(high, np.float64).reshape(-1)
        dim = self.low.shape[0]
        # np.clip with a NaN bound returns NaN: unusable bounds must never reach filter().
        if self.high.shape != (dim,) or dim == 0:
            raise UserError(f"{source}: low has {dim} values and high {self.high.shape[0]}")
        if not (np.all(np.isfinite(self.low)) and np.all(np.isfinite(self.high))):
            raise UserError(f"{source} are not finite (low {self.low.tolist()}, high {self.high.tolist()}); set safety.action_low/action_high")
        if np.any(self.low > self.high):
            bad = np.flatnonzero(self.low > self.high).tolist()
            raise UserError(f"{source} have low > high in dims {bad}; set safety.action_low/action_high")
        if any(not 0 <= d < dim for d in discrete_dims):
            raise UserError(f"discrete dims {list(discrete_dims)} are out of range for {dim} action dims")
        self.rate_limited = np.ones(dim, bool)
        self.rate_limited[list(discrete_dims)] = False
        self.max_delta = _limit(max_delta, dim, "safety.max_delta")
        self.max_jerk = _limit(max_jerk, dim, "safety.max_jerk")
        self.reset()

    @classmethod
    def from_config(cls, cfg: SafetyConfig, dim: int, default_low, default_high, discrete_dims=(), local_limits: bool = False) -> "SafetyFilter":
        """``local_limits``: a real robot, whose bounds, rate limits and discrete dims must come from ``cfg``."""
        low = _per_dim(cfg.action_low, dim, "action_low")
        high = _per_dim(cfg.action_high, dim, "action_high")
        if local_limits:
            if low is None or not cfg.max_delta:
                raise UserError("a real robot needs local limits: set safety.action_low, safety.action_high and safety.max_delta")
            discrete_dims = cfg.discrete_dims
        source = "safety.action_low/action_high" if low is not None else "action bounds (robot or training range)"
        return cls(
            default_low if low is None else low,
            default_high if high is None else high,
            _per_dim(cfg.max_delta, dim, "max_delta"),
            _per_dim(cfg.max_jerk, dim, "max_jerk"),
            discrete_dims,
            source=source,
        )

    def reset(self, pose: np.ndarray | None = None) -> None:
        """Forget the history (episode start); ``pose`` (the robot's current command) seeds it.

        Raises ValueError for a non-finite pose or one outside the bounds: no first action
        could then respect both the bounds and the delta limit.
        """
        self.clipped = 0  # actions changed by a limit since reset
        self.prev = None
        self.prev_delta = None
        if pose is None:
            return
        p = np.asarray(pose, np.float64)
        if p.shape != self.low.shape or not np.all(np.isfinite(p)):
            raise ValueError(f"the robot's pose {p.tolist()} is not {self.low.shape[0]} finite values")
        outside = np.flatnonzero((p < self.low) | (p > self.high)).tolist()
        if outside:
            raise ValueError(f"the robot's pose is outside the action bounds in dims {outside}: {p[outside].tolist()}")
        self.prev = p
        self.prev_delta = np.zeros_like(p)

    @property
    def last_safe(self) -> np.ndarray | None:
        return self.prev

    def filter(self, action: np.ndarray, stop: bool = False) -> np.ndarray:
        """The action to execute; raises ValueError on a non-finite or wrong-shape input.

        ``stop``: a stop command, held to the bounds and the delta limit but not the jerk
        limit (stopping beats smoothness).
        """
        a = np.asarray(action, np.float64)
        if a.shape != self.low.shape or not np.all(np.isfinite(a)):
            raise ValueError(f"non-finite or wrong-shape action {a.tolist()}")
        out = np.clip(a, self.low, self.high)
        if self.prev is not None:
            delta = out - self.prev
            lo = np.full_like(delta, -np.inf)
            hi = np.full_like(delta, np.inf)
            if self.max_delta is not None:
                lo, hi = np.maximum(lo, -self.max_delta), np.minimum(hi, self.max_delta)
            if self.max_jerk is not None and self.prev_delta is not None and not stop:
                lo = np.maximum(lo, self.prev_delta - self.max_jerk)
                hi = np.minimum(hi, self.prev_delta + self.max_jerk)
                # Brake in time: meeting a bound at speed would stop in one tick, beyond the jerk limit.
                hi = np.minimum(hi, _braking_delta(self.high - self.prev, self.max_jerk))
                lo = np.maximum(lo, -_braking_delta(self.prev - self.low, self.max_jerk))
            # If the jerk window lies outside the delta window, the delta limit wins.
            hi = np.maximum(hi, lo) if self.max_delta is None else np.minimum(np.maximum(hi, lo), self.max_delta)
            limited = np.clip(delta, lo, hi)
            delta = np.where(self.rate_limited, limited, delta)
            out = np.clip(self.prev + delta, self.low, self.high)
            self.prev_delta = out - self.prev
        if not np.allclose(out, a):
            self.clipped += 1
        self.prev = out
        return out

    def check_sendable(self, action: np.ndarray) -> None:
        """The last guard before the robot: raises ValueError unless finite and within bounds."""
        a = np.asarray(action, np.float64)
        if a.shape != self.low.shape or not np.all(np.isfinite(a)) or np.any(a < self.low) or np.any(a > self.high):
            raise ValueError(f"refused to send {a.tolist()}: not finite or outside the bounds")


class StopSignals:
    """SIGINT and SIGTERM stop the loop at the next tick; a second one raises at once.

    The first signal only sets ``fault`` (the loop holds and leaves); the second raises
    KeyboardInterrupt, so a call that blocks (a robot read) does not hide Ctrl-C.
    """

    NAMES = {signal.SIGINT: "sigint", signal.SIGTERM: "sigterm"}

    def __init__(self):
        self.fault: str | None = None
        self._old: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.fault is not None:
            raise KeyboardInterrupt(f"second stop signal ({self.NAMES[signum]})")
        self.fault = self.NAMES[signum]

    def __enter__(self) -> "StopSignals":
        self.fault = None
        if threading.current_thread() is threading.main_thread():
            for sig in self.NAMES:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()
