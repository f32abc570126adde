"""The cached-condition layout: the condition is encoded once per chunk and the per-step
network runs the action stream only; the result is the same as recomputing it every step."""

import dataclasses

import pytest
import torch

from mixpolicy.errors import UserError
from mixpolicy.policies.config import MoDETransformerConfig, MoHConfig, TransformerConfig, policy_config_from_dict
from mixpolicy.policies.networks.transformer import ConditionMemory
from mixpolicy.policies.objectives import randn
from tests.factories import make_obs, make_tiny_policy, tiny_policy_config

CACHED = TransformerConfig(width=32, depth=2, heads=2, mlp_ratio=2.0, condition="cached", condition_layers=1)


def cached_policy(network=CACHED, **kw):
    return make_tiny_policy(tiny_policy_config(network=network, **kw))


def test_the_cached_condition_is_computed_once_and_equals_the_per_step_recompute():
    policy = cached_policy().eval()
    obs = make_obs(3)
    cond = policy.encode_obs(obs)
    memory = policy.net.condition(cond)
    assert isinstance(memory, ConditionMemory) and len(memory.kv) == 2
    assert memory.kv[0][0].shape == (3, 2, cond.shape[1], 16)
    x = torch.randn(3, 4, 3)
    level = torch.tensor([3, 7, 11])
    # The network given raw tokens computes the memory itself: the same output.
    torch.testing.assert_close(policy.net(x, level, memory), policy.net(x, level, cond), rtol=0, atol=0)
    calls = []
    original = policy.net.condition
    policy.net.condition = lambda c: calls.append(type(c).__name__) or original(c)
    policy.plan(obs, torch.Generator().manual_seed(0))
    assert calls[0] == "Tensor" and all(c == "ConditionMemory" for c in calls[1:]), calls


def test_the_condition_does_not_depend_on_the_actions_or_the_noise_level():
    """What makes it cacheable: the per-step output changes with x and level, the memory does not."""
    policy = cached_policy().eval()
    cond = policy.encode_obs(make_obs(2))
    kv = policy.net.condition(cond).kv
    x = torch.randn(2, 4, 3)
    a = policy.net(x, torch.tensor([1, 1]), cond)
    b = policy.net(x, torch.tensor([15, 15]), cond)
    assert not torch.allclose(a, b)
    # Perturbing the condition tokens changes the output (the memory is read).
    c = policy.net(x, torch.tensor([1, 1]), cond + 0.5)
    assert not torch.allclose(a, c)


def test_cached_layout_trains_and_samples_with_mode_moh_and_a_warm_start():
    mode = MoDETransformerConfig(width=32, depth=2, heads=2, num_experts=4, top_k=2, condition="cached")
    for net, head in ((CACHED, None), (mode, None), (CACHED, MoHConfig(horizons=[2, 4])), (mode, MoHConfig(horizons=[2, 4]))):
        kw = {} if head is None else {"head": head}
        policy = cached_policy(net, **kw)
        batch = {**make_obs(4), "action": torch.randn(4, 4, 3)}
        loss, _ = policy.compute_loss(batch, torch.Generator().manual_seed(0))
        loss.backward()
        assert torch.isfinite(loss)
        grads = [p.grad for n, p in policy.net.named_parameters() if "condition_blocks" in n or ".memory." in n]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
        policy.eval()
        plan = policy.plan(make_obs(2), torch.Generator().manual_seed(0))
        assert plan.actions.shape == (2, 4, 3) and torch.isfinite(plan.actions).all()


def test_moh_on_a_cached_network_matches_each_horizon_run_alone():
    """Packed rows read the memory like a single sequence does: horizon k's outputs equal
    the network on its own prefix with the padded actions masked."""
    policy = cached_policy(head=MoHConfig(horizons=[2, 4])).eval()
    cond = policy.encode_obs(make_obs(2))
    x = torch.randn(2, 4, 3)
    level = torch.tensor([4, 9])
    _, per_horizon, _ = policy.head.horizon_forward(policy.net, x, level, cond)
    pad = torch.arange(4)[None].expand(2, 4) >= 2
    alone = policy.net(x, level, cond, action_padding_mask=pad)
    torch.testing.assert_close(per_horizon[0][:, :2], alone[:, :2], rtol=1e-5, atol=1e-5)


def test_the_condition_layout_is_validated_and_reachable_from_the_config():
    with pytest.raises(UserError, match="network.condition"):
        TransformerConfig(condition="sometimes")
    with pytest.raises(UserError, match="network.condition_layers"):
        TransformerConfig(condition="cached", condition_layers=-1)
    cfg = policy_config_from_dict({"network": {"type": "transformer", "condition": "cached", "condition_layers": 0}})
    assert cfg.network.condition == "cached" and cfg.network.condition_layers == 0
    policy = make_tiny_policy(dataclasses.replace(tiny_policy_config(), network=dataclasses.replace(CACHED, condition_layers=0)))
    assert not list(policy.net.condition_blocks)
    assert torch.isfinite(policy.plan(make_obs(1)).actions).all()


def test_joint_layout_state_is_unchanged():
    """The default layout has no memory parameters (checkpoints and goldens stay as they were)."""
    policy = make_tiny_policy()
    names = [n for n, _ in policy.named_parameters()]
    assert not any("condition_blocks" in n or ".memory." in n for n in names)


def test_layer_norm_option_replaces_every_norm():
    net = dataclasses.replace(CACHED, norm="layer")
    policy = cached_policy(net)
    norms = [type(m).__name__ for m in policy.net.modules() if "Norm" in type(m).__name__]
    assert norms and set(norms) == {"LayerNorm"}
    assert {type(m).__name__ for m in make_tiny_policy().net.modules() if "Norm" in type(m).__name__} == {"RMSNorm"}
    loss, _ = policy.compute_loss({**make_obs(2), "action": torch.randn(2, 4, 3)})
    assert torch.isfinite(loss)
    with pytest.raises(UserError, match="network.norm"):
        TransformerConfig(norm="batch")
