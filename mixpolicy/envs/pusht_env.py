"""PushT through gym-pusht, observed in the layout of Diffusion Policy's PushT data.

``pusht_cchi_v7_replay.zarr`` (which ``mixpolicy data`` opens as it is) has the keys
``state`` (agent x, y, block x, y, block angle in [0, 2 pi)), ``img`` (96 x 96 x 3 float
in 0..255), ``keypoint`` and ``action`` (the agent's target x, y in [0, 512]). The
environment gives a policy the keys it was trained on under the same names and layout:
``state``, ``agent_pos`` (its first two values), ``img`` and, for stores whose frames are
``image_<camera>`` uint8 keys, those. ``keypoint`` (Diffusion Policy's nine block
keypoints) is not something gym-pusht computes, so a policy that reads it is refused.

The score is Diffusion Policy's: gym-pusht's reward is coverage / 0.95 clipped to [0, 1],
an episode scores its maximum reward, and ``mean_score`` averages that over episodes
(Diffusion Policy's published 0.91 for PushT from images is this number over 50 episodes
of 300 steps, seeds from 100000). ``mean_max_coverage`` averages the raw maximum coverage,
and an episode succeeds when its maximum coverage reaches :data:`SUCCESS_COVERAGE`. An
episode ends early once coverage passes 0.95, as in both simulators. gym-pusht draws the
initial state from gymnasium's seeded generator, so a seed here and in Diffusion
Policy's own simulator give different initial states from the same distribution.

gym-pusht is an optional extra: ``bash scripts/install_pusht.sh``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mixpolicy.envs.registry import Environment
from mixpolicy.errors import UserError
from mixpolicy.keys import is_image_key

TASK = "pusht"
STATE_KEYS = {"state": 5, "agent_pos": 2}
FLOAT_IMAGE_KEY = "img"  # float 0..255, as Diffusion Policy stored its frames
SUCCESS_COVERAGE = 0.9  # an episode whose maximum coverage reaches this is a success
SCORE_COVERAGE = 0.95  # gym-pusht's (and Diffusion Policy's) reward: coverage / 0.95, clipped
ACTION_DIM = 2
CONTROL_HZ = 10.0
INSTALL_HINT = "PushT evaluation needs the pusht extra (gym-pusht): bash scripts/install_pusht.sh"


def _gym_pusht():
    try:
        from gym_pusht.envs.pusht import PushTEnv as GymPushT
    except ImportError as exc:
        raise UserError(f"{INSTALL_HINT} ({exc})") from None
    return GymPushT


def check_obs_keys(obs_shapes: dict[str, list[int]]) -> tuple[int, int]:
    """Raise for keys PushT cannot produce; returns the (height, width) of its image keys (0, 0 without)."""
    sizes = set()
    for key, shape in obs_shapes.items():
        if key in STATE_KEYS:
            if list(shape) != [STATE_KEYS[key]]:
                raise UserError(f"PushT's {key!r} has shape [{STATE_KEYS[key]}]; the policy expects {list(shape)}")
        elif key == FLOAT_IMAGE_KEY or is_image_key(key):
            if len(shape) != 3 or shape[-1] != 3:
                raise UserError(f"PushT's {key!r} is an RGB image (H, W, 3); the policy expects {list(shape)}")
            sizes.add((int(shape[0]), int(shape[1])))
        else:
            raise UserError(
                f"PushT evaluation cannot produce observation key {key!r}; it offers state, agent_pos, img "
                "and image_<camera> (gym-pusht does not compute Diffusion Policy's keypoints)"
            )
    if len(sizes) > 1:
        raise UserError(f"PushT renders one view; the policy's image keys want different sizes {sorted(sizes)}")
    return next(iter(sizes), (0, 0))


class PushTEnv:
    """One gym-pusht environment with observations in the policy's keys and layout."""

    def __init__(self, obs_shapes: dict[str, list[int]], frame_size: int = 0, max_episode_steps: int = 300):
        if max_episode_steps < 1:
            raise UserError("max_episode_steps must be >= 1")
        self.image_size = check_obs_keys(obs_shapes)
        self.keys = list(obs_shapes)
        height, width = self.image_size
        self.max_episode_steps = int(max_episode_steps)
        # gym-pusht draws the last target with a line 1/96 of the frame thick: at least 96 px
        self.frame_size = max(int(frame_size), 96) if frame_size else 0
        self._env = _gym_pusht()(
            obs_type="pixels_agent_pos" if height else "state",
            render_mode="rgb_array",
            observation_width=width or 96,
            observation_height=height or 96,
            visualization_width=self.frame_size or 96,
            visualization_height=self.frame_size or 96,
        )
        self._steps = 0

    def _observation(self, raw: Any) -> dict[str, np.ndarray]:
        env = self._env
        # The same five numbers as gym-pusht's "state" observation and the dataset's `state`.
        state = np.array([*env.agent.position, *env.block.position, env.block.angle % (2 * np.pi)], np.float32)
        obs: dict[str, np.ndarray] = {}
        for key in self.keys:
            if key == "state":
                obs[key] = state
            elif key == "agent_pos":
                obs[key] = state[:2].copy()
            elif key == FLOAT_IMAGE_KEY:
                obs[key] = raw["pixels"].astype(np.float32)
            else:
                obs[key] = np.ascontiguousarray(raw["pixels"], dtype=np.uint8)
        return obs

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        raw, _ = self._env.reset(seed=seed, options=options)
        self._steps = 0
        # No metrics at reset: an episode scores the steps it takes, as Diffusion Policy's runner does.
        return self._observation(raw), {"success": False, "task": TASK, "metrics": {}}

    def step(self, action):
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (ACTION_DIM,):
            raise ValueError(f"action must have shape ({ACTION_DIM},), got {action.shape}")
        if not np.all(np.isfinite(action)):
            raise ValueError("action contains NaN or inf")
        raw, reward, terminated, _, info = self._env.step(action)
        self._steps += 1
        truncated = self._steps >= self.max_episode_steps
        coverage = float(info["coverage"])
        out = {"success": coverage >= SUCCESS_COVERAGE, "task": TASK, "metrics": {"coverage": coverage}}
        return self._observation(raw), float(reward), bool(terminated), truncated, out

    def render(self) -> np.ndarray | None:
        """The top-down view at ``frame_size`` (at least 96 px) with the last target marked (None without a frame size)."""
        return np.ascontiguousarray(self._env.render()) if self.frame_size else None

    def close(self) -> None:
        self._env.close()


