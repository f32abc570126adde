"""Real-time chunking prefix constraints: soft mask, hard replacement, RTC guidance, through RTI."""

from __future__ import annotations

import pytest
import torch

from mixpolicy.config import ConfigError
from mixpolicy.deploy.rti import RTIConfig, RTISampler, shift_chunk
from mixpolicy.policies.config import policy_config_from_dict
from mixpolicy.policies.denoising_policy import DenoisingPolicy, ShapeMeta, example_observation
from mixpolicy.policies.prefix import PrefixConstraint, soft_mask

SHAPES = ShapeMeta(obs={"state": [5]}, action_dim=3, tasks=["a", "b"])
OBJECTIVES = {"ddpm": {"type": "ddpm", "num_train_timesteps": 20}, "edm": {"type": "edm"}, "flow": {"type": "flow"}}


def make(objective="flow", network="transformer", head="single", steps=6):
    torch.manual_seed(0)
    head_cfg = {"type": head, **({"horizons": [4, 8]} if head == "moh" else {})}
    cfg = policy_config_from_dict(
        {"horizon": 8, "n_action_steps": 4, "obs_hidden": 32, "network": {"type": network, "width": 32, "depth": 1, "heads": 2},
         "head": head_cfg, "objective": {**OBJECTIVES[objective], "num_inference_steps": steps}}
    )  # fmt: skip
    return DenoisingPolicy(cfg, SHAPES).eval()


def target(seed=3):
    return torch.rand(2, 8, 3, generator=torch.Generator().manual_seed(seed)) * 1.6 - 0.8


def test_soft_mask_is_one_on_the_frozen_prefix_and_decays_to_zero_at_the_overlap():
    w = soft_mask(10, 3, 7)
    assert w[:3].tolist() == [1.0, 1.0, 1.0] and w[7:].tolist() == [0.0, 0.0, 0.0]
    assert bool((w[3:7] > 0).all()) and bool((w[3:7] < 1).all()) and bool((w[3:7].diff() < 0).all())
    assert soft_mask(4, 6, 2).tolist() == [1.0] * 4  # frozen past the horizon: everything frozen


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_hard_prefix_ends_exactly_on_the_target(objective):
    policy = make(objective)
    obs, y = example_observation(policy, 2), target()
    plan = policy.plan(obs, torch.Generator().manual_seed(1), prefix=PrefixConstraint(y, frozen=3, mode="hard"))
    torch.testing.assert_close(plan.normalized[:, :3], y[:, :3], atol=1e-5, rtol=0)
    assert not torch.allclose(plan.normalized[:, 3:], y[:, 3:])


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_guidance_pulls_the_prefix_towards_the_target(objective):
    policy = make(objective)
    obs, y = example_observation(policy, 2), target()
    free = policy.plan(obs, torch.Generator().manual_seed(1)).normalized
    guided = policy.plan(obs, torch.Generator().manual_seed(1), prefix=PrefixConstraint(y, frozen=3, overlap=6)).normalized
    err_free = (free[:, :3] - y[:, :3]).abs().mean()
    err_guided = (guided[:, :3] - y[:, :3]).abs().mean()
    assert err_guided < 0.5 * err_free, (float(err_guided), float(err_free))
    assert torch.isfinite(guided).all()


def test_an_empty_prefix_changes_nothing():
    policy = make("ddpm")
    obs = example_observation(policy, 2)
    free = policy.plan(obs, torch.Generator().manual_seed(1)).normalized
    same = policy.plan(obs, torch.Generator().manual_seed(1), prefix=PrefixConstraint(target(), frozen=0)).normalized
    assert torch.equal(free, same)


@pytest.mark.parametrize("network,head", [("mode", "single"), ("transformer", "moh"), ("mode", "moh")])
def test_guidance_runs_through_the_expert_cache_and_the_horizon_mixture(network, head):
    policy = make("edm", network, head)
    obs, y = example_observation(policy, 2), target()
    plan = policy.plan(obs, torch.Generator().manual_seed(1), prefix=PrefixConstraint(y, frozen=2))
    assert torch.isfinite(plan.actions).all()
    if network == "mode":
        assert all(layer.cached for layer in policy.net.moe_layers())


