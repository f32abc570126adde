"""Transformer denoising policy: observation history (+ task or language goal) -> action chunk.

One class composed of parts chosen by config (:mod:`mixpolicy.policies.factory`): the
observation encoders, a network (dense or MoDE), a head (single horizon or mixture of
horizons) and an objective (DDPM, EDM, flow). Condition tokens, in order: [goal] then, for
each of the n_obs_steps time steps, one token for the concatenated low-dim keys (if any)
and one per camera. The policy owns its normalizer, so a checkpoint is self-contained:
raw observations in, raw actions out.

Inference has one path, :meth:`plan`: a cold call starts from the objective's prior, a
warm start (:class:`WarmStart`: RTI's shifted previous chunk) from a guess at a later index
of the schedule; the head samples (and, for adaptive execution, says how many actions to
run) and the network prepares itself for the schedule (MoDE's expert cache).
"""

from __future__ import annotations

import dataclasses
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn

from mixpolicy.datasets.normalizer import Normalizer
from mixpolicy.errors import UserError
from mixpolicy.keys import is_image_key
from mixpolicy.policies.config import PolicyConfig
from mixpolicy.policies.encoders import ImageEncoder, LowDimEncoder, trunk_output_size
from mixpolicy.policies.image_config import resolve_crop
from mixpolicy.policies.factory import build_head, build_network, make_objective
from mixpolicy.policies.language import LanguageGoal, task_text
from mixpolicy.policies.objectives import randn
from mixpolicy.policies.prefix import PrefixConstraint

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
    normalized: torch.Tensor | None = None  # (B, horizon, action_dim) the clean chunks in normalized space
    steps: int = 0  # schedule steps this call ran
    warm: bool = False  # started from a warm-start guess


