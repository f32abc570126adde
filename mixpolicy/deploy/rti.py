"""RTI warm-start inference (real-time iteration for denoising policies).

The first call of an episode denoises fully from the prior. Every later call shifts the
previous clean chunk by the number of control steps that passed between the two
observations (the executed count; MoH's adaptive count per sample fits the same
argument), pads it with its last action, and runs only the last ``k`` steps of the
sampling schedule from it. The network is evaluated at the true levels of those steps:
``sample(..., start=len(schedule) - k)`` walks ``schedule[start:]`` itself, so a
truncated run never sees a level of another schedule.

Everything goes through the objective interface (``schedule``, ``add_noise``, ``step``),
so one code path serves DDPM/DDIM, EDM and flow matching (for flow matching,
``add_noise`` at ``t_k`` is the point on the straight path).

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

import torch

from mixpolicy.config import check
from mixpolicy.errors import UserError
from mixpolicy.policies.objectives import sample

DISCRETE_MODES = ("clip", "scale", "none")


@dataclass
class RTIConfig:
    """Warm-start settings; ``enabled: false`` denoises fully at every call."""

    enabled: bool = True
    k: int = 3  # denoising steps of a warm-started call (the last k of the schedule)
    schedule_steps: int = 0  # length of the schedule whose tail runs (0: the policy's num_inference_steps)
    renoise: bool = True  # ours: noise the shifted guess to level k; false: use it as is (reference)
    discrete: str = "none"  # none | clip | scale (see the module docstring)

    def __post_init__(self):
        check(self.k >= 1, "rti.k", "must be >= 1")
        check(self.schedule_steps >= 0, "rti.schedule_steps", "must be >= 0 (0: the policy's own)")
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
        self.schedule = self.objective.schedule(n)
        if self.cfg.enabled and self.cfg.k > len(self.schedule):
            raise UserError(f"rti.k={self.cfg.k} exceeds the schedule's {len(self.schedule)} steps (raise rti.schedule_steps)")
        self.discrete_dims = list(policy.shape_meta.discrete_action_dims) if self.cfg.discrete != "none" else []
        # The discrete dims live in [-1/scale, 1/scale] in normalized space.
        self.discrete_scale = float(getattr(policy.cfg, "discrete_action_scale", 1.0))
        if self.cfg.discrete == "scale" and self.discrete_scale <= 1.0:
            raise UserError(
                "rti.discrete=scale needs a policy trained with policy.discrete_action_scale > 1; use rti.discrete=clip"
            )
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
        return len(self.schedule) - self.cfg.k

    def initial_state(self, shape, shift, generator: torch.Generator | None, device, dtype) -> tuple[torch.Tensor, int]:
        """The sampler's starting point and schedule index for the next call."""
        if not self.cfg.enabled or self._prev is None or shift is None:
            return self.objective.prior(shape, generator, device, dtype), 0
        if self._prev.shape != torch.Size(shape):
            raise ValueError(f"warm start expects chunks of shape {tuple(self._prev.shape)}, got {tuple(shape)}; call reset()")
        guess = shift_chunk(self._prev.to(device, dtype), shift)
        start = self.start_index()
        if not self.cfg.renoise:
            return guess, start
        level = self.schedule[start].expand(shape[0])
        # add_noise takes standard normal noise (the prior may be scaled, as EDM's is).
        noise = torch.randn(shape, generator=generator, device=device, dtype=dtype)
        return self.objective.add_noise(guess, noise, level), start

    @torch.no_grad()
    def __call__(
        self,
        obs: Mapping[str, torch.Tensor],
        shift: int | torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> ChunkResult:
        """One decision: raw action chunks (B, H, A) for a batch of observation histories.

        ``shift`` is the number of control steps between the previous call's observation
        and this one's (an int or a (B,) tensor); ``None`` forces a full denoise.
        """
        policy = self.policy
        cond = policy.encode_obs(obs)
        shape = (cond.shape[0], policy.cfg.horizon, policy.shape_meta.action_dim)
        x, start = self.initial_state(shape, shift, generator, cond.device, cond.dtype)
        if hasattr(policy, "sample_chunk"):
            x, executable = policy.sample_chunk(cond, x, self.schedule, start=start)
        else:
            x, executable = sample(self.objective, policy.denoiser(cond, self.schedule), x, self.schedule, start=start), None
        executed, stored = self.discretize(x)
        self._prev = stored
        actions = policy.normalizer.unnormalize(policy.cfg.action_key, executed.float())
        return ChunkResult(actions=actions, steps=len(self.schedule) - start, warm=start > 0, executable=executable)

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
