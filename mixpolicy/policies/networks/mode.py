"""Mixture of denoising experts (MoDE): block MLPs routed per sample, not per token.

The router sees the noise embedding ``c`` (``router_input=noise``, MoDE), the goal (task
or language) embedding (``task``, as Sparse Diffusion Policy) or both concatenated
(``both``), so every token of a sample uses the same experts and, at inference, the
choice is a fixed function of the sampling step and the task. Training
samples the top-k experts without replacement from the router's softmax
(``train_routing="sample"``) or takes the k most probable (``"topk"``); evaluation takes
the k most probable; the chosen probabilities are renormalized to sum to one.

Expert caching: for a fixed sampling schedule, :meth:`MoDEMLP.build_cache` fuses each
step's chosen experts (weights scaled by their probabilities) into one dense SwiGLU, keyed
by the step index. While a cache is active, a call with a step index it lacks raises
:class:`ExpertCacheMiss` instead of falling back to routing. Routing that depends on the
task (task or both inputs, or per-task expert limits) is cached per (step, task): an entry
is fused on its first use by a batch of one task; a batch that mixes tasks is routed
as in training, which gives the same outputs.

Continual learning: experts added to a trained network (``added_experts``, one stage per
``mixpolicy train init_from=... add_experts=N``) live in parameters of their own, with
router outputs of their own, so freezing the earlier ones keeps them bit-identical; per
task, ``task_experts`` limits routing to the leading experts that existed when the task
was learned, so the earlier tasks keep their routing.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from mixpolicy.errors import UserError
from mixpolicy.policies.config import MoDETransformerConfig
from mixpolicy.policies.networks.mode_experts import ExpertCacheMiss, MoDEMLP, RouteInput  # noqa: F401 (ExpertCacheMiss re-exported)
from mixpolicy.policies.networks.transformer import ConditionMemory, DenoisingTransformer

SCHEDULE_CACHES = 4  # schedules whose fused experts are kept at once


def mode_mlp(cfg: MoDETransformerConfig, layer: int) -> nn.Module:
    """``mlp_factory`` for :class:`DenoisingTransformer`."""
    return MoDEMLP(cfg)


class MoDETransformer(DenoisingTransformer):
    """The denoising transformer with MoDE blocks.

    Adds the router losses (load balancing and z-loss, logged per training step), optional
    frozen routers for fine-tuning, and expert caching at inference: for the schedule being
    sampled, each block's chosen experts are fused per step index before sampling starts.
    The cache is dropped whenever the network switches to training mode or loads weights.
    """

    mlp_factory = staticmethod(mode_mlp)
    skips_parameters = True  # an expert no sample was routed to gets no gradient

    def __init__(
        self, cfg: MoDETransformerConfig, action_dim: int, horizon: int, n_cond_tokens: int, clean_prefix: bool = False, step_conditioned: bool = False
    ):
        super().__init__(cfg, action_dim, horizon, n_cond_tokens, clean_prefix=clean_prefix, step_conditioned=step_conditioned)
        if cfg.freeze_router:
            for layer in self.moe_layers():
                layer.router.requires_grad_(False)
        self._cached_schedule: torch.Tensor | None = None
        # Caches of recent schedules (a cold call's and RTI's warm one alternate), keyed by levels.
        self._schedule_caches: OrderedDict[tuple[float, ...], list] = OrderedDict()
        self.register_load_state_dict_post_hook(lambda module, keys: module.clear_expert_cache())
        # Routing on the task: the goal embeddings (B, width) and task indices (B,) of the
        # batch the policy encoded last (set_routing_context), and its one task or None.
        self.task_routed = cfg.router_input != "noise" or bool(cfg.task_experts)
        self._goal: torch.Tensor | None = None
        self._limit_groups: list[tuple[int, torch.Tensor | None]] | None = None
        self._batch_task: int | None = None
        self._context_batch: int | None = None
        if cfg.task_experts:
            self.register_buffer("task_expert_limit", torch.tensor(cfg.task_experts, dtype=torch.long), persistent=False)

    # ------------------------------------------------------------------ task routing
    def check_routing(self, n_tasks: int, task_conditioned: bool) -> None:
        cfg = self.cfg
        if cfg.router_input != "noise" and not task_conditioned:
            raise UserError(f"network.router_input={cfg.router_input} routes on the goal: set policy.task_conditioning=embedding or language")
        if cfg.task_experts and len(cfg.task_experts) != n_tasks:
            raise UserError(f"network.task_experts has {len(cfg.task_experts)} entries; the policy has {n_tasks} tasks")

    def set_routing_context(self, goal: torch.Tensor | None, task: torch.Tensor | None) -> None:
        if not self.task_routed:
            return
        if task is None:
            raise ValueError("this network routes on the task: obs needs a 'task' index tensor")
        task = task.long().view(-1)
        if self.cfg.task_experts and int(task.max()) >= len(self.cfg.task_experts):
            raise ValueError(f"task index {int(task.max())} is past the {len(self.cfg.task_experts)} tasks of network.task_experts")
        self._goal, self._context_batch = goal, task.shape[0]
        # Host reads once per encoded batch: the batch's tasks and expert limits.
        tasks = torch.unique(task)
        self._batch_task = int(tasks[0]) if tasks.numel() == 1 else None
        self._limit_groups = None
        if self.cfg.task_experts:
            limit = self.task_expert_limit[task]
            values = torch.unique(limit).tolist()
            self._limit_groups = [(int(values[0]), None)] if len(values) == 1 else [
                (int(n), (limit == n).nonzero(as_tuple=True)[0]) for n in values
            ]  # fmt: skip

    def route_input(self, c: torch.Tensor, step: int | None) -> RouteInput | None:
        """The routing of a call on noise embeddings ``c`` (rows: the encoded batch's samples,
        each repeated alike, as the mixture of horizons packs them); None: route on ``c``."""
        if not self.task_routed:
            return None
        if self._context_batch is None:
            raise ValueError("a task-routed network needs its routing context: encode the observation (policy.encode_obs) first")
        rows, rest = divmod(c.shape[0], self._context_batch)
        if rest or rows == 0:
            raise ValueError(f"a batch of {c.shape[0]} rows does not fit the encoded batch of {self._context_batch} samples")
        rep = (lambda t: t) if rows == 1 else (lambda t: t.repeat_interleave(rows, dim=0))  # noqa: E731
        goal = None if self._goal is None else rep(self._goal).to(c.dtype)
        vector = {"noise": c, "task": goal, "both": None if goal is None else torch.cat([c, goal], dim=-1)}[self.cfg.router_input]
        groups = self._limit_groups
        if groups is not None and rows > 1 and len(groups) > 1:  # repeat_interleave's row order
            groups = [(n, (r[:, None] * rows + torch.arange(rows, device=r.device)).flatten()) for n, r in groups]
        key = None
        if step is not None and self.cfg.router_input == "noise":
            key = (step, groups[0][0]) if len(groups) == 1 else None  # noise routing has limits here
        elif step is not None and self._batch_task is not None:
            key = (step if self.cfg.router_input == "both" else None, self._batch_task)
        return RouteInput(vector, groups, key)

    def run_blocks(self, tokens, c, mask, step=None, cond=None):
        route = self.route_input(c, step)
        if route is None:
            return super().run_blocks(tokens, c, mask, step, cond)
        if self.cached and not isinstance(cond, ConditionMemory):
            raise ValueError("a cached-condition network's blocks need its ConditionMemory (network.condition(cond))")
        for i, block in enumerate(self.blocks):
            tokens = block(tokens, c, mask, step, cond.kv[i] if self.cached else None, route)
        return tokens

    def moe_layers(self) -> list[MoDEMLP]:
        return [m for m in self.modules() if isinstance(m, MoDEMLP)]

    def parameter_counts(self) -> tuple[int, int]:
        total = sum(p.numel() for p in self.parameters())
        inactive = sum(t - a for t, a in (layer.parameter_counts() for layer in self.moe_layers()))
        return total, total - inactive

    def train(self, mode: bool = True):
        if mode:
            self.clear_expert_cache()
        return super().train(mode)

    def auxiliary_losses(self):
        layers = [m for m in self.moe_layers() if m.aux]
        if not layers or not self.training:
            return 0.0, {}
        balance = torch.stack([m.aux["load_balance"] for m in layers]).mean()
        z = torch.stack([m.aux["z_loss"] for m in layers]).mean()
        usage = torch.stack([m.aux["usage"] for m in layers]).mean(0)
        logs = {"load_balance": float(balance.detach()), "router_z_loss": float(z.detach())}
        logs.update({f"expert_usage_{i}": float(u) for i, u in enumerate(usage)})
        for m in layers:
            m.aux = {}
        return self.cfg.load_balance_weight * balance + self.cfg.z_loss_weight * z, logs

    @torch.no_grad()
    def build_expert_cache(self, schedule: torch.Tensor, network_levels: torch.Tensor) -> list[list[list[int]]]:
        """Fuse each block's experts for every step of ``schedule`` (at ``network_levels``);
        returns the experts chosen per block and step."""
        c = self.noise_embed(network_levels.to(self.pos.device))
        limits = sorted(set(self.cfg.task_experts)) or None
        chosen = [layer.build_cache(c, limits) for layer in self.moe_layers()]
        self._cached_schedule = schedule.detach().cpu().clone()
        return chosen

    def clear_expert_cache(self) -> None:
        for layer in self.moe_layers():
            layer.clear_cache()
        self._cached_schedule = None
        self._schedule_caches.clear()

    def prepare_sampling(self, schedule, network_levels) -> None:
        super().prepare_sampling(schedule, network_levels)
        if schedule is None or self.training or not self.cfg.expert_cache:
            self.clear_expert_cache()
            return
        cached = self._cached_schedule
        if cached is not None and cached.shape == schedule.shape and torch.equal(cached, schedule.detach().cpu()):
            return
        key = tuple(float(v) for v in schedule.detach().cpu().reshape(-1))
        layers = self.moe_layers()
        if key in self._schedule_caches:  # fused before: restore it
            self._schedule_caches.move_to_end(key)
            for layer, state in zip(layers, self._schedule_caches[key]):
                layer.restore_cache(state)
        else:
            if self.cfg.router_input != "noise":  # fused per (step, task) on first use
                for layer in layers:
                    layer.start_task_cache()
            else:
                self.build_expert_cache(schedule, network_levels)
            self._schedule_caches[key] = [layer.cache_state() for layer in layers]
            while len(self._schedule_caches) > SCHEDULE_CACHES:
                self._schedule_caches.popitem(last=False)
        self._cached_schedule = schedule.detach().cpu().clone()
