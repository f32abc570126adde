"""Generative objectives: a training loss and a sampler over a schedule of noise levels.

Every objective exposes the same small interface, so samplers, warm starts (start at any
index of the schedule) and expert caching (keyed by that index) compose with any of them:

* ``loss(denoise, x0, generator)`` -> per-element training loss; the prediction is compared
  with the target by broadcasting, so a denoiser may return several predictions stacked on
  a leading dimension (the mixture of horizons scores each horizon's and the fused one
  against one target, with one draw of noise and level)
* ``schedule(num_steps)`` -> the noise levels sampling visits, noisiest first; the level
  after the last entry is "clean" (DDPM: t=-1, EDM: sigma=0, flow: t=0)
* ``prior(shape, generator, device, dtype)`` -> a draw at level ``schedule(n)[0]``
* ``network_level(level)`` -> the scalar condition the network sees for a level, on the
  scale of diffusion timesteps (DDPM: t, EDM: 1000 * c_noise = 250 log sigma, flow: 1000 t)
* ``network_input(x, level)`` -> what the network gets for a sample at ``level``
  (EDM scales it by c_in; the others pass it through)
* ``step(model_out, i, x, schedule, denoise=None)`` -> the sample at level
  ``schedule[i + 1]`` from ``x`` at ``schedule[i]``; second-order solvers (Heun) evaluate
  ``denoise`` once more, at ``schedule[i + 1]`` with step index ``i + 1``
* ``add_noise(x0, noise, level)`` -> a clean sample moved to ``level`` by the forward
  process (DDPM: q(x_t|x0); EDM: x0 + sigma eps; flow: the straight path t eps + (1-t) x0)

``denoise(x, network_level, step=None)`` is the network with its conditioning bound;
``step`` is the index into the schedule of the level being evaluated (None in training).
:func:`sample` runs ``schedule[start:]``: a warm start puts a guess at level
``schedule[start]`` (optionally via ``add_noise``) and every evaluation happens at the
schedule's true levels.
"""

from __future__ import annotations

import math
from typing import Callable, Protocol

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from mixpolicy.policies.config import ObjectiveConfig

Denoise = Callable[..., torch.Tensor]


class Objective(Protocol):
    cfg: ObjectiveConfig

    def loss(self, denoise: Denoise, x0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor: ...
    def schedule(self, num_steps: int | None = None) -> torch.Tensor: ...
    def prior(self, shape, generator=None, device=None, dtype=torch.float32) -> torch.Tensor: ...
    def network_level(self, level: torch.Tensor) -> torch.Tensor: ...
    def network_input(self, x: torch.Tensor, level: torch.Tensor) -> torch.Tensor: ...
    def step(self, model_out, i: int, x, schedule, denoise: Denoise | None = None) -> torch.Tensor: ...
    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, level: torch.Tensor) -> torch.Tensor: ...


