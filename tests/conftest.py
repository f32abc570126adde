"""Shared fixtures: tiny synthetic datasets and tiny policy configs built in the test."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

from mixpolicy.datasets.replay_buffer import DatasetMeta, KeySpec, ReplayBuffer  # noqa: E402
from mixpolicy.policies.config import OBJECTIVE_CONFIGS, DDPMConfig, PolicyConfig, TransformerConfig  # noqa: E402


def make_dataset(path, lengths=(5, 3, 7), state_dim=6, action_dim=3, tasks=("task-a", "task-b"), seed=0):
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


@pytest.fixture
def tiny_dataset(tmp_path):
    return make_dataset(tmp_path / "tiny.zarr")


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
