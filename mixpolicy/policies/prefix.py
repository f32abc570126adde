"""Prefix constraints for real-time chunking: the new chunk continues the one being executed.

While a chunk runs, the next is sampled with its first ``frozen`` actions (those that will
execute during inference) tied to the current chunk, and the rest of the overlap pulled
towards it with weights that decay to zero at ``overlap`` (real-time chunking, RTC).

Two ways to impose it, both through the objective interface, so they serve every objective:

* ``hard``: after every solver step the prefix is replaced by the target moved to the next
  level along the model's own noise estimate (x = a x0 + s eps), and by the target itself at
  the clean end; no extra cost.
* ``conditioned``: for a policy trained with a clean prefix (``policy.train_delay_max``): the
  frozen actions are given to the network as clean actions at every step and copied into the
  chunk; no extra cost, no guidance.
* ``guidance``: pseudo-inverse guidance through the denoiser. At each step the clean estimate
  x0_hat(x) is compared with the target under the soft mask W, and the vector-Jacobian
  product g = (dx0_hat/dx)^T W (target - x0_hat) (one backward pass) corrects the step. Any
  process x = a x0 + s eps is a scaled flow path z = x / (a + s) at time t = s / (a + s);
  the correction is the one RTC adds to a flow step on z, with its clipped weight
  min(max_weight, t / ((1 - t) r^2)), r^2 = t^2 / (t^2 + (1 - t)^2), mapped back to x.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mixpolicy.policies.objectives import per_sample
from mixpolicy.policies.solvers import evaluate, first_order_update

PREFIX_MODES = ("hard", "guidance", "conditioned")


def soft_mask(horizon: int, frozen: int, overlap: int, device=None) -> torch.Tensor:
    """(horizon,) weights: 1 on the frozen prefix, decaying exponentially to 0 at ``overlap``."""
    frozen = max(0, min(frozen, horizon))
    overlap = max(frozen, min(overlap, horizon))
    w = torch.zeros(horizon, device=device)
    w[:frozen] = 1.0
    span = overlap - frozen
    if span > 0:
        j = torch.arange(span, device=device, dtype=torch.float32)
        c = (span - j) / (span + 1)  # in (0, 1), decreasing
        w[frozen:overlap] = c * torch.expm1(c) / math.expm1(1.0)
    return w


@dataclass
class PrefixConstraint:
    """Tie a chunk's first actions to ``target`` (normalized chunks (B, H, A))."""

    target: torch.Tensor
    frozen: int  # actions that execute while this chunk is computed (the delay in ticks)
    overlap: int = 0  # the soft mask reaches 0 here (0: the horizon); guidance only
    mode: str = "guidance"  # hard | guidance
    max_weight: float = 5.0  # guidance weight clip (RTC's beta)

    def __post_init__(self):
        if self.mode not in PREFIX_MODES:
            raise ValueError(f"prefix mode {self.mode!r}; choose from {PREFIX_MODES}")
        h = self.target.shape[1]
        self.frozen = max(0, min(int(self.frozen), h))
        overlap = int(self.overlap) or h
        mask = soft_mask(h, self.frozen, overlap, self.target.device) if self.mode == "guidance" else None
        self.weights = None if mask is None else mask.to(self.target.dtype).view(1, h, 1)

    @property
    def needs_grad(self) -> bool:
        return self.mode == "guidance" and self.frozen > 0

    def step(self, objective, denoise, x, schedule, i, generator=None, callback=None) -> torch.Tensor:
        """One first-order solver step (any objective) with the prefix constraint applied."""
        level = schedule[i].to(x.device)
        if self.mode == "conditioned":
            mask = torch.zeros(self.target.shape[:2], dtype=torch.bool, device=x.device)
            mask[:, : self.frozen] = True
            out = evaluate(objective, denoise, x, i, schedule, prefix=(self.target, mask))
            if callback is not None:
                callback(i, x, out)
            x_next = first_order_update(objective, out, x, schedule, i).clone()
            x_next[:, : self.frozen] = self.target[:, : self.frozen]
            return x_next
        if self.needs_grad:
            with torch.enable_grad():
                xg = x.detach().requires_grad_(True)
                out = evaluate(objective, denoise, xg, i, schedule)
                x0, _ = objective.prediction(out, xg, level)
                error = self.weights * (self.target - x0.detach())
                (g,) = torch.autograd.grad(x0, xg, grad_outputs=error)
            out = out.detach()
        else:
            out = evaluate(objective, denoise, x, i, schedule)
        if callback is not None:
            callback(i, x, out)
        x_next = first_order_update(objective, out, x, schedule, i)
        if self.frozen == 0:
            return x_next
        a, s = objective.coefficients(per_sample(level, x))
        a_n, s_n = objective.coefficients(per_sample(objective.next_level(schedule, i).to(x.device), x))
        if self.mode == "hard":
            _, eps = objective.prediction(out, x, level)
            x_next = x_next.clone()
            d = self.frozen
            x_next[:, :d] = a_n * self.target[:, :d] + s_n * eps[:, :d]
            return x_next
        # RTC's correction of a flow step on z = x / (a + s), mapped back to x.
        t, t_n = s / (a + s), s_n / (a_n + s_n)
        r2 = t**2 / (t**2 + (1 - t) ** 2)
        weight = (t / ((1 - t) * r2).clamp_min(1e-12)).clamp(max=self.max_weight)
        return x_next + (a_n + s_n) * (t - t_n) * weight * (a + s) * g
