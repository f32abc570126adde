"""The interface every inference backend offers the control loop: ``spec``, ``infer``, ``reset``, ``close``.

A client serves one robot (batch size 1). ``infer`` takes the observation history as
raw arrays ``{key: (n_obs_steps, ...)}`` plus the task index and the number of control
steps since the previous call's observation (RTI's shift; ``None`` forces a full
denoise) and optionally the frozen prefix of a real-time-chunking call (``delay`` in ticks;
``None``: the policy's ``rti.delay``), and returns one raw action chunk. Backends: ``local`` (this process),
``remote`` (a ``mixpolicy serve`` server), ``subprocess_backend`` (a server in a child).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Protocol

import numpy as np

from mixpolicy.errors import UserError


@dataclass
class PolicySpec:
    """What the control loop needs to know about a policy."""

    obs_keys: list[str]
    n_obs_steps: int
    horizon: int
    n_action_steps: int
    action_dim: int
    tasks: list[str]
    discrete_action_dims: list[int]
    action_low: list[float]  # range of the training actions
    action_high: list[float]
    full_steps: int  # network evaluations of a full denoise
    warm_steps: int  # of a warm-started (RTI) call
    policy_type: str = "dit"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "PolicySpec":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    @property
    def task_count(self) -> int:
        """Valid task indices are ``range(task_count)`` (a policy without tasks takes 0)."""
        return max(1, len(self.tasks))

    def task_index(self, task: str) -> int:
        if not self.tasks:
            return 0
        if task not in self.tasks:
            raise UserError(f"task {task!r} is not one this policy was trained on ({', '.join(self.tasks)})")
        return self.tasks.index(task)


@dataclass
class InferenceResult:
    actions: np.ndarray  # (H, A) raw actions
    steps: int  # network evaluations
    warm: bool
    compute_ms: float  # time spent in the policy (excludes transport)
    executable: int | None = None  # actions to run before re-planning, when the policy chooses (MoH adaptive)


class PolicyClient(Protocol):
    spec: PolicySpec

    def infer(self, obs: Mapping[str, np.ndarray], task: int, shift: int | None, delay: int | None = None) -> InferenceResult: ...

    def reset(self) -> None: ...

    def close(self) -> None: ...
