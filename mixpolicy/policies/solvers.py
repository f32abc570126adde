"""Samplers over any objective: small functions of ``(objective, denoise, x, schedule, i)``.

A solver step takes the sample ``x`` at level ``schedule[i]`` to the next level (the next
entry, or clean after the last). It reads the network through the objective's
parameterization (``prediction`` -> clean and noise estimates), so one first-order step
serves DDIM (DDPM), first-order DPM-Solver (EDM) and Euler (flow matching), and one Heun
step every continuous process. Every step takes a generator, so stochastic samplers fit.

:func:`sample` runs ``schedule[start:]``: a warm start puts a guess at level
``schedule[start]`` and every evaluation happens at the schedule's true levels; the
network sees ``step=i`` so per-step caches (MoDE's experts) key on it.
"""

from __future__ import annotations

from typing import Callable

import torch

from mixpolicy.policies.objectives import Denoise, per_sample

# A callback sees (step index, x at that step, the network output of its first evaluation).
StepCallback = Callable[[int, torch.Tensor, torch.Tensor], None]


def evaluate(objective, denoise: Denoise, x: torch.Tensor, i: int, schedule: torch.Tensor, **kw) -> torch.Tensor:
    """The network output for ``x`` at level ``schedule[i]`` (step index ``i``); ``kw`` goes to ``denoise``."""
    level = schedule[i].to(x.device).expand(x.shape[0])
    return denoise(objective.network_input(x, schedule[i]), objective.step_condition(schedule, i, level), step=i, **kw)


def first_order_update(objective, model_out: torch.Tensor, x: torch.Tensor, schedule: torch.Tensor, i: int) -> torch.Tensor:
    """x at the next level along the estimates read from ``model_out``: a_next x0 + s_next eps.

    ``model_out`` may stack several predictions on a leading dimension (they broadcast
    against ``x``), as the mixture of horizons compares its horizons' steps.
    """
    # Schedule entries are 0-dim: their coefficients broadcast as scalars (and are memoized).
    x0, eps = objective.prediction(model_out, x, schedule[i])
    a, s = objective.coefficients(per_sample(objective.next_level(schedule, i), x))
    return a * x0 + s * eps


def first_order_step(objective, denoise, x, schedule, i, generator=None, callback: StepCallback | None = None):
    out = evaluate(objective, denoise, x, i, schedule)
    if callback is not None:
        callback(i, x, out)
    return first_order_update(objective, out, x, schedule, i)


def heun_step(objective, denoise, x, schedule, i, generator=None, callback: StepCallback | None = None):
    """Heun's second-order step along dx/dl; the last step (to the clean level) stays first order."""
    if not objective.continuous:
        raise ValueError(f"the heun solver needs a continuous process; {objective.cfg.type} is discrete")
    out = evaluate(objective, denoise, x, i, schedule)
    if callback is not None:
        callback(i, x, out)
    if i + 1 >= len(schedule):
        return first_order_update(objective, out, x, schedule, i)
    level, next_level = schedule[i].to(x.device, x.dtype), schedule[i + 1].to(x.device, x.dtype)
    dl = next_level - level
    d0 = objective.derivative(*objective.prediction(out, x, level), level)
    x_euler = x + dl * d0
    d1 = objective.derivative(*objective.prediction(evaluate(objective, denoise, x_euler, i + 1, schedule), x_euler, next_level), next_level)
    return x + dl * 0.5 * (d0 + d1)


SOLVERS = {"ddim": first_order_step, "dpm_solver_1": first_order_step, "euler": first_order_step, "heun": heun_step}
SECOND_ORDER = {"heun"}


def register_solver(name: str, step: Callable, second_order: bool = False) -> None:
    SOLVERS[name] = step
    if second_order:
        SECOND_ORDER.add(name)


def function_evaluations(objective, num_steps: int, start: int = 0) -> int:
    """Network evaluations that sampling ``schedule(num_steps)[start:]`` costs."""
    n = num_steps - start
    return 2 * n - 1 if objective.cfg.solver in SECOND_ORDER and n > 0 else n


@torch.no_grad()
def sample(
    objective,
    denoise: Denoise,
    x: torch.Tensor,
    schedule: torch.Tensor,
    start: int = 0,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
    constraint=None,
) -> torch.Tensor:
    """Run ``schedule[start:]`` from ``x`` (a prior draw when start == 0) with the objective's
    solver, or with ``constraint.step`` (a prefix constraint, :mod:`mixpolicy.policies.prefix`)."""
    step = constraint.step if constraint is not None else SOLVERS[objective.cfg.solver]
    for i in range(start, len(schedule)):
        x = step(objective, denoise, x, schedule, i, generator, callback)
    return x
