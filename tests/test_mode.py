"""MoDE: noise-routed experts, router losses, frozen routers and expert caching."""

import pytest
import torch

from mixpolicy.config import ConfigError
from mixpolicy.policies.config import MoDETransformerConfig, policy_config_from_dict
from mixpolicy.policies.denoising_policy import DenoisingPolicy
from mixpolicy.policies.networks.mode import ExpertCacheMiss, MoDEMLP
from factories import metaworld_shape_meta, mode_policy_config, tiny_shape_meta


def mode_config(objective="edm", solver="", **net):
    return mode_policy_config(objective, solver, **net)


def _build_cache(policy, schedule):
    return policy.net.build_expert_cache(schedule, policy.objective.network_level(schedule))


def _randomize_routers(policy, seed=0):
    """Fresh routers are near uniform; spread their logits so steps pick different experts."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in policy.net.moe_layers():
            for p in layer.router.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 2)


def test_moe_layer_equals_weighted_sum_of_its_chosen_experts():
    torch.manual_seed(0)
    layer = MoDEMLP(MoDETransformerConfig(width=16, heads=2, num_experts=4, top_k=2)).eval()
    x, c = torch.randn(3, 5, 16), torch.randn(3, 16)
    idx, weights, _ = layer.route(c, sample=False)
    assert torch.allclose(weights.sum(-1), torch.ones(3))
    expected = torch.zeros_like(x)
    for b in range(3):
        for j in range(2):
            e = int(idx[b, j])
            expected[b] += weights[b, j] * layer._swiglu(x[b], layer.w1[e], layer.w3[e], layer.w2[e])
    torch.testing.assert_close(layer(x, c), expected, atol=1e-6, rtol=1e-5)
    # routing depends on the noise embedding only: changing the tokens keeps the choice
    assert torch.equal(layer.route(c, sample=False)[0], idx)


def test_training_samples_distinct_experts_in_proportion_to_router_probabilities():
    torch.manual_seed(0)
    layer = MoDEMLP(MoDETransformerConfig(width=16, heads=2, num_experts=4, top_k=1)).train()
    c = torch.randn(1, 16).expand(4000, 16)
    idx, weights, logits = layer.route(c, sample=True)
    freq = torch.bincount(idx[:, 0], minlength=4).float() / 4000
    torch.testing.assert_close(freq, logits[0].softmax(-1), atol=0.03, rtol=0)
    assert torch.all(weights == 1)  # top-1 renormalized
    layer2 = MoDEMLP(MoDETransformerConfig(width=16, heads=2, num_experts=4, top_k=3)).train()
    idx3 = layer2.route(torch.randn(200, 16), sample=True)[0]
    assert all(len(set(row.tolist())) == 3 for row in idx3)  # without replacement


def test_topk_training_routing_runs_the_experts_evaluation_and_the_cache_use():
    torch.manual_seed(0)
    x, c = torch.randn(64, 5, 16), torch.randn(64, 16)
    layers = {}
    for routing in ("sample", "topk"):
        torch.manual_seed(1)
        layer = MoDEMLP(MoDETransformerConfig(width=16, heads=2, num_experts=4, top_k=2, train_routing=routing))
        with torch.no_grad():
            for p in layer.router.parameters():
                p.mul_(8)  # confident but not one-hot routing
        layers[routing] = layer
    eval_out = layers["topk"].eval()(x, c)
    torch.testing.assert_close(layers["topk"].train()(x, c), eval_out, atol=0, rtol=0)
    assert layers["topk"].aux["usage"].sum() == pytest.approx(2.0)
    # sampled routing trains some samples on pairs that evaluation never picks
    sampled = layers["sample"].train()(x, c)
    differs = (sampled - eval_out).abs().flatten(1).amax(1) > 1e-6
    assert 0 < int(differs.sum()) < 64


@pytest.mark.parametrize("objective, solver", [("edm", "dpm_solver_1"), ("flow", "euler"), ("flow", "heun"), ("ddpm", "ddim")])
def test_cached_and_uncached_sampling_agree(objective, solver, obs_factory):
    torch.manual_seed(0)
    policy = DenoisingPolicy(mode_config(objective, solver), tiny_shape_meta()).eval()
    _randomize_routers(policy)
    schedule = policy.objective.schedule()
    chosen = _build_cache(policy, schedule)
    assert len({tuple(sorted(c)) for layer in chosen for c in layer}) > 1  # steps use different experts
    cached = policy.predict_action_chunk(obs_factory(), torch.Generator().manual_seed(7))
    assert all(layer.cached for layer in policy.net.moe_layers())
    policy.cfg.network.expert_cache = False
    uncached = policy.predict_action_chunk(obs_factory(), torch.Generator().manual_seed(7))
    assert not any(layer.cached for layer in policy.net.moe_layers())
    torch.testing.assert_close(cached, uncached, atol=1e-5, rtol=0)


def test_expert_cache_miss_is_an_error_and_cache_is_dropped_on_train_and_load(obs_factory):
    torch.manual_seed(0)
    policy = DenoisingPolicy(mode_config(), tiny_shape_meta()).eval()
    schedule = policy.objective.schedule(5)
    _build_cache(policy, schedule)
    cond = policy.encode_obs(obs_factory(1))
    x, level = torch.randn(1, 4, 3), policy.objective.network_level(schedule[:1])
    policy.net(x, level, cond, step=4)  # a cached step
    with pytest.raises(ExpertCacheMiss, match="no entry for sampling step 7"):
        policy.net(x, level, cond, step=7)
    with pytest.raises(ExpertCacheMiss, match="no entry for sampling step None"):
        policy.net(x, level, cond)
    # a loss (no schedule) runs uncached, and training mode drops the cache
    policy.compute_loss({**obs_factory(2), "action": torch.randn(2, 4, 3)})
    _build_cache(policy, schedule)
    policy.train()
    assert not any(layer.cached for layer in policy.net.moe_layers())
    _build_cache(policy.eval(), schedule)
    policy.load_state_dict(policy.state_dict())
    assert not any(layer.cached for layer in policy.net.moe_layers())


def test_router_losses_are_logged_and_routers_can_be_frozen(obs_factory):
    torch.manual_seed(0)
    policy = DenoisingPolicy(mode_config(load_balance_weight=0.01, z_loss_weight=0.001), tiny_shape_meta()).train()
    batch = {**obs_factory(8), "task": torch.arange(8) % 2, "action": torch.randn(8, 4, 3)}
    batch["state"] = torch.randn(8, 2, 6)
    loss, logs = policy.compute_loss(batch)
    assert {"load_balance", "router_z_loss", "denoise_loss", "expert_usage_0"} <= set(logs)
    assert 0.5 < logs["load_balance"] < 4  # 1.0 for perfectly uniform routing
    expected = logs["denoise_loss"] + 0.01 * logs["load_balance"] + 0.001 * logs["router_z_loss"]
    assert logs["loss"] == pytest.approx(expected, rel=1e-5)
    usage = sum(logs[f"expert_usage_{i}"] for i in range(4))
    assert usage == pytest.approx(2.0)  # top-2: each sample counts twice

    frozen = DenoisingPolicy(mode_config(freeze_router=True), tiny_shape_meta()).train()
    router_before = [p.clone() for layer in frozen.net.moe_layers() for p in layer.router.parameters()]
    expert_before = frozen.net.moe_layers()[0].w1.clone()
    opt = torch.optim.AdamW([p for p in frozen.parameters() if p.requires_grad], lr=1e-2)
    loss, _ = frozen.compute_loss(batch)
    loss.backward()
    opt.step()
    router_after = [p for layer in frozen.net.moe_layers() for p in layer.router.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(router_before, router_after))
    assert not torch.equal(expert_before, frozen.net.moe_layers()[0].w1)


def test_active_and_total_parameter_counts():
    policy = DenoisingPolicy(mode_config(), tiny_shape_meta())
    counts = policy.parameter_counts()
    hidden = int(32 * 1.25)
    per_expert = 3 * 32 * hidden
    assert counts["total"] == sum(p.numel() for p in policy.parameters())
    assert counts["total"] - counts["active"] == 2 * (4 - 2) * per_expert  # depth 2, two idle experts
    dense = DenoisingPolicy(policy_config_from_dict({"horizon": 4, "n_action_steps": 2, "obs_hidden": 32, "network": dict(width=32, depth=2, heads=2)}), tiny_shape_meta())
    assert dense.parameter_counts()["active"] == dense.parameter_counts()["total"]
    # the default MoDE expert ratio matches the dense block's active parameters within 2%
    d = DenoisingPolicy(policy_config_from_dict({}), metaworld_shape_meta(tasks=("a",)))
    m = DenoisingPolicy(policy_config_from_dict({"type": "mode"}), metaworld_shape_meta(tasks=("a",)))
    assert m.parameter_counts()["active"] == pytest.approx(d.parameter_counts()["active"], rel=0.02)


@pytest.mark.parametrize(
    "data, field",
    [
        ({"type": "mode", "network": {"num_experts": 2, "top_k": 3}}, "network.top_k"),
        ({"type": "mode", "objective": {"name": "flow", "solver": "dpm_solver_1"}}, "objective.solver"),
        ({"type": "dit", "objective": {"name": "ddpm", "solver": "heun"}}, "objective.solver"),
        ({"type": "mode", "horizon": 4, "n_action_steps": 8}, "policy.n_action_steps"),
        ({"type": "mode", "objective": {"name": "consistency"}}, "objective.name"),
        ({"type": "dit", "network": {"num_experts": 4}}, "policy.network.num_experts"),
        ({"type": "mode", "network": {"load_balance_weight": -1}}, "network.load_balance_weight"),
        ({"type": "mode", "network": {"train_routing": "argmax"}}, "network.train_routing"),
        ({"type": "dit", "obs_keys": ["image_corner"], "task_conditioning": "none"}, "image_encoder.film"),
        ({"type": "dit", "task_conditioning": "speech"}, "policy.task_conditioning"),
    ],
)
def test_inconsistent_configs_fail_naming_the_field(data, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        policy_config_from_dict(data)


@pytest.mark.parametrize("name", ["dit", "dit_edm", "dit_flow", "mode", "mode_flow"])
def test_checkpoints_of_every_policy_yaml_round_trip(tmp_path, name, obs_factory):
    import numpy as np

    from mixpolicy.cli import compose
    from mixpolicy.datasets.normalizer import Normalizer
    from mixpolicy.policies.checkpoint import load_policy, save_policy

    small = ["policy.network.width=32", "policy.network.depth=1", "policy.network.heads=2", "policy.horizon=4", "policy.n_action_steps=2", "policy.obs_hidden=32"]
    cfg = policy_config_from_dict(compose("train", ["dataset=x", f"policy={name}", *small])["policy"])
    norm = Normalizer.from_data({"state": np.random.default_rng(0).normal(size=(30, 6)), "action": np.random.default_rng(1).uniform(-3, 3, (30, 3))})
    torch.manual_seed(0)
    policy = DenoisingPolicy(cfg, tiny_shape_meta(), norm).eval()
    a = policy.predict_action_chunk(obs_factory(), torch.Generator().manual_seed(4))
    save_policy(policy, tmp_path / "ckpt")
    loaded, meta = load_policy(tmp_path / "ckpt", expected_type=cfg.type)
    assert type(loaded) is type(policy) and meta["policy"]["objective"]["type"] == cfg.objective.type
    torch.testing.assert_close(loaded.predict_action_chunk(obs_factory(), torch.Generator().manual_seed(4)), a, atol=0, rtol=0)


@pytest.mark.parametrize("kind", ["dit", "mode"])
def test_padded_action_keys_do_not_influence_the_other_actions(kind, obs_factory):
    """The key-padding mask lets nested horizons share one batched call."""
    torch.manual_seed(0)
    cfg = mode_config() if kind == "mode" else policy_config_from_dict({"horizon": 4, "n_action_steps": 2, "obs_hidden": 32, "network": dict(width=32, depth=2, heads=2)})
    policy = (DenoisingPolicy if kind == "mode" else DenoisingPolicy)(cfg, tiny_shape_meta()).eval()
    cond = policy.encode_obs(obs_factory(2))
    x, level = torch.randn(2, 4, 3), torch.tensor([3.0, 3.0])
    pad = torch.tensor([[False, False, True, True], [False, False, False, False]])
    y = policy.net(x, level, cond, action_padding_mask=pad)
    x2 = x.clone()
    x2[0, 2:] += 5.0  # change only padded actions of sample 0
    y2 = policy.net(x2, level, cond, action_padding_mask=pad)
    torch.testing.assert_close(y2[0, :2], y[0, :2])
    assert not torch.allclose(policy.net(x2, level, cond)[0, :2], policy.net(x, level, cond)[0, :2])
    assert policy.net.encode(x, level, cond).shape == (2, 4, 32)


def test_alternating_schedules_reuse_their_fused_experts(monkeypatch, obs_factory):
    """A cold call's schedule and RTI's warm one alternate: each is fused once, and a cached
    call equals the uncached one on either schedule."""
    torch.manual_seed(0)
    policy = DenoisingPolicy(mode_config(), tiny_shape_meta()).eval()
    _randomize_routers(policy)
    builds = []
    original = policy.net.build_expert_cache
    monkeypatch.setattr(policy.net, "build_expert_cache", lambda s, lv: builds.append(len(s)) or original(s, lv))
    obs = obs_factory()
    outs = {n: [policy.predict_action_chunk(obs, torch.Generator().manual_seed(3), num_steps=n) for _ in range(3)] for n in (6, 3)}
    for _ in range(3):
        for n in (6, 3):
            torch.testing.assert_close(policy.predict_action_chunk(obs, torch.Generator().manual_seed(3), num_steps=n), outs[n][0])
    assert builds == [6, 3]
    policy.cfg.network.expert_cache = False
    for n in (6, 3):
        torch.testing.assert_close(policy.predict_action_chunk(obs, torch.Generator().manual_seed(3), num_steps=n), outs[n][0], atol=1e-5, rtol=0)
    policy.train()  # training drops every kept schedule
    assert not policy.net._schedule_caches
