"""The cases behind the golden outputs (tests/goldens/): presets, observations, calls."""

from __future__ import annotations

import torch

from mixpolicy.cli import compose
from mixpolicy.deploy.rti import RTIConfig, RTISampler
from mixpolicy.policies.config import policy_config_from_dict
from mixpolicy.policies.denoising_policy import DenoisingPolicy, ShapeMeta

PRESETS = ["dit", "dit_edm", "dit_flow", "dit_moh", "dit_edm_moh", "dit_flow_moh", "mode", "mode_flow", "mode_moh", "mode_flow_moh"]
SMALL = ["policy.network.width=32", "policy.network.depth=2", "policy.network.heads=2", "policy.obs_hidden=32"]
SHAPE = ShapeMeta(obs={"state": [6]}, action_dim=3, tasks=["task-a", "task-b"], discrete_action_dims=[2])


def build_preset(name: str):
    """The preset ``name`` shrunk to a tiny network, in eval mode."""
    cfg = compose("train", ["dataset=x", f"policy={name}", *SMALL])["policy"]
    torch.manual_seed(0)
    cfg = policy_config_from_dict(cfg)
    return DenoisingPolicy(cfg, SHAPE).eval()


def observation(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"state": torch.randn(2, 2, 6, generator=g), "task": torch.tensor([0, 1])}


def golden_outputs(policy) -> dict[str, torch.Tensor]:
    """Every output the goldens hold for one policy with fixed weights."""
    out: dict[str, torch.Tensor] = {}
    batch = dict(observation(1))
    batch["action"] = torch.randn(2, 16, 3, generator=torch.Generator().manual_seed(2))
    policy.train()
    loss, _ = policy.compute_loss(batch, generator=torch.Generator().manual_seed(3))
    policy.eval()
    out["loss"] = loss.detach().reshape(1)
    obs = observation(4)
    out["chunk"] = policy.plan(obs, generator=torch.Generator().manual_seed(5)).actions
    network = policy.cfg.network
    if network.type == "mode":
        network.expert_cache = False
        out["chunk_uncached"] = policy.plan(obs, generator=torch.Generator().manual_seed(5)).actions
        network.expert_cache = True
    rti = RTISampler(policy, RTIConfig(k=2, start_noise="tail"))  # the recorded path: the schedule's last 2 steps
    rti(obs, generator=torch.Generator().manual_seed(6))
    warm = rti(observation(7), shift=2, generator=torch.Generator().manual_seed(8))
    out["rti_warm"] = warm.actions
    if policy.cfg.head.type == "moh":
        policy.set_execution("adaptive")
        plan = policy.plan(obs, generator=torch.Generator().manual_seed(5))
        out["moh_adaptive_lengths"] = plan.executable
        out["moh_adaptive_chunk"] = plan.actions
        policy.set_execution("fixed")
    return out
