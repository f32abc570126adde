"""MoDE routed on the task (router_input task | both), per-task expert limits and their caches."""

import pytest
import torch

from mixpolicy.config import ConfigError
from mixpolicy.errors import UserError
from mixpolicy.policies.config import HeadConfig, MoDETransformerConfig, MoHConfig
from mixpolicy.policies.denoising_policy import DenoisingPolicy
from mixpolicy.policies.networks.mode import MoDEMLP
from factories import mode_policy_config, tiny_shape_meta

TASKS = ("t0", "t1", "t2")


def routed_config(router_input="task", condition="joint", head="single", **net):
    head_cfg = MoHConfig(horizons=[2, 4]) if head == "moh" else HeadConfig()
    return mode_policy_config(num_inference_steps=4, head=head_cfg, router_input=router_input, condition=condition, **net)


def _spread_routers(policy, seed=0):
    """Fresh routers are near uniform; spread their logits so tasks and steps pick different experts."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in policy.net.moe_layers():
            for module in (layer.router, *(s.router for s in layer.stages)):
                for p in module.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 2)


def _obs(tasks, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"state": torch.randn(len(tasks), 2, 6, generator=g), "task": torch.tensor(tasks)}


def _policy(cfg, seed=0):
    torch.manual_seed(seed)
    policy = DenoisingPolicy(cfg, tiny_shape_meta(tasks=TASKS)).eval()
    _spread_routers(policy, seed)
    return policy


def _plan(policy, tasks, cache: bool, seed=7):
    policy.cfg.network.expert_cache = cache
    return policy.plan(_obs(tasks), torch.Generator().manual_seed(seed)).actions


@pytest.mark.parametrize("router_input", ["task", "both"])
@pytest.mark.parametrize("condition", ["joint", "cached"])
@pytest.mark.parametrize("head", ["single", "moh"])
def test_task_routed_cache_equals_uncached_sampling(router_input, condition, head):
    policy = _policy(routed_config(router_input, condition, head))
    for tasks in ([1], [2, 2], [0, 1, 2, 0]):  # one task (cached) and a mix (routed)
        cached = _plan(policy, tasks, cache=True)
        assert all(layer.cached for layer in policy.net.moe_layers())
        uncached = _plan(policy, tasks, cache=False)
        torch.testing.assert_close(cached, uncached, atol=1e-6, rtol=0)
    # single-task batches fill entries keyed by (step, task); "task" routing shares one over the steps
    _plan(policy, [1], cache=True)
    _plan(policy, [2], cache=True)
    keys = set(policy.net.moe_layers()[0]._cache)
    assert {k[1] for k in keys} == {1, 2}
    assert len(keys) == (2 if router_input == "task" else 2 * 4)


def test_task_routing_picks_experts_by_task_and_not_by_noise_level():
    policy = _policy(routed_config("task"))
    layer: MoDEMLP = policy.net.moe_layers()[0]
    goals = policy.task_embedding(torch.arange(3))
    idx, _, _ = layer.route(goals, sample=False)
    assert len({tuple(sorted(r)) for r in idx.tolist()}) > 1  # tasks differ
    # the same task and tokens at three noise levels: the same experts, the same outputs
    x = torch.randn(1, 5, 32).expand(3, 5, 32)
    policy.net.set_routing_context(goals[[0, 0, 0]], torch.tensor([0, 0, 0]))
    c = policy.net.noise_embed(torch.tensor([0.1, 1.0, 3.0]))
    route = policy.net.route_input(c, step=None)
    torch.testing.assert_close(route.vector, goals[[0, 0, 0]])
    idx_levels, _, _ = layer.route(route.vector, sample=False)
    assert (idx_levels == idx_levels[:1]).all()
    out = layer(x, route)
    torch.testing.assert_close(out, out[:1].expand_as(out), atol=1e-6, rtol=0)
    # "both" concatenates noise and goal embeddings into a wider router
    both = _policy(routed_config("both")).net.moe_layers()[0]
    assert both.router[0].in_features == 64 and layer.router[0].in_features == 32


def test_noise_routing_is_unchanged_and_ignores_the_task():
    policy = _policy(routed_config("noise"))
    assert not policy.net.task_routed
    a = _plan(policy, [0, 0], cache=True)
    b = policy.plan({**_obs([0, 0])}, torch.Generator().manual_seed(7)).actions
    assert torch.equal(a, b)


@pytest.mark.parametrize("router_input", ["noise", "task"])
@pytest.mark.parametrize("head", ["single", "moh"])
def test_per_task_expert_limits_mask_the_routing(router_input, head):
    cfg = routed_config(router_input, head=head, num_experts=6, task_experts=[4, 4, 6])
    policy = _policy(cfg)
    layer = policy.net.moe_layers()[0]
    goals = policy.task_embedding(torch.arange(3)) if router_input == "task" else policy.net.noise_embed(torch.ones(3))
    groups = [(4, torch.tensor([0, 1])), (6, torch.tensor([2]))]
    for _ in range(20):
        idx, _, logits = layer.train().route(goals, sample=True, groups=groups)
        assert int(idx[:2].max()) < 4  # tasks 0 and 1 never reach experts 4, 5
    assert logits[:2, 4:].isneginf().all() and logits[2].isfinite().all()
    # a limited task is routed as the network of its first 4 experts alone
    idx, weights, _ = layer.eval().route(goals[:1], sample=False, groups=[(4, None)])
    probs = layer.router_logits(goals[:1])[:, :4].softmax(-1)
    top = probs.topk(2).indices
    assert torch.equal(idx, top) and torch.equal(weights, probs.gather(1, top) / probs.gather(1, top).sum(-1, keepdim=True))
    layer.eval()
    for tasks in ([0], [2], [0, 2], [0, 1]):
        torch.testing.assert_close(_plan(policy, tasks, True), _plan(policy, tasks, False), atol=1e-6, rtol=0)


def test_task_routing_needs_a_goal_and_limits_match_the_tasks():
    cfg = routed_config("task")
    cfg.task_conditioning = "none"
    with pytest.raises(UserError, match="router_input=task routes on the goal"):
        DenoisingPolicy(cfg, tiny_shape_meta(tasks=TASKS))
    with pytest.raises(UserError, match="task_experts has 2 entries; the policy has 3 tasks"):
        DenoisingPolicy(routed_config("task", task_experts=[2, 4]), tiny_shape_meta(tasks=TASKS))
    with pytest.raises(ConfigError, match="network.router_input"):
        MoDETransformerConfig(router_input="goal")
    with pytest.raises(ConfigError, match="network.task_experts"):
        MoDETransformerConfig(num_experts=4, top_k=2, task_experts=[1])
    with pytest.raises(ConfigError, match="network.added_experts"):
        MoDETransformerConfig(num_experts=4, added_experts=[4])
    policy = _policy(routed_config("task"))
    with pytest.raises(ValueError, match="needs its routing context"):
        policy.net(torch.randn(1, 4, 3), torch.zeros(1), torch.randn(1, 3, 32))
    policy.encode_obs(_obs([0, 1]))
    with pytest.raises(ValueError, match="a batch of 3 rows does not fit the encoded batch of 2"):
        policy.net(torch.randn(3, 4, 3), torch.zeros(3), torch.randn(3, 3, 32))
