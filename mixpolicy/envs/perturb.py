"""Mid-episode perturbations for evaluation: the goal moves (or the object is pushed) at a fixed step.

A policy that re-plans only every few steps, or whose new chunk is tied to the old one for
the ``d`` steps of an inference delay, reacts later to a change it did not predict; a
perturbation makes that visible where an unperturbed episode cannot. With ``perturb=goal``
the task's goal jumps ``perturb_distance`` metres in a horizontal direction drawn from the
episode seed (kept inside the task's goal range: near its edge the opposite direction, if
that goes further), just before step ``perturb_step``;
``perturb=object`` pushes the object that way instead. Each episode's perturbation is a
deterministic function of its seed. An episode that succeeds before the step ends before
the perturbation. Tasks without a free goal point or a free object are refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import gymnasium as gym
import numpy as np

from mixpolicy.errors import UserError

PERTURB_KINDS = ("none", "goal", "object")
# Meta-World tasks whose goal is a point the success test reads (_target_pos), or whose object is free on the table.
SUPPORTED = {
    "goal": ("reach-v3", "reach-wall-v3", "push-v3", "push-back-v3", "push-wall-v3", "pick-place-v3", "pick-place-wall-v3"),
    "object": ("push-v3", "push-back-v3", "push-wall-v3"),
}
SEED_SALT = 0x5EED  # keeps the perturbation's random draws apart from the environment's own


@dataclass(frozen=True)
class Perturbation:
    kind: str = "none"
    step: int = 30
    distance: float = 0.1

    @property
    def active(self) -> bool:
        return self.kind != "none"


def check_perturbation(env: str, kind: str, tasks: list[str]) -> None:
    """A one-line UserError for a perturbation the environment or a task cannot take."""
    if kind not in PERTURB_KINDS:
        raise UserError(f"perturb {kind!r}; choose from {', '.join(PERTURB_KINDS)}")
    if kind == "none":
        return
    if env != "metaworld":
        raise UserError(f"perturb={kind} is implemented for env=metaworld only, not {env}")
    unsupported = [t for t in tasks if t not in SUPPORTED[kind]]
    if unsupported:
        raise UserError(f"perturb={kind} does not apply to {', '.join(unsupported)}; it supports {', '.join(SUPPORTED[kind])}")


def direction(seed: int | None) -> np.ndarray:
    """The episode's unit direction in the table plane (x, y, 0)."""
    rng = np.random.default_rng([SEED_SALT, 0 if seed is None else int(seed)])
    angle = rng.uniform(0.0, 2.0 * np.pi)
    return np.array([np.cos(angle), np.sin(angle), 0.0])


class PerturbedEnv(gym.Wrapper):
    """Applies ``perturbation`` to a :class:`~mixpolicy.envs.metaworld_env.MetaWorldEnv` before step ``perturbation.step``."""

    def __init__(self, env, perturbation: Perturbation):
        check_perturbation("metaworld", perturbation.kind, [env.task])
        super().__init__(env)
        self.perturbation = perturbation
        self._seed: int | None = None
        self._steps = 0
        self.applied: np.ndarray | None = None  # where the goal or object was moved to (None: not yet)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        self._seed, self._steps, self.applied = seed, 0, None
        return self.env.reset(seed=seed, options=options)

    def step(self, action):
        if self._steps == self.perturbation.step:
            self.applied = self._apply()
        self._steps += 1
        return self.env.step(action)

    def _apply(self) -> np.ndarray:
        mw = self.env.unwrapped._env  # the Meta-World SawyerXYZEnv
        offset = self.perturbation.distance * direction(self._seed)
        if self.perturbation.kind == "goal":
            space, start = mw.goal_space, np.asarray(mw._target_pos, float)
            # Near the edge of the goal range the opposite direction moves the goal further.
            goal = max((np.clip(start + s * offset, space.low, space.high) for s in (1.0, -1.0)), key=lambda g: np.linalg.norm(g - start))
            mw._target_pos = goal
            mw.model.site("goal").pos = goal
            return goal.copy()
        obj = np.asarray(mw._get_pos_objects()[:3], float) + offset
        mw._set_obj_xyz(obj)
        return obj
