"""Generative objectives: a forward process, a parameterization and a training level law.

Each objective describes the process x_l = alpha(l) x0 + sigma(l) eps over noise levels
``l`` and how the network's output is read (:meth:`prediction` -> clean estimate and noise
estimate); samplers live in :mod:`mixpolicy.policies.solvers` and work on any objective.

* ``loss(denoise, x0, generator)`` -> per-element training loss; the prediction is compared
  with the target by broadcasting, so a denoiser may return several predictions stacked on
  a leading dimension (the mixture of horizons scores each horizon's and the fused one
  against one target, with one draw of noise and level)
* ``training_draw(x0, generator)`` -> (levels (B,), standard normal noise): the training
  level distribution
* ``schedule(num_steps)`` -> the levels sampling visits, noisiest first; the level after the
  last entry is "clean" (:meth:`next_level`: DDPM t=-1, EDM sigma=0, flow t=0)
* ``prior(shape, generator, device, dtype)`` -> a draw at level ``schedule(n)[0]``
* ``network_level(level)`` -> the scalar condition the network sees, on the scale of
  diffusion timesteps (DDPM: t, EDM: 1000 * c_noise = 250 log sigma, flow: 1000 t)
* ``step_condition(schedule, i, level)`` -> the condition of step ``i`` of a schedule
  (default: ``network_level(level)``; a step-conditioned objective, the shortcut model,
  adds the step size: (B, 2)), and ``schedule_conditions(schedule)`` the same for every
  step at once (what an expert cache is built from)
* ``network_input(x, level)`` -> what the network gets for a sample at ``level``
* ``prediction(model_out, x, level)`` -> (x0_hat, eps_hat)
* ``add_noise(x0, noise, level)`` -> a clean sample moved to ``level`` by the forward process

``denoise(x, network_level, step=None, rows=None)`` is the network with its conditioning
bound; ``step`` is the index into the schedule of the level being evaluated (None in
training); ``rows`` (training only) evaluates a subset of the batch's samples.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from mixpolicy.policies.config import DDPMConfig, EDMConfig, FlowConfig, ObjectiveConfig

Denoise = Callable[..., torch.Tensor]


def per_sample(level: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A (B,) level as (B, 1, ..., 1) broadcastable against x; a scalar level (a number or a
    0-dim CPU tensor, what a sampling schedule's entries are) stays a 0-dim CPU tensor, which
    broadcasts against x on any device without a copy or a kernel per use."""
    level = torch.as_tensor(level)
    if level.ndim == 0 and level.device.type == "cpu":
        return level if level.dtype == x.dtype else level.to(x.dtype)
    level = level.to(x.device, x.dtype)
    if level.ndim == 0:
        level = level.expand(x.shape[0])
    return level.view(-1, *([1] * (x.ndim - 1)))


def randn(shape, generator, device, dtype) -> torch.Tensor:
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)


