"""Generative objectives: a training loss and a sampler over a schedule of noise levels.

Every objective exposes the same small interface so that samplers, warm starts and
expert caching compose with any of them:

* ``loss(denoise, x0, generator)`` -> per-element training loss
* ``schedule(num_steps)`` -> the noise levels visited by sampling, noisiest first
* ``prior(shape, generator)`` -> a draw from the starting distribution
* ``network_level(level)`` -> the scalar condition the network sees for a level
* ``step(model_out, i, x, schedule)`` -> the sample after step ``i`` of ``schedule``
* ``add_noise(x0, noise, level)`` -> a clean sample noised to ``level`` (forward process)

``denoise(x, network_level)`` is the network with its conditioning already bound.
"""

from __future__ import annotations

from typing import Callable

import torch
from diffusers import DDIMScheduler, DDPMScheduler

from mixpolicy.policies.config import ObjectiveConfig

Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class DDPMObjective:
    """DDPM training (epsilon/sample/v targets) with deterministic DDIM sampling."""

    def __init__(self, cfg: ObjectiveConfig):
        self.cfg = cfg
        kwargs = dict(
            num_train_timesteps=cfg.num_train_timesteps,
            beta_schedule=cfg.beta_schedule,
            prediction_type=cfg.prediction_type,
            clip_sample=cfg.clip_sample,
        )
        self.train_scheduler = DDPMScheduler(**kwargs)
        self.sample_scheduler = DDIMScheduler(**kwargs, set_alpha_to_one=True, steps_offset=0)
        self._schedules: dict[int, torch.Tensor] = {}

    def loss(self, denoise: Denoise, x0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        b = x0.shape[0]
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        t = torch.randint(0, self.cfg.num_train_timesteps, (b,), generator=generator, device=x0.device)
        xt = self.train_scheduler.add_noise(x0, noise, t)
        pred = denoise(xt, t.to(x0.dtype))
        if self.cfg.prediction_type == "epsilon":
            target = noise
        elif self.cfg.prediction_type == "sample":
            target = x0
        else:
            target = self.train_scheduler.get_velocity(x0, noise, t)
        return (pred.float() - target.float()) ** 2

    def schedule(self, num_steps: int | None = None) -> torch.Tensor:
        """DDIM timesteps (integers, descending) for ``num_steps`` sampling steps."""
        n = int(num_steps or self.cfg.num_inference_steps)
        if n not in self._schedules:
            self.sample_scheduler.set_timesteps(n)
            self._schedules[n] = self.sample_scheduler.timesteps.clone()
        return self._schedules[n]

    def prior(self, shape, generator: torch.Generator | None = None, device=None, dtype=torch.float32) -> torch.Tensor:
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)

    def network_level(self, level: torch.Tensor) -> torch.Tensor:
        return level.float()

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        """q(x_t | x0) at DDPM timestep(s) ``level`` (scalar or (B,))."""
        t = level.to(torch.long).expand(x0.shape[0]) if level.ndim == 0 else level.to(torch.long)
        return self.train_scheduler.add_noise(x0, noise, t.cpu()).to(x0.dtype)

    def step(self, model_out: torch.Tensor, i: int, x: torch.Tensor, schedule: torch.Tensor) -> torch.Tensor:
        # The next level comes from the schedule itself (not from a step count), so a
        # truncated or custom schedule is evaluated at its true noise levels.
        t = int(schedule[i])
        t_prev = int(schedule[i + 1]) if i + 1 < len(schedule) else -1
        return self._ddim_step(model_out, t, t_prev, x)

    def _ddim_step(self, model_out: torch.Tensor, t: int, t_prev: int, x: torch.Tensor) -> torch.Tensor:
        s = self.sample_scheduler
        alpha_t = s.alphas_cumprod[t].to(x.device, x.dtype)
        alpha_prev = s.alphas_cumprod[t_prev].to(x.device, x.dtype) if t_prev >= 0 else torch.ones((), device=x.device, dtype=x.dtype)
        beta_t = 1 - alpha_t
        if self.cfg.prediction_type == "epsilon":
            x0 = (x - beta_t.sqrt() * model_out) / alpha_t.sqrt()
            eps = model_out
        elif self.cfg.prediction_type == "sample":
            x0 = model_out
            eps = (x - alpha_t.sqrt() * x0) / beta_t.sqrt()
        else:
            x0 = alpha_t.sqrt() * x - beta_t.sqrt() * model_out
            eps = alpha_t.sqrt() * model_out + beta_t.sqrt() * x
        if self.cfg.clip_sample:
            # As diffusers' DDIMScheduler: clip x0, keep the model's epsilon.
            x0 = x0.clamp(-1.0, 1.0)
        return alpha_prev.sqrt() * x0 + (1 - alpha_prev).sqrt() * eps


def make_objective(cfg: ObjectiveConfig):
    if cfg.name == "ddpm":
        return DDPMObjective(cfg)
    raise ValueError(f"unknown objective {cfg.name!r}")


@torch.no_grad()
def sample(objective, denoise: Denoise, x: torch.Tensor, schedule: torch.Tensor, start: int = 0) -> torch.Tensor:
    """Run ``schedule[start:]`` from ``x`` (a prior draw when start == 0)."""
    for i in range(start, len(schedule)):
        level = schedule[i].expand(x.shape[0]).to(x.device)
        x = objective.step(denoise(x, objective.network_level(level)), i, x, schedule)
    return x
