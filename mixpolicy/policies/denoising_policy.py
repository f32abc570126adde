"""Transformer denoising policy: observation history (+ task or language goal) -> action chunk.

Condition tokens, in order: [goal] then, for each of the n_obs_steps time steps, one
token for the concatenated low-dim keys (if any) and one per camera. The policy owns its
normalizer, so a checkpoint is self-contained: raw observations in, raw actions out.

Subclasses change the denoiser's blocks through :attr:`mlp_factory` and add losses and
sampling preparation through :meth:`auxiliary_losses` and :meth:`prepare_sampling`.
Sampling goes through :meth:`sample_chunk`, which also says how many actions of each
chunk to execute when the policy decides that itself (mixture of horizons' adaptive
execution); :meth:`plan` returns raw actions with that count.
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
from mixpolicy.policies.encoders import ImageEncoder, LowDimEncoder, trunk_output_size
from mixpolicy.policies.language import LanguageGoal, task_text
from mixpolicy.policies.networks.transformer import DenoisingTransformer, dense_mlp
from mixpolicy.policies.objectives import make_objective, sample

TASK_KEY = "task"


@dataclass
class ShapeMeta:
    """What the dataset tells the policy: per-key shapes, action size, tasks and their texts."""

    obs: dict[str, list[int]]
    action_dim: int
    tasks: list[str] = field(default_factory=list)
    discrete_action_dims: list[int] = field(default_factory=list)
    task_descriptions: dict[str, str] = field(default_factory=dict)
    fps: float = 0.0  # control rate of the training data (0: not recorded, older checkpoints)
    feature_names: dict[str, list[str]] = field(default_factory=dict)  # key -> names of its dims, when recorded

    def to_json(self) -> dict:
        return {
            "fps": float(self.fps),
            "feature_names": {k: list(v) for k, v in self.feature_names.items()},
            "obs": {k: list(v) for k, v in self.obs.items()},
            "action_dim": self.action_dim,
            "tasks": list(self.tasks),
            "discrete_action_dims": list(self.discrete_action_dims),
            "task_descriptions": dict(self.task_descriptions),
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "ShapeMeta":
        return cls(
            obs={k: [int(s) for s in v] for k, v in d["obs"].items()},
            action_dim=int(d["action_dim"]),
            tasks=list(d.get("tasks", [])),
            discrete_action_dims=[int(i) for i in d.get("discrete_action_dims", [])],
            task_descriptions=dict(d.get("task_descriptions", {})),
            fps=float(d.get("fps", 0.0)),
            feature_names={k: [str(n) for n in v] for k, v in d.get("feature_names", {}).items()},
        )


@dataclass
class ActionPlan:
    """Raw action chunks and how many of each to execute before planning again."""

    actions: torch.Tensor  # (B, horizon, action_dim)
    executable: torch.Tensor  # (B,) long, in [1, horizon]


def _is_image(shape: list[int]) -> bool:
    return len(shape) == 3 and shape[-1] == 3


def key_offsets(cfg: PolicyConfig) -> dict[str, range]:
    """Time offsets a policy with config ``cfg`` reads from the dataset, relative to the current step:
    the last ``n_obs_steps`` observations and the next ``horizon`` actions."""
    offsets = {k: range(-(cfg.n_obs_steps - 1), 1) for k in cfg.obs_keys}
    offsets[cfg.action_key] = range(0, cfg.horizon)
    return offsets


def example_observation(policy: "DenoisingPolicy", batch: int = 1) -> dict[str, torch.Tensor]:
    """A random observation batch in the policy's input layout (for latency measurements and warm-up).

    Image keys get random uint8 frames, low-dim keys standard-normal values, every sample task 0.
    """
    obs: dict[str, torch.Tensor] = {}
    for k in policy.cfg.obs_keys:
        shape = policy.shape_meta.obs[k]
        if len(shape) == 3:
            obs[k] = torch.randint(0, 256, (batch, policy.cfg.n_obs_steps, *shape), dtype=torch.uint8)
        else:
            obs[k] = torch.randn(batch, policy.cfg.n_obs_steps, *shape)
    obs["task"] = torch.zeros(batch, dtype=torch.long)
    return obs


class DenoisingPolicy(nn.Module):
    """Policy interface: compute_loss(batch), predict_action_chunk(obs), select_action(obs), reset()."""

    mlp_factory = staticmethod(dense_mlp)
    # True when a training step may leave parameters without a gradient (a mixture routing
    # samples to some experts only); data-parallel training then looks for them every step.
    may_skip_parameters = False

    def __init__(self, cfg: PolicyConfig, shape_meta: ShapeMeta, normalizer: Normalizer | None = None):
        super().__init__()
        self.cfg = cfg
        self.shape_meta = shape_meta
        missing = [k for k in cfg.obs_keys if k not in shape_meta.obs]
        if missing:
            raise UserError(f"policy.obs_keys {missing} are not in the dataset (it has {sorted(shape_meta.obs)})")
        self.lowdim_keys = [k for k in cfg.obs_keys if len(shape_meta.obs[k]) == 1]
        self.image_keys = [k for k in cfg.obs_keys if _is_image(shape_meta.obs[k])]
        other = [k for k in cfg.obs_keys if k not in self.lowdim_keys and k not in self.image_keys]
        if other:
            k = other[0]
            raise UserError(f"observation key {k!r} has shape {shape_meta.obs[k]}: policies take low-dim (D,) or image (H, W, 3) keys")
        if normalizer is None:
            dims = {k: shape_meta.obs[k][0] for k in self.lowdim_keys}
            dims[cfg.action_key] = shape_meta.action_dim
            normalizer = Normalizer.empty_like(dims)
        self.normalizer = normalizer
        width = cfg.network.width

        self.obs_encoder = None
        if self.lowdim_keys:
            obs_dim = sum(shape_meta.obs[k][0] for k in self.lowdim_keys)
            self.obs_encoder = LowDimEncoder(obs_dim, cfg.obs_hidden, width)
        self.task_embedding: nn.Module | None = None
        n_tasks = max(1, len(shape_meta.tasks))
        if cfg.task_conditioning == "embedding":
            self.task_embedding = nn.Embedding(n_tasks, width)
        elif cfg.task_conditioning == "language":
            texts = [task_text(t, shape_meta.task_descriptions) for t in shape_meta.tasks] or ["do the task"]
            self.task_embedding = LanguageGoal(texts, width)
        self.image_encoder = None
        for k in self.image_keys:
            side = min(shape_meta.obs[k][:2])
            crop = cfg.image_encoder.crop_size
            seen = min(side, crop) if crop else side
            if trunk_output_size(seen) < 2:
                raise UserError(
                    f"images {k!r} of {side} px (crop {crop}) leave a 1x1 ResNet feature map, where spatial softmax "
                    "sees nothing; use images or crops of at least 33 px"
                )
        if self.image_keys:
            goal_dim = width if self.task_embedding is not None else 0
            self.image_encoder = ImageEncoder(cfg.image_encoder, self.image_keys, width, goal_dim)
        tokens_per_step = (1 if self.lowdim_keys else 0) + len(self.image_keys)
        n_cond = cfg.n_obs_steps * tokens_per_step + (1 if self.task_embedding is not None else 0)
        self.net = DenoisingTransformer(cfg.network, shape_meta.action_dim, cfg.horizon, n_cond, mlp_factory=type(self).mlp_factory)
        self.objective = make_objective(cfg.objective)
        self._queue: deque[torch.Tensor] = deque()

    # ------------------------------------------------------------------ helpers
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def key_offsets(self) -> dict[str, range]:
        """Time offsets the policy needs from the dataset, relative to the current step."""
        return key_offsets(self.cfg)

    def task_index(self, task: str) -> int:
        if task not in self.shape_meta.tasks:
            raise UserError(f"task {task!r} is not one this policy was trained on ({', '.join(self.shape_meta.tasks)})")
        return self.shape_meta.tasks.index(task)

    def parameter_counts(self) -> dict[str, int]:
        """Total parameters and those one denoising step of one sample uses (dense: all)."""
        total = sum(p.numel() for p in self.parameters())
        return {"total": total, "active": total}

    def _check_history(self, k: str, x: torch.Tensor, ndim: int, what: str) -> None:
        if x.ndim != ndim or x.shape[1] != self.cfg.n_obs_steps:
            raise ValueError(f"obs[{k!r}] must be (batch, n_obs_steps={self.cfg.n_obs_steps}, {what}), got {tuple(x.shape)}")

    def encode_obs(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Raw observation history -> condition tokens (B, C, width)."""
        goal = None
        if self.task_embedding is not None:
            task = obs.get(TASK_KEY)
            if task is None:
                raise ValueError("this policy is task-conditioned: obs needs a 'task' index tensor")
            goal = self.task_embedding(task.long().view(-1))
        per_step = []
        if self.obs_encoder is not None:
            parts = []
            for k in self.lowdim_keys:
                self._check_history(k, obs[k], 3, "dim")
                parts.append(self.normalizer.normalize(k, obs[k].float()))
            per_step.append(self.obs_encoder(torch.cat(parts, dim=-1))[:, :, None])
        if self.image_encoder is not None:
            for k in self.image_keys:
                self._check_history(k, obs[k], 5, "H, W, 3")
            per_step.append(self.image_encoder({k: obs[k] for k in self.image_keys}, goal))
        tokens = torch.cat(per_step, dim=2).flatten(1, 2)  # time-major: t0 tokens, t1 tokens, ...
        if goal is not None:
            tokens = torch.cat([goal[:, None, :], tokens], dim=1)
        return tokens

    def denoiser(self, cond: torch.Tensor, schedule: torch.Tensor | None = None):
        """``denoise(x, level, step=None)`` with ``cond`` bound. With a sampling ``schedule``
        the network is first prepared for it (e.g. MoDE's expert cache, keyed by the step
        index into that schedule); without one it runs uncached (training, losses)."""
        self.prepare_sampling(schedule)
        net = self.net
        return lambda x, level, step=None: net(x, level, cond, step)

    # ------------------------------------------------------------------ hooks
    def prepare_sampling(self, schedule: torch.Tensor | None) -> None:
        """Called before sampling ``schedule`` (None: uncached evaluation); dense policies need nothing."""

    def auxiliary_losses(self) -> tuple[torch.Tensor | float, dict[str, float]]:
        """Extra weighted loss terms of the last training forward, and their logs."""
        return 0.0, {}

    # ------------------------------------------------------------------ training
    def compute_loss(self, batch: Mapping[str, torch.Tensor], generator: torch.Generator | None = None):
        """Returns (scalar loss, dict of float logs)."""
        cond = self.encode_obs(batch)
        actions = self.normalizer.normalize(self.cfg.action_key, batch[self.cfg.action_key].float())
        per_elem = self.objective.loss(self.denoiser(cond), actions, generator)
        denoise_loss = per_elem.mean()
        aux, logs = self.auxiliary_losses()
        loss = denoise_loss + aux
        return loss, {"loss": float(loss.detach()), "denoise_loss": float(denoise_loss.detach()), **logs}

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def sample_chunk(
        self, cond: torch.Tensor, x: torch.Tensor, schedule: torch.Tensor, start: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Denoise normalized chunks ``x`` (at level ``schedule[start]``) to clean ones.

        Returns (chunks, executable): ``executable`` (B,) is the number of actions to run
        when the policy chooses it per chunk (adaptive execution), else None.
        """
        return sample(self.objective, self.denoiser(cond, schedule), x, schedule, start=start), None

    def set_execution(self, execution: str | None = None, adaptive_ratio: float | None = None) -> None:
        """Choose how many actions of each chunk run; only mixtures of horizons can adapt."""
        if execution == "adaptive" or adaptive_ratio:
            raise UserError(f"adaptive execution needs a mixture-of-horizons policy (dit_moh, mode_moh); this one is {self.cfg.type!r}")

    def execution_info(self) -> dict[str, Any]:
        """How many actions of each chunk run, for reports."""
        return {"execution": "fixed", "n_action_steps": self.cfg.n_action_steps}

    @torch.no_grad()
    def plan(
        self,
        obs: Mapping[str, torch.Tensor],
        generator: torch.Generator | None = None,
        num_steps: int | None = None,
    ) -> ActionPlan:
        """Raw action chunks for a batch of observation histories, with the executed count."""
        cond = self.encode_obs(obs)
        b = cond.shape[0]
        schedule = self.objective.schedule(num_steps)
        x = self.objective.prior((b, self.cfg.horizon, self.shape_meta.action_dim), generator, cond.device, cond.dtype)
        x, executable = self.sample_chunk(cond, x, schedule)
        if executable is None:
            executable = torch.full((b,), self.cfg.n_action_steps, dtype=torch.long, device=x.device)
        return ActionPlan(self.normalizer.unnormalize(self.cfg.action_key, x.float()), executable)

    @torch.no_grad()
    def predict_action_chunk(
        self,
        obs: Mapping[str, torch.Tensor],
        generator: torch.Generator | None = None,
        num_steps: int | None = None,
    ) -> torch.Tensor:
        """(B, horizon, action_dim) raw actions for a batch of observation histories."""
        return self.plan(obs, generator, num_steps).actions

    @torch.no_grad()
    def select_action(self, obs: Mapping[str, torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        """Receding horizon: plan a chunk when the queue is empty, return its next action (B, A)."""
        if not self._queue:
            chunk = self.predict_action_chunk(obs, generator)
            self._queue.extend(chunk[:, : self.cfg.n_action_steps].unbind(1))
        return self._queue.popleft()

    def reset(self) -> None:
        self._queue.clear()
