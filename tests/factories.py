"""Builders of tiny test objects: synthetic stores, policy configs, policies, observations.

Plain functions, so a test or a helper that needs its own variant imports them
(``from factories import make_dataset``); conftest.py turns the defaults into fixtures.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from mixpolicy.datasets.replay_buffer import DatasetMeta, KeySpec, ReplayBuffer
from mixpolicy.policies.config import OBJECTIVE_CONFIGS, DDPMConfig, MoDETransformerConfig, PolicyConfig, TransformerConfig
from mixpolicy.policies.denoising_policy import DenoisingPolicy, ShapeMeta

TINY_TASKS = ("task-a", "task-b")

# The smallest trainable policy, as a TrainConfig.policy dict and as the same options on a command line.
SMALL_POLICY = dict(
    network=dict(width=32, depth=1, heads=2),
    horizon=4,
    n_action_steps=2,
    obs_hidden=32,
    objective=dict(num_train_timesteps=10, num_inference_steps=2),
)
SMALL_POLICY_OVERRIDES = [
    "policy.network.width=32",
    "policy.network.depth=1",
    "policy.network.heads=2",
    "policy.horizon=4",
    "policy.n_action_steps=2",
    "policy.obs_hidden=32",
    "policy.objective.num_train_timesteps=10",
    "policy.objective.num_inference_steps=2",
]


def make_dataset(path, lengths=(5, 3, 7), state_dim=6, action_dim=3, tasks=TINY_TASKS, seed=0):
    """A store whose step t of episode e has state[:, 0] = 100 * e + t (easy to check windows)."""
    rng = np.random.default_rng(seed)
    meta = DatasetMeta(
        fps=10.0,
        obs_keys=["state"],
        action_key="action",
        discrete_action_dims=[action_dim - 1],
        specs={"state": KeySpec((state_dim,), "float32"), "action": KeySpec((action_dim,), "float32")},
    )
    buf = ReplayBuffer.create(path, meta)
    for e, n in enumerate(lengths):
        state = rng.normal(size=(n, state_dim)).astype(np.float32)
        state[:, 0] = 100 * e + np.arange(n)
        action = rng.uniform(-1, 1, size=(n, action_dim)).astype(np.float32)
        action[:, 0] = 100 * e + np.arange(n)
        buf.add_episode({"state": state, "action": action}, task=tasks[e % len(tasks)], success=e != 1, seed=e)
    return buf


def tiny_policy_config(**kw) -> PolicyConfig:
    net = TransformerConfig(width=32, depth=2, heads=2, mlp_ratio=2.0)
    obj = DDPMConfig(num_train_timesteps=20, num_inference_steps=4)
    defaults = dict(obs_keys=["state"], n_obs_steps=2, horizon=4, n_action_steps=2, obs_hidden=32, network=net, objective=obj)
    defaults.update(kw)
    return PolicyConfig(**defaults)


def objective_config(name: str, **kw):
    """The objective config of type ``name``; options of other objectives are dropped."""
    cls = OBJECTIVE_CONFIGS[name]
    return cls(**{k: v for k, v in kw.items() if k in cls.__dataclass_fields__})


def mode_policy_config(objective="edm", solver="", num_inference_steps=6, head=None, **net) -> PolicyConfig:
    """A tiny MoDE policy (width 32, 2 blocks, 4 experts, top-2); ``net`` overrides network options."""
    network = dict(width=32, depth=2, heads=2, mlp_ratio=1.25, num_experts=4, top_k=2)
    network.update(net)
    extra = {} if head is None else {"head": head}
    return PolicyConfig(
        obs_keys=["state"],
        horizon=4,
        n_action_steps=2,
        obs_hidden=32,
        network=MoDETransformerConfig(**network),
        objective=objective_config(objective, solver=solver, num_inference_steps=num_inference_steps),
        **extra,
    )


def make_small_policy_dict() -> dict:
    """A fresh copy of SMALL_POLICY (callers may edit it)."""
    return copy.deepcopy(SMALL_POLICY)


def tiny_shape_meta(state_dim=6, action_dim=3, tasks=TINY_TASKS, **kw) -> ShapeMeta:
    """The shapes of ``make_dataset``'s default store: state (6), action (3), two tasks."""
    return ShapeMeta(obs={"state": [state_dim]}, action_dim=action_dim, tasks=list(tasks), **kw)


def metaworld_shape_meta(tasks=("reach-v3",), **kw) -> ShapeMeta:
    """A Meta-World state policy: state (39), action (4)."""
    return tiny_shape_meta(state_dim=39, action_dim=4, tasks=tasks, **kw)


def server_shape_meta(**kw) -> ShapeMeta:
    """The policy the server tests serve: state (5), action (3), tasks a and b."""
    return tiny_shape_meta(state_dim=5, action_dim=3, tasks=("a", "b"), **kw)


def make_tiny_policy(cfg: PolicyConfig | None = None, shape_meta: ShapeMeta | None = None, seed: int = 0) -> DenoisingPolicy:
    """A policy built right after ``torch.manual_seed(seed)`` (the tiny config and shapes by default)."""
    torch.manual_seed(seed)
    return DenoisingPolicy(cfg or tiny_policy_config(), shape_meta or tiny_shape_meta())


def make_obs(b=3, seed=0, state_dim=6, n_obs_steps=2) -> dict[str, torch.Tensor]:
    """A seeded observation batch for the tiny shapes: state (b, n_obs_steps, state_dim), tasks 0, 1, 0, ..."""
    g = torch.Generator().manual_seed(seed)
    return {"state": torch.randn(b, n_obs_steps, state_dim, generator=g), "task": torch.arange(b) % 2}


def spy_denoiser_calls(policy, monkeypatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(network level, network input) of every denoiser call the policy's head makes."""
    calls = []
    original = policy.head.forward

    def forward(net, x, level, cond, step=None, prefix=None):
        calls.append((level.clone(), x.clone()))
        return original(net, x, level, cond, step, prefix)

    monkeypatch.setattr(policy.head, "forward", forward)
    return calls
