"""RTI warm-start inference (real-time iteration for denoising policies).

The first call of an episode denoises fully from the prior. Every later call shifts the
previous clean chunk by the number of control steps that passed between the two
observations (the executed count; MoH's adaptive count per sample fits the same
argument), pads it with its last action, and runs only the last ``k`` steps of the
sampling schedule from it. The network is evaluated at the true levels of those steps:
``sample(..., start=len(schedule) - k)`` walks ``schedule[start:]`` itself, so a
truncated run never sees a level of another schedule.

Every call goes through the policy's one inference path, ``policy.plan(obs, warm_start=...)``
(:class:`~mixpolicy.policies.denoising_policy.WarmStart`), so one code path serves
DDPM/DDIM, EDM and flow matching, both heads and the expert cache (for flow matching,
``add_noise`` at ``t_k`` is the point on the straight path).

Where a warm start begins (``start_noise``): ``tail`` runs the last ``k`` steps of the
policy's own schedule; a number ``s`` runs the last ``k`` steps of the objective's schedule
whose length puts their first level nearest noise std ``s`` (per unit of the normalized
actions, :meth:`Objective.noise_std`), so ``k`` sets the cost and ``s`` how far the guess may
move; ``auto`` (default) takes the objective's choice: ``tail`` for DDPM/DDIM and flow
matching, whose levels are spread evenly in time, and 0.5 for EDM, whose geometric schedule
ends at tiny sigmas (the last 2 of 10 steps start at sigma 0.0035, where a warm start cannot
move the shifted guess and the policy stops reacting).

Starting points (``renoise``):
  * ``False`` -- the reference's choice: the shifted clean guess is used as the state at
    level ``schedule[start]`` without adding noise;
  * ``True`` (ours) -- the guess is noised to that level by the forward process.

Discrete action dims (the gripper, from the dataset metadata), ``discrete``:
  * ``clip``  -- execute the sign, store the guess snapped to +-1/scale;
  * ``scale`` -- for a policy trained with ``discrete_action_scale`` > 1 (the gripper
    column divided by that factor in normalized space, so a mode switch needs only a small
    noise level): execute the sign, keep the unsnapped guess;
  * ``none``  -- treat them as continuous (the default).

``clip`` and ``scale`` assume a binary gripper whose two commands are the ends of the
training range (robomimic's +-1). Meta-World's scripted demonstrations use three effort
levels (-1, 0 and 0.6): snapping 0 to an end closes the gripper early, so there the
gripper is best left continuous.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import math

import torch

from mixpolicy.config import check
from mixpolicy.deploy.delay import check_delay, fixed_delay
from mixpolicy.errors import UserError
from mixpolicy.policies.denoising_policy import WarmStart
from mixpolicy.policies.prefix import PREFIX_MODES, PrefixConstraint

DISCRETE_MODES = ("clip", "scale", "none")
START_NOISE_MODES = ("auto", "tail")
MAX_WARM_SCHEDULE = 256  # longest schedule searched for a start level


def check_start_noise(value) -> bool:
    return value in START_NOISE_MODES or (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0)


def warm_schedule_steps(objective, k: int, base_steps: int, start_noise="auto") -> int:
    """Length of the schedule whose last ``k`` steps a warm-started call runs.

    ``tail``: ``base_steps`` (the policy's schedule); a number: the length n > k whose level
    ``n - k`` has the noise std nearest it on a log scale (n = k would start at the prior: a
    cold call); ``auto``: the objective's ``warm_start_noise`` (None: tail). Every EDM schedule
    ends at sigma_min, so there k = 1 starts there whatever the number: use k >= 2.
    """
    if start_noise == "auto":
        start_noise = objective.warm_start_noise
    if start_noise is None or start_noise == "tail":
        return base_steps
    target, best, best_gap = math.log(float(start_noise)), None, math.inf
    for n in range(k + 1, MAX_WARM_SCHEDULE + 1):
        try:
            level = objective.schedule(n)[n - k]
        except ValueError:  # a length the objective cannot sample
            continue
        std = float(objective.noise_std(level))
        if 0 < std < math.inf and abs(math.log(std) - target) < best_gap:
            best, best_gap = n, abs(math.log(std) - target)
    if best is None:
        raise UserError(f"rti.start_noise={start_noise}: no schedule of this objective starts {k} steps from the end at a finite noise level")
    return best


def start_noise_std(objective, schedule_steps: int, k: int) -> float:
    """Noise std where a warm start running the last ``k`` of ``schedule_steps`` steps begins."""
    return float(objective.noise_std(objective.schedule(schedule_steps)[schedule_steps - k]))


@dataclass
class RTIConfig:
    """Warm-start settings; ``enabled: false`` denoises fully at every call."""

    enabled: bool = True
    k: int = 3  # denoising steps of a warm-started call (the last k of the schedule)
    schedule_steps: int = 0  # the schedule of full calls, and of warm ones with start_noise=tail (0: the policy's num_inference_steps)
    start_noise: float | str = "auto"  # where warm calls begin: auto | tail | a noise std (see the module docstring)
    renoise: bool = True  # ours: noise the shifted guess to level k; false: use it as is (reference)
    discrete: str = "none"  # none | clip | scale (see the module docstring)
    # Real-time chunking: tie the new chunk's first `delay` actions to the chunk being executed
    # (none | hard: replace them at every step | guidance: RTC's pseudo-inverse guidance |
    # conditioned: give them clean to a policy trained with policy.train_delay_max > 0).
    prefix: str = "none"
    # Frozen actions: the ticks that execute while a chunk is computed; auto: the control loop's
    # estimate from measured latency (mixpolicy.deploy.delay), sent with each call (0 without one).
    delay: int | str = 0
    max_guidance: float = 5.0  # guidance weight clip

    def __post_init__(self):
        check(self.k >= 1, "rti.k", "must be >= 1")
        check(self.prefix in ("none", *PREFIX_MODES), "rti.prefix", f"must be none or one of {PREFIX_MODES}")
        check(check_delay(self.delay), "rti.delay", f"must be auto or an integer >= 0, got {self.delay!r}")
        check(self.max_guidance > 0, "rti.max_guidance", "must be > 0")
        check(self.schedule_steps >= 0, "rti.schedule_steps", "must be >= 0 (0: the policy's own)")
        check(check_start_noise(self.start_noise), "rti.start_noise", f"must be auto, tail or a noise std > 0, got {self.start_noise!r}")
        check(self.discrete in DISCRETE_MODES, "rti.discrete", f"must be one of {DISCRETE_MODES}")


def shift_chunk(chunk: torch.Tensor, shift: int | torch.Tensor) -> torch.Tensor:
    """Drop the first ``shift`` actions of each (B, H, A) chunk and pad with its last action.

    ``shift`` is an int or a (B,) tensor of per-sample counts (>= 0).
    """
    b, h, _ = chunk.shape
    s = torch.as_tensor(shift, device=chunk.device, dtype=torch.long).reshape(-1)
    if s.numel() == 1:
        s = s.expand(b)
    if s.shape[0] != b:
        raise ValueError(f"shift has {s.shape[0]} entries for a batch of {b}")
    if bool((s < 0).any()):
        raise ValueError("shift must be >= 0")
    idx = (torch.arange(h, device=chunk.device)[None, :] + s[:, None]).clamp(max=h - 1)
    return torch.gather(chunk, 1, idx[..., None].expand_as(chunk))


def chunk_conditions(
    prev: torch.Tensor, shift: int | torch.Tensor, start: int | None, renoise: bool, prefix: str, frozen: int,
    max_guidance: float = 5.0, num_steps: int | None = None,
) -> tuple[WarmStart | None, PrefixConstraint | None]:
    """The next call's warm start and real-time-chunking constraint, from the previous chunks.

    ``prev``: the previous clean chunks (B, H, A), normalized; ``shift``: control steps since
    their observation (int or (B,)); ``start``: RTI's first schedule index (None: no warm
    start); ``prefix``: none | hard | guidance | conditioned; ``frozen``: the delay in ticks.
    The deploy sampler and the simulated-delay evaluation both build their calls here.
    """
    guess = shift_chunk(prev, shift)
    warm = None if start is None else WarmStart(guess, start, renoise, num_steps)
    if prefix == "none":
        return warm, None
    # Past the previous chunk's own actions the shifted target only repeats its last one.
    overlap = prev.shape[1] - int(torch.as_tensor(shift).max())
    return warm, PrefixConstraint(guess, frozen, max(overlap, frozen), prefix, max_guidance)


@dataclass
class ChunkResult:
    actions: torch.Tensor  # (B, H, A) raw actions, discrete dims thresholded when configured
    steps: int  # network evaluations of this call
    warm: bool  # True when warm-started from the previous chunk
    executable: torch.Tensor | None = None  # (B,) actions to run, when the policy chooses (MoH adaptive)


class RTISampler:
    """Stateful chunk sampler for one policy and one stream of observations (a robot)."""

    def __init__(self, policy, cfg: RTIConfig | None = None):
        self.policy = policy
        self.cfg = cfg or RTIConfig()
        self.objective = policy.objective
        n = self.cfg.schedule_steps or policy.cfg.objective.num_inference_steps
        try:  # a step count the objective cannot sample (a shortcut model's must be a power of two)
            self.schedule = self.objective.schedule(n)
        except ValueError as exc:
            raise UserError(f"rti.schedule_steps={n}: {exc}") from None
        # The schedule of warm-started calls (its last k steps run).
        self.warm_schedule_steps = warm_schedule_steps(self.objective, self.cfg.k, n, self.cfg.start_noise) if self.cfg.enabled else n
        if self.cfg.enabled and self.cfg.k > self.warm_schedule_steps:
            raise UserError(f"rti.k={self.cfg.k} exceeds the schedule's {n} steps (raise rti.schedule_steps, lower rti.k or set rti.start_noise)")
        self.discrete_dims = list(policy.shape_meta.discrete_action_dims) if self.cfg.discrete != "none" else []
        # The discrete dims live in [-1/scale, 1/scale] in normalized space.
        self.discrete_scale = float(policy.cfg.discrete_action_scale)
        if self.cfg.discrete == "scale" and self.discrete_scale <= 1.0:
            raise UserError(
                "rti.discrete=scale needs a policy trained with policy.discrete_action_scale > 1; use rti.discrete=clip"
            )
        if self.cfg.prefix == "conditioned" and not policy.prefix_conditioned:
            raise UserError("rti.prefix=conditioned needs a policy trained with policy.train_delay_max > 0; use hard or guidance")
        self._prev: torch.Tensor | None = None  # previous clean chunk, normalized space

    @property
    def full_steps(self) -> int:
        return len(self.schedule)

    @property
    def warm_steps(self) -> int:
        return self.cfg.k if self.cfg.enabled else len(self.schedule)

    def reset(self) -> None:
        """Forget the previous chunk: the next call denoises fully (call at every episode start)."""
        self._prev = None

    def start_index(self) -> int:
        """The first index of the warm schedule that a warm-started call runs."""
        return self.warm_schedule_steps - self.cfg.k

    def start_level(self) -> float:
        """Noise std where a warm-started call begins."""
        return start_noise_std(self.objective, self.warm_schedule_steps, self.cfg.k)

    def conditions(self, shape, shift, delay: int | None, device, dtype) -> tuple[WarmStart | None, PrefixConstraint | None]:
        """The next call's warm start and prefix constraint (None, None: denoise fully from the prior)."""
        if self._prev is None or shift is None or (not self.cfg.enabled and self.cfg.prefix == "none"):
            return None, None
        if self._prev.shape != torch.Size(shape):
            raise ValueError(f"warm start expects chunks of shape {tuple(self._prev.shape)}, got {tuple(shape)}; call reset()")
        frozen = fixed_delay(self.cfg.delay) if delay is None else int(delay)
        start = self.start_index() if self.cfg.enabled else None
        prev = self._prev.to(device, dtype)
        return chunk_conditions(prev, shift, start, self.cfg.renoise, self.cfg.prefix, frozen, self.cfg.max_guidance, self.warm_schedule_steps)

    @torch.no_grad()
    def __call__(
        self,
        obs: Mapping[str, torch.Tensor],
        shift: int | torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        delay: int | None = None,
    ) -> ChunkResult:
        """One decision: raw action chunks (B, H, A) for a batch of observation histories.

        ``shift`` is the number of control steps between the previous call's observation
        and this one's (an int or a (B,) tensor); ``None`` forces a full denoise.
        ``delay`` overrides ``rti.delay``, the frozen prefix of a real-time-chunking call (the
        control loop sends its estimate when ``rti.delay`` is auto).
        """
        policy = self.policy
        batch = next(iter(v for v in obs.values() if torch.is_tensor(v))).shape[0]
        shape = (batch, policy.cfg.horizon, policy.shape_meta.action_dim)
        p = next(policy.parameters())
        warm, prefix = self.conditions(shape, shift, delay, p.device, p.dtype)
        plan = policy.plan(obs, generator, num_steps=len(self.schedule), warm_start=warm, prefix=prefix)
        executed, stored = self.discretize(plan.normalized)
        self._prev = stored
        actions = plan.actions if executed is plan.normalized else policy.normalizer.unnormalize(policy.cfg.action_key, executed.float())
        executable = plan.executable if policy.adaptive_execution else None
        return ChunkResult(actions=actions, steps=plan.steps, warm=plan.warm, executable=executable)

    def discretize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(executed, stored) normalized chunks after the discrete-dim handling."""
        if not self.discrete_dims:
            return x, x
        d = self.discrete_dims
        snapped = x.clone()
        # sign(0) would be 0, a value the gripper never takes: ties go to +.
        sign = torch.where(x[..., d] >= 0, 1.0, -1.0).to(x.dtype)
        snapped[..., d] = sign / self.discrete_scale
        if self.cfg.discrete == "clip":
            return snapped, snapped
        return snapped, x
