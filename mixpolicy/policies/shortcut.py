"""Shortcut models (Frans et al. 2024, "One Step Diffusion via Shortcut Models") on the flow path.

The process is flow matching's straight path x_t = t eps + (1 - t) x0 (t = 1 noise, t = 0
data). The network sees the level t and a step size d and predicts s(x_t, t, d), the average
velocity over [t - d, t], so one step is x_{t-d} = x_t - d s: the flow objective's Euler step
(the solvers need nothing new). At d = 0, s is the instantaneous velocity eps - x0.

Training, per batch: a share ``1 - consistency_fraction`` learns the flow-matching target at
d = 0 (t from the flow objective's Beta law, uniform by default); the rest learns
self-consistency: for 2d = 2^-k (k uniform in 0 .. log2(max_inference_steps) - 1) and t on
the grid of 2d, the target for s(x_t, t, 2d) is the mean of two d-steps taken by the model
itself without gradient, s(x_t, t, d) and s(x_t - d s(x_t, t, d), t - d, d). The targets
come from the online weights (the training loop's EMA is not visible to an objective).
The finest step 1 / max_inference_steps is conditioned as d = 0: it is never trained as a
step of its own, and the instantaneous velocity is its first-order value.

Sampling takes n = ``num_inference_steps`` equal steps of d = 1 / n (n a power of two, so
every step size was trained). A warm start at index ``start`` of that schedule runs its
remaining steps, each of d = 1 / n, from level 1 - start / n down to 0. Why shortcut models
and not MeanFlow: the self-consistency target needs two forward passes, no Jacobian-vector
product through the network, so MoDE's sampled routing, the mixture of horizons and the
clean-prefix conditioning train through it unchanged.
"""

from __future__ import annotations

import math

import torch

from mixpolicy.policies.config import ShortcutConfig
from mixpolicy.policies.objective_config import is_power_of_two
from mixpolicy.policies.objectives import FlowObjective, per_sample, randn


def first_prediction(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A denoiser's prediction for ``x``; of a stack (mixture of horizons), the first (the fused one)."""
    return out[0] if out.ndim > x.ndim else out


class ShortcutObjective(FlowObjective):
    """Flow matching with a step-size condition and a self-consistency target (1-2 step sampling)."""

    step_conditioned = True
    cfg: ShortcutConfig

    def __init__(self, cfg: ShortcutConfig):
        super().__init__(cfg)
        self.finest = 1.0 / cfg.max_inference_steps
        self.doublings = int(math.log2(cfg.max_inference_steps))  # trained 2d: 1, 1/2, ..., 2 / max

    # ------------------------------------------------------------------ conditioning
    def condition(self, level: torch.Tensor, step_size: torch.Tensor) -> torch.Tensor:
        """(B, 2) network conditions [1000 t, 1000 d]; steps at or below the finest are d = 0."""
        d = torch.where(step_size < 1.5 * self.finest, torch.zeros_like(step_size), step_size)
        return torch.stack([1000.0 * level.float(), 1000.0 * d.float()], dim=-1)

    def step_condition(self, schedule, i, level):
        d = (schedule[i] - self.next_level(schedule, i)).to(level.device)
        return self.condition(level, d.expand_as(level))

    def schedule_conditions(self, schedule):
        ends = torch.cat([schedule[1:], schedule.new_zeros(1)])
        return self.condition(schedule, schedule - ends)

    def schedule(self, num_steps: int | None = None) -> torch.Tensor:
        """Levels 1, 1 - 1/n, ..., 1/n: exact in floating point for n a power of two."""
        n = int(num_steps or self.cfg.num_inference_steps)
        top = self.cfg.max_inference_steps
        if not (is_power_of_two(n) and n <= top):
            raise ValueError(f"num_steps={n}: a shortcut model samples with a power of two of steps in [1, max_inference_steps={top}]")
        return 1.0 - torch.arange(n, dtype=torch.float32) / n

    # ------------------------------------------------------------------ training
    def loss(self, denoise, x0, generator=None):
        b = x0.shape[0]
        n_sc = int(round(b * self.cfg.consistency_fraction))
        n_fm = b - n_sc
        dev = generator.device if generator is not None else "cpu"
        noise = randn(x0.shape, generator, x0.device, x0.dtype)
        t_fm = self.sample_level(n_fm, generator, x0.device)
        k = torch.randint(0, self.doublings, (n_sc,), generator=generator, device=dev)
        cells = torch.floor(torch.rand(n_sc, generator=generator, device=dev) * 2.0**k)
        two_d = (2.0 ** -k.float()).to(x0.device)
        t_sc = (1.0 - cells.to(x0.device) * two_d).float()  # on the grid of 2d: 1, 1 - 2d, ..., 2d
        t = torch.cat([t_fm, t_sc])
        d = torch.cat([torch.zeros_like(t_fm), two_d])
        x = self.add_noise(x0, noise, t)
        target = noise - x0
        if n_sc:
            rows = torch.arange(n_fm, b, device=x0.device)
            target = torch.cat([target[:n_fm], self.consistency_target(denoise, x[rows], t_sc, two_d / 2, rows)])
        # The trained prediction comes last: a network that records statistics of its last
        # training forward (MoDE's router losses) keeps those of this call.
        pred = denoise(x, self.condition(t, d))
        return (pred.float() - target.float()) ** 2

    @torch.no_grad()
    def consistency_target(self, denoise, x: torch.Tensor, t: torch.Tensor, d: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The mean velocity of two model steps of size ``d`` from (x, t): the target for one of 2d."""
        v1 = first_prediction(denoise(x, self.condition(t, d), rows=rows), x)
        x_mid = x - per_sample(d, x) * v1
        v2 = first_prediction(denoise(x_mid, self.condition(t - d, d), rows=rows), x)
        return (v1 + v2) / 2
