"""Objective configs: one validated dataclass per generative objective (``objective.type``).

:mod:`mixpolicy.policies.config` composes them into the policy config; implementations
live in :mod:`mixpolicy.policies.objectives` and :mod:`mixpolicy.policies.shortcut`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from mixpolicy.config import check

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


@dataclass
class ObjectiveConfig:
    """Generative objective and its sampler; ``type`` picks the variant (ddpm | edm | flow | shortcut).

    ``ddpm``: DDPM training (diffusers' noise schedule), DDIM sampling.
    ``edm``: EDM preconditioning (as MoDE), log-logistic training sigmas, first-order
    DPM-Solver (or Heun) on an exponential sigma schedule.
    ``flow``: rectified flow / flow matching (as pi0), Beta time sampling, Euler or Heun.
    ``shortcut``: flow matching whose network also sees the step size (shortcut models),
    trained for self-consistency so that 1-2 large steps land near the data.
    """

    type: str = "ddpm"
    num_inference_steps: int = 10
    solver: str = ""  # "" picks the objective's default (its SOLVERS[0])
    SOLVERS: ClassVar[tuple[str, ...]] = ("ddim",)

    def __post_init__(self):
        check(self.type in OBJECTIVE_CONFIGS, "objective.type", f"unknown objective {self.type!r}; choose from {sorted(OBJECTIVE_CONFIGS)}")
        check(type(self) is OBJECTIVE_CONFIGS[self.type], "objective.type", f"{self.type!r} is configured by {OBJECTIVE_CONFIGS[self.type].__name__}")
        if not self.solver:
            self.solver = self.SOLVERS[0]
        check(
            self.solver in self.SOLVERS,
            "objective.solver",
            f"{self.solver!r} is not a solver of the {self.type} objective; choose from {self.SOLVERS}",
        )
        check(self.num_inference_steps >= 1, "objective.num_inference_steps", "must be >= 1")


@dataclass
class DDPMConfig(ObjectiveConfig):
    type: str = "ddpm"
    clip_sample: bool = True  # clip predicted clean actions to [-1, 1]
    num_train_timesteps: int = 100
    beta_schedule: str = "squaredcos_cap_v2"
    prediction_type: str = "epsilon"
    SOLVERS: ClassVar[tuple[str, ...]] = ("ddim",)

    def __post_init__(self):
        super().__post_init__()
        check(self.num_train_timesteps >= 2, "objective.num_train_timesteps", "must be >= 2")
        check(
            self.num_inference_steps <= self.num_train_timesteps,
            "objective.num_inference_steps",
            f"must be in [1, num_train_timesteps={self.num_train_timesteps}]",
        )
        check(self.prediction_type in PREDICTION_TYPES, "objective.prediction_type", "must be epsilon, sample or v_prediction")
        check(
            self.beta_schedule in ("linear", "scaled_linear", "squaredcos_cap_v2"),
            "objective.beta_schedule",
            "must be linear, scaled_linear or squaredcos_cap_v2",
        )


@dataclass
class EDMConfig(ObjectiveConfig):
    type: str = "edm"
    clip_sample: bool = True  # clip predicted clean actions to [-1, 1]
    sigma_data: float = 0.5
    sigma_min: float = 0.001
    sigma_max: float = 80.0
    sigma_train_median: float = 0.5  # training sigmas: log-logistic, location log(median)
    sigma_train_scale: float = 0.5  # ... and this scale in log space
    SOLVERS: ClassVar[tuple[str, ...]] = ("dpm_solver_1", "heun")

    def __post_init__(self):
        super().__post_init__()
        check(self.sigma_data > 0, "objective.sigma_data", "must be > 0")
        check(0 < self.sigma_min < self.sigma_max, "objective.sigma_min", "must satisfy 0 < sigma_min < sigma_max")
        check(self.sigma_train_median > 0, "objective.sigma_train_median", "must be > 0")
        check(self.sigma_train_scale > 0, "objective.sigma_train_scale", "must be > 0")


@dataclass
class FlowConfig(ObjectiveConfig):
    type: str = "flow"
    time_beta: list[float] = field(default_factory=lambda: [1.5, 1.0])  # t ~ Beta(a, b)
    time_min: float = 0.001  # t = time_min + (1 - time_min) * Beta draw
    SOLVERS: ClassVar[tuple[str, ...]] = ("euler", "heun")

    def __post_init__(self):
        super().__post_init__()
        check(len(self.time_beta) == 2 and all(b > 0 for b in self.time_beta), "objective.time_beta", "must be two positive numbers [a, b]")
        check(0 <= self.time_min < 1, "objective.time_min", "must be in [0, 1)")


def is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


@dataclass
class ShortcutConfig(FlowConfig):
    """Shortcut model (Frans et al. 2024) on the flow path: the network sees the level t and
    the step size d and predicts the average velocity over [t - d, t]. Part of each batch
    learns the instantaneous velocity (flow matching, d = 0), the rest the self-consistency
    target: one step of 2d equals two steps of d taken by the model itself (no gradient).
    Sampling takes ``num_inference_steps`` equal steps of d = 1 / steps from t = 1."""

    type: str = "shortcut"
    num_inference_steps: int = 2
    time_beta: list[float] = field(default_factory=lambda: [1.0, 1.0])  # flow-matching share: uniform t
    max_inference_steps: int = 128  # the finest step size trained is 1 / max_inference_steps
    consistency_fraction: float = 0.25  # share of each batch trained on the self-consistency target
    SOLVERS: ClassVar[tuple[str, ...]] = ("euler",)

    def __post_init__(self):
        super().__post_init__()
        check(
            is_power_of_two(self.max_inference_steps) and self.max_inference_steps >= 2,
            "objective.max_inference_steps",
            f"must be a power of two >= 2, got {self.max_inference_steps}",
        )
        check(
            is_power_of_two(self.num_inference_steps) and self.num_inference_steps <= self.max_inference_steps,
            "objective.num_inference_steps",
            f"must be a power of two in [1, max_inference_steps={self.max_inference_steps}] (the trained step sizes), got {self.num_inference_steps}",
        )
        check(0 < self.consistency_fraction < 1, "objective.consistency_fraction", "must be in (0, 1)")


OBJECTIVE_CONFIGS: dict[str, type] = {"ddpm": DDPMConfig, "edm": EDMConfig, "flow": FlowConfig, "shortcut": ShortcutConfig}