@pytest.mark.parametrize("enabled", [True, False])
def test_rti_calls_constrain_the_prefix_to_the_shifted_previous_chunk(enabled):
    """rtc (enabled=false: full denoise) and rti+rtc (enabled: warm start) modes."""
    policy = make("flow")
    rti = RTISampler(policy, RTIConfig(enabled=enabled, k=2, prefix="hard", delay=2))
    obs = example_observation(policy, 2)
    rti(obs, generator=torch.Generator().manual_seed(0))
    prev = rti._prev.clone()
    res = rti(obs, shift=3, generator=torch.Generator().manual_seed(1))
    assert res.warm is enabled and res.steps == (2 if enabled else 6)
    torch.testing.assert_close(rti._prev[:, :2], shift_chunk(prev, 3)[:, :2], atol=1e-5, rtol=0)
    res = rti(obs, shift=3, generator=torch.Generator().manual_seed(2), delay=4)  # a per-call delay
    assert torch.isfinite(res.actions).all()


def test_prefix_options_are_validated():
    with pytest.raises(ConfigError, match="rti.prefix"):
        RTIConfig(prefix="soft")
    with pytest.raises(ConfigError, match="rti.delay"):
        RTIConfig(delay=-1)
    with pytest.raises(ValueError, match="prefix mode"):
        PrefixConstraint(target(), 2, mode="magic")


def make_conditioned(objective="flow", head="single", network="transformer"):
    torch.manual_seed(0)
    head_cfg = {"type": head, **({"horizons": [4, 8]} if head == "moh" else {})}
    cfg = policy_config_from_dict(
        {"horizon": 8, "n_action_steps": 4, "obs_hidden": 32, "train_delay_max": 3,
         "network": {"type": network, "width": 32, "depth": 1, "heads": 2}, "head": head_cfg,
         "objective": {**OBJECTIVES[objective], "num_inference_steps": 4}}
    )  # fmt: skip
    return DenoisingPolicy(cfg, SHAPES)


@pytest.mark.parametrize("objective,head,network", [("ddpm", "single", "transformer"), ("edm", "moh", "transformer"), ("flow", "single", "mode"), ("flow", "moh", "mode")])
def test_training_time_prefix_gives_clean_actions_and_no_loss_on_them(objective, head, network):
    policy = make_conditioned(objective, head, network)
    assert policy.prefix_conditioned and not make("flow").prefix_conditioned
    batch = {**example_observation(policy, 4), "action": torch.rand(4, 8, 3) * 2 - 1}
    loss, _ = policy.train().compute_loss(batch, torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and policy.net.prefix_in.weight.grad is not None
    mask = policy.training_prefix(batch["action"], torch.Generator().manual_seed(5))
    assert mask.shape == (4, 8) and bool((mask.sum(1) <= 3).all())
    assert all(bool((row[: int(row.sum())]).all()) for row in mask)  # a prefix, not scattered
    # The clean prefix is an input the network sees; a fully masked chunk carries no loss.
    policy.eval()
    full = torch.ones(4, 8, dtype=torch.bool)
    full[:, 3:] = False
    a = policy.head.loss(policy.net, policy.objective, policy.encode_obs(batch), batch["action"], torch.Generator().manual_seed(1), full)[0]
    other = batch["action"].clone()
    other[:, :3] = -other[:, :3]
    b = policy.head.loss(policy.net, policy.objective, policy.encode_obs(batch), other, torch.Generator().manual_seed(1), full)[0]
    assert not torch.equal(a, b)
    none_kept = policy.head.loss(policy.net, policy.objective, policy.encode_obs(batch), batch["action"], torch.Generator().manual_seed(1), torch.ones(4, 8, dtype=torch.bool))[0]
    assert float(none_kept.detach()) == 0.0


def test_conditioned_prefix_at_inference_copies_the_target_and_needs_a_trained_policy():
    policy = make_conditioned("edm").eval()
    obs, y = example_observation(policy, 2), target()
    plan = policy.plan(obs, torch.Generator().manual_seed(1), prefix=PrefixConstraint(y, frozen=2, mode="conditioned"))
    assert torch.equal(plan.normalized[:, :2], y[:, :2]) and torch.isfinite(plan.actions).all()
    rti = RTISampler(policy, RTIConfig(prefix="conditioned", delay=2, k=2))
    rti(obs, generator=torch.Generator().manual_seed(0))
    assert rti(obs, shift=2, generator=torch.Generator().manual_seed(1)).warm
    from mixpolicy.errors import UserError

    with pytest.raises(UserError, match="train_delay_max"):
        RTISampler(make("edm"), RTIConfig(prefix="conditioned"))
    with pytest.raises(ConfigError, match="policy.train_delay_max"):
        policy_config_from_dict({"horizon": 8, "n_action_steps": 4, "train_delay_max": 8})
