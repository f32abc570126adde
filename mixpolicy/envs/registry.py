"""The environments ``mixpolicy eval`` runs closed-loop, chosen by name (``env=metaworld|pusht``).

An :class:`Environment` says which tasks it has, builds one environment for a task and the
policy's observation keys, decides an episode's success and adds its own numbers to a
task's results. The environments it builds share one contract:

- ``reset(seed=) -> (obs, info)``: the seed fixes the episode's initial state;
- ``step(action) -> (obs, reward, done, truncated, info)``: ``done`` ends the episode early
  (Meta-World: success; PushT: coverage above the simulator's threshold); ``info["metrics"]``
  holds per-step numbers whose maximum over the episode is kept (PushT: coverage);
- ``render() -> RGB frame or None``, ``close()``.

Entries are imported when chosen, so choosing one never imports another's simulator.
"""

from __future__ import annotations

import importlib
from typing import Any

from mixpolicy.errors import UserError

# name -> "module:attribute" of its Environment
ENVIRONMENTS = {
    "metaworld": "mixpolicy.envs.metaworld_env:METAWORLD",
    "pusht": "mixpolicy.envs.pusht_env:PUSHT",
}


def check_env_name(name: str) -> None:
    if name not in ENVIRONMENTS:
        raise UserError(f"unknown env {name!r}; choose from {', '.join(ENVIRONMENTS)}")


def environment(name: str) -> "Environment":
    check_env_name(name)
    module, _, attr = ENVIRONMENTS[name].partition(":")
    return getattr(importlib.import_module(module), attr)


class Environment:
    """What the evaluation loop needs to know about one family of environments."""

    name = ""
    max_episode_steps = 0  # the default episode length
    max_episode_steps_cap = 0  # the longest the environment allows (0: no cap)
    metrics: tuple[str, ...] = ()  # per-step info["metrics"] names, kept as max_<name> per episode
    success_marks: dict[str, float] = {}  # metric -> the value a recording marks when first reached

    def require(self) -> None:
        """Raise a UserError naming what to install when the simulator is missing."""

    def check_tasks(self, tasks: list[str]) -> None:
        """Raise a UserError naming tasks this environment does not have."""

    def tasks(self, policy, requested: list[str]) -> list[str]:
        """The tasks to evaluate: ``requested``, or the policy's own."""
        raise NotImplementedError

    def task_index(self, policy, task: str) -> int:
        """The task index the policy is conditioned on for ``task`` (0 when unconditioned)."""
        return policy.task_index(task) if policy.task_conditioned else 0

    def make(self, task: str, obs_shapes: dict[str, list[int]], frame_size: int, max_episode_steps: int):
        """An environment for ``task`` whose observations hold ``obs_shapes``' keys; with
        ``frame_size`` > 0 its ``render()`` returns frames (of that size where it chooses)."""
        raise NotImplementedError

    def episode_success(self, done: bool, maxima: dict[str, float]) -> bool:
        """Whether a finished episode counts as a success (default: it ended early)."""
        return bool(done)

    def summarize(self, episodes: list[dict[str, Any]]) -> dict[str, float]:
        """This environment's own per-task numbers (averaged over tasks into the overall results)."""
        return {}
