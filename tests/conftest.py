"""Test environment and shared fixtures; the builders behind them live in factories.py."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

import factories  # noqa: E402


@pytest.fixture
def tiny_dataset(tmp_path):
    """make_dataset's default store (episodes of 5, 3 and 7 steps; episode 1 failed)."""
    return factories.make_dataset(tmp_path / "tiny.zarr")


@pytest.fixture
def dataset_factory(tmp_path):
    """make_dataset under this test's tmp_path: ``dataset_factory("d.zarr", lengths=(6, 5, 7))``."""

    def make(name="d.zarr", **kw):
        return factories.make_dataset(tmp_path / name, **kw)

    return make


@pytest.fixture
def tiny_policy():
    """The tiny DDPM policy on the tiny shapes, built after torch.manual_seed(0)."""
    return factories.make_tiny_policy()


@pytest.fixture
def obs_factory():
    """make_obs: a fresh seeded observation batch per call, ``obs_factory(b=3, seed=0)``."""
    return factories.make_obs


@pytest.fixture
def tiny_obs():
    """One observation batch of 3 for the tiny shapes."""
    return factories.make_obs()


@pytest.fixture
def small_policy_dict():
    """A fresh copy of the smallest trainable TrainConfig.policy dict."""
    return factories.make_small_policy_dict()
