"""Transformer denoising policy: observation history (+ task) -> action chunk.

The policy owns its normalizer, so a checkpoint is self-contained: raw observations in,
raw actions out.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn

from mixpolicy.datasets.normalizer import Normalizer
from mixpolicy.errors import UserError
from mixpolicy.policies.config import PolicyConfig
from mixpolicy.policies.networks.transformer import DenoisingTransformer
from mixpolicy.policies.objectives import make_objective, sample

TASK_KEY = "task"


@dataclass
class ShapeMeta:
    """What the dataset tells the policy: per-key shapes, action size, task list."""

    obs: dict[str, list[int]]
    action_dim: int
    tasks: list[str] = field(default_factory=list)
    discrete_action_dims: list[int] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "obs": {k: list(v) for k, v in self.obs.items()},
            "action_dim": self.action_dim,
            "tasks": list(self.tasks),
            "discrete_action_dims": list(self.discrete_action_dims),
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "ShapeMeta":
        return cls(
            obs={k: [int(s) for s in v] for k, v in d["obs"].items()},
            action_dim=int(d["action_dim"]),
            tasks=list(d.get("tasks", [])),
            discrete_action_dims=[int(i) for i in d.get("discrete_action_dims", [])],
        )


class LowDimEncoder(nn.Module):
    """Concatenated low-dim keys of one time step -> one token."""

    def __init__(self, in_dim: int, hidden: int, width: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.SiLU(), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class DenoisingPolicy(nn.Module):
    """Policy interface: compute_loss(batch), predict_action_chunk(obs), select_action(obs), reset()."""

    def __init__(self, cfg: PolicyConfig, shape_meta: ShapeMeta, normalizer: Normalizer | None = None):
        super().__init__()
        self.cfg = cfg
        self.shape_meta = shape_meta
        missing = [k for k in cfg.obs_keys if k not in shape_meta.obs]
        if missing:
            raise UserError(f"policy.obs_keys {missing} are not in the dataset (it has {sorted(shape_meta.obs)})")
        for k in cfg.obs_keys:
            if len(shape_meta.obs[k]) != 1:
                raise UserError(f"observation key {k!r} has shape {shape_meta.obs[k]}: the dit policy takes low-dim (1-D) keys")
        if normalizer is None:
            dims = {k: shape_meta.obs[k][0] for k in cfg.obs_keys}
            dims[cfg.action_key] = shape_meta.action_dim
            normalizer = Normalizer.empty_like(dims)
        self.normalizer = normalizer
        width = cfg.network.width
        obs_dim = sum(shape_meta.obs[k][0] for k in cfg.obs_keys)
        self.obs_encoder = LowDimEncoder(obs_dim, cfg.obs_hidden, width)
        n_cond = cfg.n_obs_steps
        self.task_embedding = None
        if cfg.task_conditioning == "embedding":
            self.task_embedding = nn.Embedding(max(1, len(shape_meta.tasks)), width)
            n_cond += 1
        self.net = DenoisingTransformer(cfg.network, shape_meta.action_dim, cfg.horizon, n_cond)
        self.objective = make_objective(cfg.objective)
        self._queue: deque[torch.Tensor] = deque()

    # ------------------------------------------------------------------ helpers
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def key_offsets(self) -> dict[str, range]:
        """Time offsets the policy needs from the dataset, relative to the current step."""
        offsets = {k: range(-(self.cfg.n_obs_steps - 1), 1) for k in self.cfg.obs_keys}
        offsets[self.cfg.action_key] = range(0, self.cfg.horizon)
        return offsets

    def task_index(self, task: str) -> int:
        if task not in self.shape_meta.tasks:
            raise UserError(f"task {task!r} is not one this policy was trained on ({', '.join(self.shape_meta.tasks)})")
        return self.shape_meta.tasks.index(task)

    def encode_obs(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Raw observation history -> condition tokens (B, C, width)."""
        parts = []
        for k in self.cfg.obs_keys:
            x = obs[k]
            if x.ndim != 3 or x.shape[1] != self.cfg.n_obs_steps:
                raise ValueError(f"obs[{k!r}] must be (batch, n_obs_steps={self.cfg.n_obs_steps}, dim), got {tuple(x.shape)}")
            parts.append(self.normalizer.normalize(k, x.float()))
        tokens = self.obs_encoder(torch.cat(parts, dim=-1))
        if self.task_embedding is not None:
            task = obs.get(TASK_KEY)
            if task is None:
                raise ValueError("this policy is task-conditioned: obs needs a 'task' index tensor")
            tokens = torch.cat([self.task_embedding(task.long().view(-1))[:, None, :], tokens], dim=1)
        return tokens

    def _denoiser(self, cond: torch.Tensor):
        return lambda x, level: self.net(x, level, cond)

    # ------------------------------------------------------------------ training
    def compute_loss(self, batch: Mapping[str, torch.Tensor], generator: torch.Generator | None = None):
        """Returns (scalar loss, dict of float logs)."""
        cond = self.encode_obs(batch)
        actions = self.normalizer.normalize(self.cfg.action_key, batch[self.cfg.action_key].float())
        per_elem = self.objective.loss(self._denoiser(cond), actions, generator)
        loss = per_elem.mean()
        return loss, {"loss": float(loss.detach())}

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def predict_action_chunk(
        self,
        obs: Mapping[str, torch.Tensor],
        generator: torch.Generator | None = None,
        num_steps: int | None = None,
    ) -> torch.Tensor:
        """(B, horizon, action_dim) raw actions for a batch of observation histories."""
        cond = self.encode_obs(obs)
        b = cond.shape[0]
        schedule = self.objective.schedule(num_steps)
        x = self.objective.prior((b, self.cfg.horizon, self.shape_meta.action_dim), generator, cond.device, cond.dtype)
        x = sample(self.objective, self._denoiser(cond), x, schedule)
        return self.normalizer.unnormalize(self.cfg.action_key, x.float())

    @torch.no_grad()
    def select_action(self, obs: Mapping[str, torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        """Receding horizon: plan a chunk when the queue is empty, return its next action (B, A)."""
        if not self._queue:
            chunk = self.predict_action_chunk(obs, generator)
            self._queue.extend(chunk[:, : self.cfg.n_action_steps].unbind(1))
        return self._queue.popleft()

    def reset(self) -> None:
        self._queue.clear()