class PushTEnvironment(Environment):
    """Diffusion Policy's PushT benchmark for ``mixpolicy eval env=pusht``."""

    name = "pusht"
    max_episode_steps = 300  # Diffusion Policy's PushT evaluation
    metrics = ("coverage",)
    success_marks = {"coverage": SUCCESS_COVERAGE}

    def require(self) -> None:
        _gym_pusht()

    def check_tasks(self, tasks: list[str]) -> None:
        other = [t for t in tasks if t != TASK]
        if other:
            raise UserError(f"PushT has one task, {TASK!r}; got {', '.join(repr(t) for t in other)}")

    def tasks(self, policy, requested: list[str]) -> list[str]:
        self.check_tasks(list(requested))
        return [TASK]

    def task_index(self, policy, task: str) -> int:
        if not policy.task_conditioned:
            return 0
        known = list(policy.shape_meta.tasks)
        if TASK in known:
            return known.index(TASK)
        if len(known) == 1:  # Diffusion Policy's stores record no task: they open as one "unknown" task
            return 0
        raise UserError(f"this task-conditioned policy knows {', '.join(known)}, not {TASK!r}")

    def make(self, task: str, obs_shapes: dict[str, list[int]], frame_size: int, max_episode_steps: int) -> PushTEnv:
        return PushTEnv(obs_shapes, frame_size=frame_size, max_episode_steps=max_episode_steps)

    def episode_success(self, done: bool, maxima: dict[str, float]) -> bool:
        return maxima.get("coverage", 0.0) >= SUCCESS_COVERAGE

    def summarize(self, episodes: list[dict[str, Any]]) -> dict[str, float]:
        cover = np.array([e["max_coverage"] for e in episodes], np.float64)
        return {
            "mean_max_coverage": float(cover.mean()),
            "mean_score": float(np.clip(cover / SCORE_COVERAGE, 0.0, 1.0).mean()),
        }


PUSHT = PushTEnvironment()