@dataclass
class WarmStart:
    """Start sampling from ``guess`` (normalized chunks) at index ``start`` of the schedule.

    ``renoise`` moves the guess to that level by the forward process (fresh noise);
    without it the guess is taken as the state at that level as it is. ``num_steps`` names
    the schedule whose tail runs (None: the call's own), so a warm start can begin at a
    chosen noise level (:func:`mixpolicy.deploy.rti.warm_schedule_steps`).
    """

    guess: torch.Tensor
    start: int
    renoise: bool = True
    num_steps: int | None = None

    def initial(self, objective, schedule: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        if not 0 <= self.start < len(schedule):
            raise ValueError(f"warm start index {self.start} is outside the schedule's {len(schedule)} steps")
        if not self.renoise:
            return self.guess
        # add_noise takes standard normal noise (the prior may be scaled, as EDM's is).
        noise = randn(self.guess.shape, generator, self.guess.device, self.guess.dtype)
        return objective.add_noise(self.guess, noise, schedule[self.start].expand(self.guess.shape[0]))


def key_offsets(cfg: PolicyConfig) -> dict[str, range]:
    """Time offsets a policy with config ``cfg`` reads from the dataset, relative to the current step:
    the last ``n_obs_steps`` observations and the next ``horizon`` actions."""
    offsets = {k: range(-(cfg.n_obs_steps - 1), 1) for k in cfg.obs_keys}
    offsets[cfg.action_key] = range(0, cfg.horizon)
    return offsets


def sampling_start(objective, num_steps, shape, generator, like: torch.Tensor, warm_start=None, prefix=None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The schedule a call runs (the warm start's own when it names one, else ``num_steps``'s),
    the sampler's first state and its schedule index: a prior draw (device and dtype of
    ``like``), or ``warm_start``'s guess at its index; warm start and prefix must fit ``shape``."""
    if warm_start is not None and warm_start.num_steps:
        num_steps = warm_start.num_steps
    schedule = objective.schedule(num_steps)
    for what, t in (("warm start guess", None if warm_start is None else warm_start.guess), ("prefix target", None if prefix is None else prefix.target)):
        if t is not None and tuple(t.shape) != tuple(shape):
            raise ValueError(f"{what} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if warm_start is None:
        return schedule, objective.prior(shape, generator, like.device, like.dtype), 0
    return schedule, warm_start.initial(objective, schedule, generator), warm_start.start


def example_observation(policy: "DenoisingPolicy", batch: int = 1) -> dict[str, torch.Tensor]:
    """A random observation batch in the policy's input layout (for latency measurements and warm-up).

    Image keys get random uint8 frames, low-dim keys standard-normal values, every sample task 0.
    """
    obs: dict[str, torch.Tensor] = {}
    for k in policy.cfg.obs_keys:
        shape = policy.shape_meta.obs[k]
        if is_image_key(k):
            obs[k] = torch.randint(0, 256, (batch, policy.cfg.n_obs_steps, *shape), dtype=torch.uint8)
        else:
            obs[k] = torch.randn(batch, policy.cfg.n_obs_steps, *shape)
    obs["task"] = torch.zeros(batch, dtype=torch.long)
    return obs


class DenoisingPolicy(nn.Module):
    """Policy interface: compute_loss(batch), plan(obs), predict_action_chunk(obs), select_action(obs), reset()."""

    def __init__(self, cfg: PolicyConfig, shape_meta: ShapeMeta, normalizer: Normalizer | None = None):
        super().__init__()
        self.cfg = cfg
        self.shape_meta = shape_meta
        missing = [k for k in cfg.obs_keys if k not in shape_meta.obs]
        if missing:
            raise UserError(f"policy.obs_keys {missing} are not in the dataset (it has {sorted(shape_meta.obs)})")
        self.image_keys = [k for k in cfg.obs_keys if is_image_key(k)]
        self.lowdim_keys = [k for k in cfg.obs_keys if not is_image_key(k)]
        for k in cfg.obs_keys:
            shape = shape_meta.obs[k]
            if (len(shape) == 3 and shape[-1] == 3) != is_image_key(k) or len(shape) not in (1, 3):
                raise UserError(
                    f"observation key {k!r} has shape {shape}: policies take low-dim (D,) keys and image_<camera> (H, W, 3) keys"
                )
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
        if self.image_keys:
            # crop_size=auto becomes pixels for these images; the checkpoint saves the number
            ie = resolve_crop(cfg.image_encoder, [tuple(shape_meta.obs[k][:2]) for k in self.image_keys])
            self.cfg = cfg = dataclasses.replace(cfg, image_encoder=ie)
            for k in self.image_keys:
                side = min(shape_meta.obs[k][:2])
                seen = min(side, ie.crop_size) if ie.crop_size else side
                if trunk_output_size(seen, ie) < 2:
                    raise UserError(
                        f"images {k!r} of {side} px (crop {ie.crop_size}) leave a 1x1 {ie.trunk} feature map, where spatial "
                        "softmax sees nothing; use larger images or crops"
                    )
            goal_dim = width if self.task_embedding is not None else 0
            self.image_encoder = ImageEncoder(ie, self.image_keys, width, goal_dim)
        tokens_per_step = (1 if self.lowdim_keys else 0) + len(self.image_keys)
        n_cond = cfg.n_obs_steps * tokens_per_step + (1 if self.task_embedding is not None else 0)
        self.objective = make_objective(cfg.objective)
        self.net = build_network(
            cfg.network, shape_meta.action_dim, cfg.horizon, n_cond, clean_prefix=cfg.train_delay_max > 0, step_conditioned=self.objective.step_conditioned
        )
        self.net.check_routing(len(shape_meta.tasks), self.task_embedding is not None)
        self.head = build_head(cfg.head, cfg.horizon, self.net)
        self._queue: deque[torch.Tensor] = deque()
        # A distillation run's frozen teacher (:class:`mixpolicy.policies.distill.Teacher`): not a
        # submodule, so it is neither trained nor saved with the student.
        self.teacher = None

    # ------------------------------------------------------------------ capabilities
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def skips_parameters(self) -> bool:
        """True when a training step may leave parameters without a gradient (MoDE's unrouted
        experts; the clean-prefix embedding in a batch drawn without a prefix)."""
        return self.net.skips_parameters or self.prefix_conditioned

    @property
    def adaptive_execution(self) -> bool:
        """True when the policy chooses how many actions of each chunk run (MoH adaptive)."""
        return self.head.adaptive

    @property
    def prefix_conditioned(self) -> bool:
        """True when the policy was trained to take a clean action prefix (training-time RTC)."""
        return self.net.prefix_in is not None

    @property
    def task_conditioned(self) -> bool:
        return self.task_embedding is not None

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
        net_total, net_active = self.net.parameter_counts()
        return {"total": total, "active": total - (net_total - net_active)}

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
        # Networks that route on the task (MoDE router_input=task|both) read it from here.
        self.net.set_routing_context(goal, obs.get(TASK_KEY))
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

    def prepare_sampling(self, schedule: torch.Tensor | None) -> None:
        """Ready the network for sampling ``schedule`` (None: uncached evaluation, training)."""
        levels = None if schedule is None else self.objective.schedule_conditions(schedule.to(self.device))
        self.net.prepare_sampling(schedule, levels)

    def denoiser(self, cond: torch.Tensor, schedule: torch.Tensor | None = None):
        """``denoise(x, level, step=None)`` -> the head's prediction with ``cond`` bound. With
        a sampling ``schedule`` the network is first prepared for it (MoDE's expert cache,
        keyed by the step index into that schedule); without one it runs uncached."""
        self.prepare_sampling(schedule)
        net, head = self.net, self.head
        cond = net.condition(cond)
        return lambda x, level, step=None: head(net, x, level, cond, step)

    # ------------------------------------------------------------------ training
    def compute_loss(self, batch: Mapping[str, torch.Tensor], generator: torch.Generator | None = None):
        """Returns (scalar loss, dict of float logs)."""
        self.prepare_sampling(None)
        cond = self.encode_obs(batch)
        actions = self.normalizer.normalize(self.cfg.action_key, batch[self.cfg.action_key].float())
        objective = self.objective if self.teacher is None else self.teacher.objective_for(self.objective, batch)
        head_loss, logs = self.head.loss(self.net, objective, cond, actions, generator, self.training_prefix(actions, generator))
        aux, aux_logs = self.net.auxiliary_losses()
        loss = head_loss + aux
        return loss, {"loss": float(loss.detach()), **logs, **aux_logs}

    def training_prefix(self, actions: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor | None:
        """(B, H) mask of the clean prefix of each sample (training-time RTC), or None when off."""
        cfg = self.cfg
        if cfg.train_delay_max == 0:
            return None
        b, h = actions.shape[:2]
        dev = generator.device if generator is not None else "cpu"
        delay = torch.randint(0, cfg.train_delay_max + 1, (b,), generator=generator, device=dev)
        if cfg.train_delay_prob < 1:
            delay = delay * (torch.rand(b, generator=generator, device=dev) < cfg.train_delay_prob)
        return torch.arange(h, device=actions.device)[None, :] < delay.to(actions.device)[:, None]

    # ------------------------------------------------------------------ inference
    def set_execution(self, execution: str | None = None, adaptive_ratio: float | None = None) -> None:
        """Choose how many actions of each chunk run after training; only mixtures of horizons can adapt."""
        changes = {}
        if execution:
            changes["execution"] = execution
        if adaptive_ratio:
            changes["adaptive_ratio"] = float(adaptive_ratio)
        if not changes:
            return
        if self.cfg.head.type != "moh":
            if changes.get("execution", "fixed") == "fixed" and "adaptive_ratio" not in changes:
                return
            raise UserError(f"adaptive execution needs a mixture-of-horizons policy (policy/head=moh); this one is {self.cfg.type!r}")
        # Rebuilding the configs re-runs their validation.
        self.cfg = dataclasses.replace(self.cfg, head=dataclasses.replace(self.cfg.head, **changes))
        self.head.cfg = self.cfg.head

    def execution_info(self) -> dict[str, Any]:
        """How many actions of each chunk run, for reports."""
        return self.head.execution_info(self.cfg.n_action_steps)

    @torch.no_grad()
    def plan(
        self,
        obs: Mapping[str, torch.Tensor],
        generator: torch.Generator | None = None,
        num_steps: int | None = None,
        warm_start: WarmStart | None = None,
        prefix: PrefixConstraint | None = None,
    ) -> ActionPlan:
        """Raw action chunks for a batch of observation histories, with the executed count.

        Runs the objective's schedule of ``num_steps`` (default: the config's), from the
        prior, or from ``warm_start`` at its index of that schedule (or of its own); ``prefix`` ties the
        chunk's first actions to the one being executed (real-time chunking).
        """
        cond = self.encode_obs(obs)
        b = cond.shape[0]
        shape = (b, self.cfg.horizon, self.shape_meta.action_dim)
        schedule, x, start = sampling_start(self.objective, num_steps, shape, generator, cond, warm_start, prefix)
        self.prepare_sampling(schedule)
        cond = self.net.condition(cond)  # once per chunk (a cached network's memory)
        x, executable = self.head.sample(self.net, self.objective, cond, x, schedule, start, generator, constraint=prefix)
        if executable is None:
            executable = torch.full((b,), self.cfg.n_action_steps, dtype=torch.long, device=x.device)
        actions = self.normalizer.unnormalize(self.cfg.action_key, x.float())
        return ActionPlan(actions, executable, normalized=x, steps=len(schedule) - start, warm=start > 0)

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
        """Receding horizon: plan a chunk when the queue is empty, return its next action (B, A).
        A batch re-plans together after its shortest executable prefix."""
        if not self._queue:
            plan = self.plan(obs, generator)
            self._queue.extend(plan.actions[:, : int(plan.executable.min())].unbind(1))
        return self._queue.popleft()

    def reset(self) -> None:
        self._queue.clear()