class Objective:
    """What every objective shares: the training loss over its own level law and target."""

    cfg: ObjectiveConfig
    # True when levels are continuous and the process has a derivative (second-order solvers).
    continuous = True
    # True when the network also takes the step size (its condition is (B, 2), see step_condition).
    step_conditioned = False
    # Where RTI's warm start begins by default: None, the tail of the sampling schedule (its
    # levels are spread evenly in time); a number, the level of that noise std (see noise_std).
    warm_start_noise: float | None = None

    def __init__(self, cfg: ObjectiveConfig):
        self.cfg = cfg
        self._scalars: dict[tuple, tuple[torch.Tensor, ...]] = {}

    def scalar_memo(self, name: str, level: torch.Tensor, compute: Callable[[torch.Tensor], tuple[torch.Tensor, ...]]):
        """``compute(level)`` once per scalar level (a 0-dim CPU tensor: a schedule entry);
        sampling asks for the same few levels every chunk. Other levels are computed each time."""
        if level.ndim != 0 or level.device.type != "cpu" or torch.is_grad_enabled():
            return compute(level)
        key = (name, float(level), level.dtype)
        hit = self._scalars.get(key)
        if hit is None:
            if len(self._scalars) > 4096:
                self._scalars.clear()
            hit = self._scalars[key] = tuple(t.clone() for t in compute(level))
        return hit

    def training_draw(self, x0: torch.Tensor, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        level = self.sample_level(x0.shape[0], generator, x0.device)
        return level, randn(x0.shape, generator, x0.device, x0.dtype)

    def loss(self, denoise: Denoise, x0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        level, noise = self.training_draw(x0, generator)
        x = self.add_noise(x0, noise, level)
        pred = denoise(self.network_input(x, level), self.network_level(level))
        return (pred.float() - self.target(x0, noise, x, level).float()) ** 2

    def prior(self, shape, generator: torch.Generator | None = None, device=None, dtype=torch.float32) -> torch.Tensor:
        return randn(shape, generator, device, dtype)

    def step_condition(self, schedule: torch.Tensor, i: int, level: torch.Tensor) -> torch.Tensor:
        """The network condition for evaluating step ``i`` of ``schedule`` at ``level`` (B,)."""
        return self.network_level(level)

    def schedule_conditions(self, schedule: torch.Tensor) -> torch.Tensor:
        """The network condition of every step of ``schedule``, in order."""
        return self.network_level(schedule)

    def network_input(self, x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        return x

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        a, s = self.coefficients(per_sample(level, x0))
        return a * x0 + s * noise

    def next_level(self, schedule: torch.Tensor, i: int) -> torch.Tensor:
        """The level after ``schedule[i]``: the next entry, or the clean level after the last."""
        return schedule[i + 1] if i + 1 < len(schedule) else torch.zeros((), dtype=schedule.dtype)

    def noise_std(self, level: torch.Tensor) -> torch.Tensor:
        """Noise std per unit of signal at ``level`` (s / a of x = a x0 + s eps): 0 clean, inf pure noise."""
        a, s = self.coefficients(torch.as_tensor(level).double())
        return s / a

    def derivative(self, x0: torch.Tensor, eps: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        """dx/dl of the probability-flow ODE through (x0, eps) at ``level``."""
        da, ds = self.coefficient_slopes(per_sample(level, x0))
        return da * x0 + ds * eps


class DDPMObjective(Objective):
    """DDPM training (epsilon/sample/v targets) with deterministic DDIM sampling."""

    continuous = False

    def __init__(self, cfg: DDPMConfig):
        super().__init__(cfg)
        kwargs = dict(
            num_train_timesteps=cfg.num_train_timesteps,
            beta_schedule=cfg.beta_schedule,
            prediction_type=cfg.prediction_type,
            clip_sample=cfg.clip_sample,
        )
        self.scheduler = DDPMScheduler(**kwargs)
        self.sample_scheduler = DDIMScheduler(**kwargs, set_alpha_to_one=True, steps_offset=0)
        self.alphas_cumprod = self.scheduler.alphas_cumprod
        self._schedules: dict[int, torch.Tensor] = {}

    def training_draw(self, x0, generator):
        noise = randn(x0.shape, generator, x0.device, x0.dtype)
        return self.sample_level(x0.shape[0], generator, x0.device), noise

    def sample_level(self, n: int, generator, device) -> torch.Tensor:
        return torch.randint(0, self.cfg.num_train_timesteps, (n,), generator=generator, device=device)

    def add_noise(self, x0, noise, level):
        t = level.to(torch.long).expand(x0.shape[0]) if level.ndim == 0 else level.to(torch.long)
        return self.scheduler.add_noise(x0, noise, t.cpu()).to(x0.dtype)

    def target(self, x0, noise, x, level):
        kind = self.cfg.prediction_type
        if kind == "epsilon":
            return noise
        if kind == "sample":
            return x0
        return self.scheduler.get_velocity(x0, noise, level)

    def schedule(self, num_steps: int | None = None) -> torch.Tensor:
        """DDIM timesteps (integers, descending) for ``num_steps`` sampling steps."""
        n = int(num_steps or self.cfg.num_inference_steps)
        if not 1 <= n <= self.cfg.num_train_timesteps:
            raise ValueError(f"num_steps={n} must be in [1, num_train_timesteps={self.cfg.num_train_timesteps}]")
        if n not in self._schedules:
            self.sample_scheduler.set_timesteps(n)
            self._schedules[n] = self.sample_scheduler.timesteps.clone()
        return self._schedules[n]

    def next_level(self, schedule, i):
        return schedule[i + 1] if i + 1 < len(schedule) else torch.tensor(-1)

    def network_level(self, level: torch.Tensor) -> torch.Tensor:
        return level.float()

    def coefficients(self, level: torch.Tensor):
        """(sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)); t = -1 is the clean level."""
        return self.scalar_memo("coefficients", level, self._coefficients)

    def _coefficients(self, level: torch.Tensor):
        t = level.long()
        ac = self.alphas_cumprod.to(level.device)
        alpha_bar = torch.where(t >= 0, ac[t.clamp(min=0)], torch.ones((), device=level.device)).to(level.dtype)
        return alpha_bar.sqrt(), (1 - alpha_bar).sqrt()

    def prediction(self, model_out, x, level):
        a, s = self.coefficients(per_sample(level, x))
        kind = self.cfg.prediction_type
        if kind == "epsilon":
            x0, eps = (x - s * model_out) / a, model_out
        elif kind == "sample":
            x0 = model_out
            eps = (x - a * x0) / s
        else:
            x0, eps = a * x - s * model_out, a * model_out + s * x
        if self.cfg.clip_sample:
            # As diffusers' DDIMScheduler: clip x0, keep the model's epsilon.
            x0 = x0.clamp(-1.0, 1.0)
        return x0, eps


class EDMObjective(Objective):
    """EDM (Karras et al.) as MoDE uses it: variance-exploding x_sigma = x0 + sigma eps.

    The network F is preconditioned: D(x; sigma) = c_skip x + c_out F(c_in x, c_noise)
    with sigma_data = 0.5, and trained on the equivalent target (x0 - c_skip x) / c_out.
    Training sigmas follow a log-logistic law truncated to [sigma_min, sigma_max]; sampling
    uses first-order DPM-Solver (= DDIM for this process) or Heun on an exponential
    schedule sigma_max -> sigma_min, then 0.
    """

    # The geometric schedule's last steps sit at tiny sigmas (0.0035 and 0.001 of 10 steps):
    # a warm start there could hardly move the guess, so it begins at sigma 0.5 instead.
    warm_start_noise = 0.5

    def __init__(self, cfg: EDMConfig):
        super().__init__(cfg)
        self.sd = cfg.sigma_data

    def _precond(self, sigma: torch.Tensor):
        return self.scalar_memo("precond", sigma, self._precond_of)

    def _precond_of(self, sigma: torch.Tensor):
        sd2 = self.sd**2
        denom = sigma**2 + sd2
        return sd2 / denom, sigma * self.sd / denom.sqrt(), 1.0 / denom.sqrt()

    def sample_level(self, n: int, generator: torch.Generator | None, device) -> torch.Tensor:
        """Inverse CDF of the truncated log-logistic: log sigma = loc + scale * logit(u)."""
        loc, scale = math.log(self.cfg.sigma_train_median), self.cfg.sigma_train_scale
        cdf = lambda s: 1.0 / (1.0 + math.exp(-(math.log(s) - loc) / scale))  # noqa: E731
        lo, hi = cdf(self.cfg.sigma_min), cdf(self.cfg.sigma_max)
        u = lo + (hi - lo) * torch.rand(n, generator=generator, device=device)
        sigma = torch.exp(loc + scale * torch.logit(u.double())).float()
        return sigma.clamp(self.cfg.sigma_min, self.cfg.sigma_max)

    def target(self, x0, noise, x, level):
        c_skip, c_out, _ = self._precond(per_sample(level, x0))
        return (x0 - c_skip * x) / c_out

    def schedule(self, num_steps: int | None = None) -> torch.Tensor:
        n = int(num_steps or self.cfg.num_inference_steps)
        if n < 1:
            raise ValueError(f"num_steps={n} must be >= 1")
        if n == 1:
            return torch.tensor([self.cfg.sigma_max])
        return torch.exp(torch.linspace(math.log(self.cfg.sigma_max), math.log(self.cfg.sigma_min), n))

    def prior(self, shape, generator=None, device=None, dtype=torch.float32):
        return self.cfg.sigma_max * randn(shape, generator, device, dtype)

    def network_level(self, level: torch.Tensor) -> torch.Tensor:
        # 1000 * c_noise with c_noise = log(sigma) / 4.
        return 250.0 * torch.log(level.float())

    def network_input(self, x, level):
        return self._precond(per_sample(level, x))[2] * x

    def add_noise(self, x0, noise, level):
        return x0 + per_sample(level, x0) * noise

    def coefficients(self, level):
        return torch.ones_like(level), level

    def coefficient_slopes(self, level):
        return torch.zeros_like(level), torch.ones_like(level)

    def prediction(self, model_out, x, level):
        sigma = per_sample(level, x)
        c_skip, c_out, _ = self._precond(sigma)
        x0 = c_skip * x + c_out * model_out
        if self.cfg.clip_sample:
            x0 = x0.clamp(-1.0, 1.0)
        return x0, (x - x0) / sigma


class FlowObjective(Objective):
    """Flow matching on the straight path x_t = t eps + (1 - t) x0 (as pi0).

    The network predicts the velocity u = eps - x0; training times are
    t = time_min + (1 - time_min) Beta(a, b); sampling integrates from t = 1 to t = 0 on
    a uniform grid with Euler or Heun (no correction on the last step, which ends at 0).
    """

    def __init__(self, cfg: FlowConfig):
        super().__init__(cfg)

    def sample_level(self, n: int, generator: torch.Generator | None, device) -> torch.Tensor:
        # torch's Beta sampler takes no generator: draw a seed from torch's RNG (so
        # torch.manual_seed and training resume cover it) and sample with numpy.
        gen_device = generator.device if generator is not None else "cpu"
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=gen_device))
        a, b = self.cfg.time_beta
        t = np.random.default_rng(seed).beta(a, b, size=n).astype(np.float32)
        t = self.cfg.time_min + (1.0 - self.cfg.time_min) * t
        return torch.from_numpy(t).to(device)

    def target(self, x0, noise, x, level):
        return noise - x0

    def schedule(self, num_steps: int | None = None) -> torch.Tensor:
        n = int(num_steps or self.cfg.num_inference_steps)
        if n < 1:
            raise ValueError(f"num_steps={n} must be >= 1")
        return torch.linspace(1.0, 0.0, n + 1)[:-1]

    def network_level(self, level: torch.Tensor) -> torch.Tensor:
        return 1000.0 * level.float()

    def coefficients(self, level):
        return 1 - level, level

    def coefficient_slopes(self, level):
        return -torch.ones_like(level), torch.ones_like(level)

    def prediction(self, model_out, x, level):
        t = per_sample(level, x)
        return x - t * model_out, x + (1 - t) * model_out