def _per_sample(level: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A scalar or (B,) level as (B, 1, ..., 1) broadcastable against x."""
    level = level.to(x.device, x.dtype)
    if level.ndim == 0:
        level = level.expand(x.shape[0])
    return level.view(-1, *([1] * (x.ndim - 1)))


def _randn(shape, generator, device, dtype) -> torch.Tensor:
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)


def _rand(n, generator, device) -> torch.Tensor:
    return torch.rand(n, generator=generator, device=device)


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
        noise = _randn(x0.shape, generator, x0.device, x0.dtype)
        t = torch.randint(0, self.cfg.num_train_timesteps, (b,), generator=generator, device=x0.device)
        xt = self.train_scheduler.add_noise(x0, noise, t)
        pred = denoise(xt, self.network_level(t))
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
        if not 1 <= n <= self.cfg.num_train_timesteps:
            raise ValueError(f"num_steps={n} must be in [1, num_train_timesteps={self.cfg.num_train_timesteps}]")
        if n not in self._schedules:
            self.sample_scheduler.set_timesteps(n)
            self._schedules[n] = self.sample_scheduler.timesteps.clone()
        return self._schedules[n]

    def prior(self, shape, generator: torch.Generator | None = None, device=None, dtype=torch.float32) -> torch.Tensor:
        return _randn(shape, generator, device, dtype)

    def network_level(self, level: torch.Tensor) -> torch.Tensor:
        return level.float()

    def network_input(self, x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        return x

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        """q(x_t | x0) at DDPM timestep(s) ``level`` (scalar or (B,))."""
        t = level.to(torch.long).expand(x0.shape[0]) if level.ndim == 0 else level.to(torch.long)
        return self.train_scheduler.add_noise(x0, noise, t.cpu()).to(x0.dtype)

    def step(self, model_out: torch.Tensor, i: int, x: torch.Tensor, schedule: torch.Tensor, denoise: Denoise | None = None) -> torch.Tensor:
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


class EDMObjective:
    """EDM (Karras et al.) as MoDE uses it: variance-exploding x_sigma = x0 + sigma eps.

    The network F is preconditioned: D(x; sigma) = c_skip x + c_out F(c_in x, c_noise)
    with sigma_data = 0.5, and trained on the equivalent target (x0 - c_skip x) / c_out.
    Training sigmas follow a log-logistic law truncated to [sigma_min, sigma_max]; sampling
    uses first-order DPM-Solver (= DDIM for this process) or Heun on an exponential
    schedule sigma_max -> sigma_min, then 0.
    """

    def __init__(self, cfg: ObjectiveConfig):
        self.cfg = cfg
        self.sd = cfg.sigma_data

    def _precond(self, sigma: torch.Tensor):
        sd2 = self.sd**2
        denom = sigma**2 + sd2
        return sd2 / denom, sigma * self.sd / denom.sqrt(), 1.0 / denom.sqrt()

    def sample_sigma(self, n: int, generator: torch.Generator | None, device) -> torch.Tensor:
        """Inverse CDF of the truncated log-logistic: log sigma = loc + scale * logit(u)."""
        loc, scale = math.log(self.cfg.sigma_train_median), self.cfg.sigma_train_scale
        cdf = lambda s: 1.0 / (1.0 + math.exp(-(math.log(s) - loc) / scale))  # noqa: E731
        lo, hi = cdf(self.cfg.sigma_min), cdf(self.cfg.sigma_max)
        u = lo + (hi - lo) * _rand(n, generator, device)
        sigma = torch.exp(loc + scale * torch.logit(u.double())).float()
        return sigma.clamp(self.cfg.sigma_min, self.cfg.sigma_max)

    def loss(self, denoise: Denoise, x0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        sigma = self.sample_sigma(x0.shape[0], generator, x0.device)
        noise = _randn(x0.shape, generator, x0.device, x0.dtype)
        s = _per_sample(sigma, x0)
        x = x0 + s * noise
        c_skip, c_out, c_in = self._precond(s)
        pred = denoise(c_in * x, self.network_level(sigma))
        target = (x0 - c_skip * x) / c_out
        return (pred.float() - target.float()) ** 2

    def schedule(self, num_steps: int | None = None) -> torch.Tensor:
        n = int(num_steps or self.cfg.num_inference_steps)
        if n < 1:
            raise ValueError(f"num_steps={n} must be >= 1")
        if n == 1:
            return torch.tensor([self.cfg.sigma_max])
        return torch.exp(torch.linspace(math.log(self.cfg.sigma_max), math.log(self.cfg.sigma_min), n))

    def prior(self, shape, generator: torch.Generator | None = None, device=None, dtype=torch.float32) -> torch.Tensor:
        return self.cfg.sigma_max * _randn(shape, generator, device, dtype)

    def network_level(self, level: torch.Tensor) -> torch.Tensor:
        # 1000 * c_noise with c_noise = log(sigma) / 4.
        return 250.0 * torch.log(level.float())

    def network_input(self, x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        return self._precond(_per_sample(level, x))[2] * x

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        return x0 + _per_sample(level, x0) * noise

    def denoised(self, model_out: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """D(x; sigma), the clean-sample estimate, from the raw network output."""
        c_skip, c_out, _ = self._precond(_per_sample(sigma, x))
        d = c_skip * x + c_out * model_out
        return d.clamp(-1.0, 1.0) if self.cfg.clip_sample else d

    def step(self, model_out: torch.Tensor, i: int, x: torch.Tensor, schedule: torch.Tensor, denoise: Denoise | None = None) -> torch.Tensor:
        sigma = schedule[i].to(x.device, x.dtype)
        sigma_next = schedule[i + 1].to(x.device, x.dtype) if i + 1 < len(schedule) else torch.zeros((), device=x.device, dtype=x.dtype)
        d0 = self.denoised(model_out, x, sigma)
        if self.cfg.solver == "heun" and i + 1 < len(schedule):
            if denoise is None:
                raise ValueError("the heun solver needs denoise for its second evaluation")
            slope = (x - d0) / sigma
            x_euler = x + (sigma_next - sigma) * slope
            d1 = self.denoised(evaluate(self, denoise, x_euler, i + 1, schedule), x_euler, sigma_next)
            return x + (sigma_next - sigma) * 0.5 * (slope + (x_euler - d1) / sigma_next)
        # First-order DPM-Solver with data prediction; for sigma_next = 0 it returns D.
        ratio = sigma_next / sigma
        return ratio * x + (1 - ratio) * d0


class FlowObjective:
    """Flow matching on the straight path x_t = t eps + (1 - t) x0 (as pi0).

    The network predicts the velocity u = eps - x0; training times are
    t = time_min + (1 - time_min) Beta(a, b); sampling integrates from t = 1 to t = 0 on
    a uniform grid with Euler or Heun (no correction on the last step, which ends at 0).
    """

    def __init__(self, cfg: ObjectiveConfig):
        self.cfg = cfg

    def sample_time(self, n: int, generator: torch.Generator | None, device) -> torch.Tensor:
        # torch's Beta sampler takes no generator: draw a seed from torch's RNG (so
        # torch.manual_seed and training resume cover it) and sample with numpy.
        gen_device = generator.device if generator is not None else "cpu"
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=gen_device))
        a, b = self.cfg.time_beta
        t = np.random.default_rng(seed).beta(a, b, size=n).astype(np.float32)
        t = self.cfg.time_min + (1.0 - self.cfg.time_min) * t
        return torch.from_numpy(t).to(device)

    def loss(self, denoise: Denoise, x0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        t = self.sample_time(x0.shape[0], generator, x0.device)
        noise = _randn(x0.shape, generator, x0.device, x0.dtype)
        xt = self.add_noise(x0, noise, t)
        pred = denoise(xt, self.network_level(t))
        return (pred.float() - (noise - x0).float()) ** 2

    def schedule(self, num_steps: int | None = None) -> torch.Tensor:
        n = int(num_steps or self.cfg.num_inference_steps)
        if n < 1:
            raise ValueError(f"num_steps={n} must be >= 1")
        return torch.linspace(1.0, 0.0, n + 1)[:-1]

    def prior(self, shape, generator: torch.Generator | None = None, device=None, dtype=torch.float32) -> torch.Tensor:
        return _randn(shape, generator, device, dtype)

    def network_level(self, level: torch.Tensor) -> torch.Tensor:
        return 1000.0 * level.float()

    def network_input(self, x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        return x

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        t = _per_sample(level, x0)
        return t * noise + (1 - t) * x0

    def step(self, model_out: torch.Tensor, i: int, x: torch.Tensor, schedule: torch.Tensor, denoise: Denoise | None = None) -> torch.Tensor:
        t = schedule[i].to(x.device, x.dtype)
        t_next = schedule[i + 1].to(x.device, x.dtype) if i + 1 < len(schedule) else torch.zeros((), device=x.device, dtype=x.dtype)
        dt = t_next - t
        x_euler = x + dt * model_out
        if self.cfg.solver == "heun" and i + 1 < len(schedule):
            if denoise is None:
                raise ValueError("the heun solver needs denoise for its second evaluation")
            v1 = evaluate(self, denoise, x_euler, i + 1, schedule)
            return x + dt * 0.5 * (model_out + v1)
        return x_euler


OBJECTIVE_CLASSES = {"ddpm": DDPMObjective, "edm": EDMObjective, "flow": FlowObjective}


def make_objective(cfg: ObjectiveConfig):
    if cfg.name not in OBJECTIVE_CLASSES:
        raise ValueError(f"unknown objective {cfg.name!r}")
    return OBJECTIVE_CLASSES[cfg.name](cfg)


def evaluate(objective, denoise: Denoise, x: torch.Tensor, i: int, schedule: torch.Tensor) -> torch.Tensor:
    """The network output for ``x`` at level ``schedule[i]`` (step index ``i``)."""
    level = schedule[i].to(x.device).expand(x.shape[0])
    return denoise(objective.network_input(x, level), objective.network_level(level), step=i)


def function_evaluations(objective, num_steps: int, start: int = 0) -> int:
    """Network evaluations that sampling ``schedule(num_steps)[start:]`` costs."""
    n = num_steps - start
    return 2 * n - 1 if objective.cfg.solver == "heun" and n > 0 else n


@torch.no_grad()
def sample(objective, denoise: Denoise, x: torch.Tensor, schedule: torch.Tensor, start: int = 0) -> torch.Tensor:
    """Run ``schedule[start:]`` from ``x`` (a prior draw when start == 0)."""
    for i in range(start, len(schedule)):
        x = objective.step(evaluate(objective, denoise, x, i, schedule), i, x, schedule, denoise)
    return x
