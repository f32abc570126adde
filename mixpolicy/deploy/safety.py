"""Safety layer between the action queue and the robot.

Every executed action passes ``SafetyFilter.filter``: action bounds, then a per-step
delta limit (first difference) and a jerk limit (second difference: the change of the
per-step delta). The filter keeps its own history of executed actions, so the limits
hold across chunk seams. Discrete dims (the gripper) are bounded but not rate-limited:
they switch between two values by design.

Faults stop the run cleanly: the loop sends the robot's hold action (built from the last
safe action) and leaves. They are: a non-finite policy output, an observation older than
``max_obs_age_ms``, an inference overrun (the queue ran dry after the first chunk), an
inference error, an e-stop call, and SIGINT.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mixpolicy.config import check

FAULTS = ("nan_action", "stale_observation", "inference_overrun", "inference_error", "estop", "sigint", "robot_error")


@dataclass
class SafetyConfig:
    action_low: list[float] = field(default_factory=list)  # empty: the robot's bounds, else the training data range
    action_high: list[float] = field(default_factory=list)
    max_delta: list[float] = field(default_factory=list)  # per dim, or one value for all; empty: no limit
    max_jerk: list[float] = field(default_factory=list)  # per dim, or one value for all; empty: no limit
    max_obs_age_ms: float = 100.0
    stop_on_overrun: bool = True  # false: hold and wait for the late chunk instead of stopping

    def __post_init__(self):
        check(len(self.action_low) == len(self.action_high), "safety.action_low", "action_low and action_high need the same length")
        check(all(lo <= hi for lo, hi in zip(self.action_low, self.action_high)), "safety.action_low", "must be <= action_high")
        check(all(v > 0 for v in self.max_delta), "safety.max_delta", "limits must be > 0")
        check(all(v > 0 for v in self.max_jerk), "safety.max_jerk", "limits must be > 0")
        check(self.max_obs_age_ms > 0, "safety.max_obs_age_ms", "must be > 0")


def _per_dim(values: list[float], dim: int, name: str) -> np.ndarray | None:
    if not values:
        return None
    if len(values) == 1:
        return np.full(dim, float(values[0]))
    if len(values) != dim:
        from mixpolicy.errors import UserError

        raise UserError(f"safety.{name} has {len(values)} values for {dim} action dims (give 1 or {dim})")
    return np.asarray(values, np.float64)


class SafetyFilter:
    def __init__(self, low, high, max_delta=None, max_jerk=None, discrete_dims=()):
        self.low = np.asarray(low, np.float64)
        self.high = np.asarray(high, np.float64)
        dim = self.low.shape[0]
        self.rate_limited = np.ones(dim, bool)
        self.rate_limited[list(discrete_dims)] = False
        self.max_delta = None if max_delta is None else np.asarray(max_delta, np.float64)
        self.max_jerk = None if max_jerk is None else np.asarray(max_jerk, np.float64)
        self.reset()

    @classmethod
    def from_config(cls, cfg: SafetyConfig, dim: int, default_low, default_high, discrete_dims=()) -> "SafetyFilter":
        low = _per_dim(cfg.action_low, dim, "action_low")
        high = _per_dim(cfg.action_high, dim, "action_high")
        return cls(
            default_low if low is None else low,
            default_high if high is None else high,
            _per_dim(cfg.max_delta, dim, "max_delta"),
            _per_dim(cfg.max_jerk, dim, "max_jerk"),
            discrete_dims,
        )

    def reset(self, last_action: np.ndarray | None = None) -> None:
        """Forget the history (episode start); ``last_action`` seeds it when known."""
        self.prev = None if last_action is None else np.asarray(last_action, np.float64)
        self.prev_delta = None if last_action is None else np.zeros_like(self.prev)
        self.clipped = 0  # actions changed by a limit since reset

    @property
    def last_safe(self) -> np.ndarray | None:
        return self.prev

    def filter(self, action: np.ndarray) -> np.ndarray:
        """The action to execute; raises ValueError on a non-finite input."""
        a = np.asarray(action, np.float64)
        if not np.all(np.isfinite(a)):
            raise ValueError("non-finite action")
        out = np.clip(a, self.low, self.high)
        if self.prev is not None:
            delta = out - self.prev
            lo = np.full_like(delta, -np.inf)
            hi = np.full_like(delta, np.inf)
            if self.max_delta is not None:
                lo, hi = np.maximum(lo, -self.max_delta), np.minimum(hi, self.max_delta)
            if self.max_jerk is not None and self.prev_delta is not None:
                lo = np.maximum(lo, self.prev_delta - self.max_jerk)
                hi = np.minimum(hi, self.prev_delta + self.max_jerk)
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
