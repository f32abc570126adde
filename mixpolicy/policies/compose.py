"""Policy composition at sampling time: several trained policies denoise one chunk together.

At every solver step each parent policy evaluates the same noisy chunk with its own
observation keys and encoders, and the step follows the convex combination
sum_i w_i F_i of their network outputs. Every objective reads its prediction linearly from
the network output for a given state and level (DDPM's epsilon / x0 / v, EDM's
preconditioned F, flow's velocity), so with one shared objective this is exactly the
combination of their denoised predictions, as in composing diffusion policies (GPC).

Parents must share the objective (type and settings), the chunk (horizon, action size),
the observation history length and the action normalization (they were trained on the
same actions); the composition has the first parent's execution settings. It offers the
policy's inference interface (``plan``, ``select_action``, ``reset``, ...), so evaluation,
RTI warm starts and real-time chunking use it unchanged.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from mixpolicy.config import to_dict
from mixpolicy.errors import UserError
from mixpolicy.policies.denoising_policy import ActionPlan, DenoisingPolicy, ShapeMeta, WarmStart, sampling_start
from mixpolicy.policies.prefix import PrefixConstraint
from mixpolicy.policies.solvers import sample


def _check_compatible(parents: Sequence[DenoisingPolicy]) -> None:
    first = parents[0]
    for i, p in enumerate(parents[1:], start=1):
        what = f"policy {i} of the composition"
        if to_dict(p.cfg.objective) != to_dict(first.cfg.objective):
            raise UserError(f"{what} has another objective ({p.cfg.objective.type}) or objective settings than policy 0; parents must share one")
        for field in ("horizon", "n_obs_steps", "action_key"):
            if getattr(p.cfg, field) != getattr(first.cfg, field):
                raise UserError(f"{what} has {field}={getattr(p.cfg, field)!r}, policy 0 {getattr(first.cfg, field)!r}")
        if p.shape_meta.action_dim != first.shape_meta.action_dim:
            raise UserError(f"{what} acts in {p.shape_meta.action_dim} dims, policy 0 in {first.shape_meta.action_dim}")
        a, b = p.normalizer.params[p.cfg.action_key], first.normalizer.params[first.cfg.action_key]
        if not (torch.allclose(a.scale, b.scale.to(a.scale.device), rtol=1e-4, atol=1e-6) and torch.allclose(a.offset, b.offset.to(a.offset.device), rtol=1e-4, atol=1e-6)):
            raise UserError(f"{what} normalizes actions differently from policy 0 (trained on other actions); composition needs one action space")
        if p.task_conditioned and first.task_conditioned and p.shape_meta.tasks != first.shape_meta.tasks:
            raise UserError(f"{what} was trained on tasks {p.shape_meta.tasks}, policy 0 on {first.shape_meta.tasks}; task indices must agree")
        for k in set(p.shape_meta.obs) & set(first.shape_meta.obs):
            if p.shape_meta.obs[k] != first.shape_meta.obs[k]:
                raise UserError(f"{what} takes {k!r} of shape {p.shape_meta.obs[k]}, policy 0 of {first.shape_meta.obs[k]}")


class ComposedPolicy(nn.Module):
    """``weights`` (non-negative, summing to 1) over ``parents``."""

    def __init__(self, parents: Sequence[DenoisingPolicy], weights: Sequence[float]):
        super().__init__()
        if len(parents) < 2:
            raise UserError("a composition needs at least two policies")
        if len(weights) != len(parents):
            raise UserError(f"{len(weights)} composition weights for {len(parents)} policies")
        w = torch.tensor([float(x) for x in weights])
        if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or abs(float(w.sum()) - 1.0) > 1e-6:
            raise UserError(f"composition weights must be non-negative and sum to 1, got {list(weights)}")
        _check_compatible(parents)
        self.parents = nn.ModuleList(parents)
        self.weights = [float(x) for x in weights]
        first = parents[0]
        keys = list(dict.fromkeys(k for p in parents for k in p.cfg.obs_keys))
        self.cfg = dataclasses.replace(first.cfg, obs_keys=keys)
        obs = {k: v for p in parents for k, v in p.shape_meta.obs.items() if k in keys}
        self.shape_meta = ShapeMeta(**{**dataclasses.asdict(first.shape_meta), "obs": obs})
        self.normalizer = first.normalizer
        self.objective = first.objective
        self._queue: deque[torch.Tensor] = deque()

    # the capabilities the inference code reads
    @property
    def device(self) -> torch.device:
        return self.parents[0].device

    @property
    def image_keys(self) -> list[str]:
        return list(dict.fromkeys(k for p in self.parents for k in p.image_keys))

    @property
    def head(self):
        return self.parents[0].head

    @property
    def adaptive_execution(self) -> bool:
        return False

    @property
    def prefix_conditioned(self) -> bool:
        return all(p.prefix_conditioned for p in self.parents)

    @property
    def task_conditioned(self) -> bool:
        return any(p.task_conditioned for p in self.parents)

    def task_index(self, task: str) -> int:
        return self.parents[0].task_index(task)

    def set_execution(self, execution: str | None = None, adaptive_ratio: float | None = None) -> None:
        if execution == "adaptive" or adaptive_ratio:
            raise UserError("a composition runs fixed execution (n_action_steps of policy 0)")

    def execution_info(self) -> dict[str, Any]:
        return {"execution": "fixed", "n_action_steps": self.cfg.n_action_steps, "composition_weights": self.weights}

    def parameter_counts(self) -> dict[str, int]:
        counts = [p.parameter_counts() for p in self.parents]
        return {k: sum(c[k] for c in counts) for k in ("total", "active")}

    @torch.no_grad()
    def plan(
        self,
        obs: Mapping[str, torch.Tensor],
        generator: torch.Generator | None = None,
        num_steps: int | None = None,
        warm_start: WarmStart | None = None,
        prefix: PrefixConstraint | None = None,
    ) -> ActionPlan:
        conds = [p.encode_obs(obs) for p in self.parents]
        b = conds[0].shape[0]
        shape = (b, self.cfg.horizon, self.shape_meta.action_dim)
        schedule, x, start = sampling_start(self.objective, num_steps, shape, generator, conds[0], warm_start, prefix)
        for p in self.parents:
            p.prepare_sampling(schedule)
        pairs = [(p, p.net.condition(cond), w) for p, cond, w in zip(self.parents, conds, self.weights)]

        def denoise(x_in, level, step=None, prefix=None):
            return sum(w * p.head(p.net, x_in, level, cond, step, prefix) for p, cond, w in pairs if w > 0)

        x = sample(self.objective, denoise, x, schedule, start, generator, constraint=prefix)
        executable = torch.full((b,), self.cfg.n_action_steps, dtype=torch.long, device=x.device)
        actions = self.normalizer.unnormalize(self.cfg.action_key, x.float())
        return ActionPlan(actions, executable, normalized=x, steps=len(schedule) - start, warm=start > 0)

    @torch.no_grad()
    def predict_action_chunk(self, obs, generator=None, num_steps=None) -> torch.Tensor:
        return self.plan(obs, generator, num_steps).actions

    @torch.no_grad()
    def select_action(self, obs, generator=None) -> torch.Tensor:
        if not self._queue:
            plan = self.plan(obs, generator)
            self._queue.extend(plan.actions[:, : self.cfg.n_action_steps].unbind(1))
        return self._queue.popleft()

    def reset(self) -> None:
        self._queue.clear()
