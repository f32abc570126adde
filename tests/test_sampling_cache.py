"""What sampling computes once instead of at every denoising step: the noise embeddings of a
schedule's levels (reused across chunks while the weights stay the same) and the objectives'
coefficients at scalar levels. Reuse must give the same numbers, bit for bit."""


import pytest
import torch

from factories import make_obs, make_tiny_policy, mode_policy_config, objective_config, tiny_policy_config
from mixpolicy.policies.denoising_policy import DenoisingPolicy
from mixpolicy.policies.objectives import per_sample
from mixpolicy.policies.factory import make_objective


def _embed_calls(policy, monkeypatch):
    calls = []
    original = policy.net.noise_embed.forward
    monkeypatch.setattr(policy.net.noise_embed, "forward", lambda level: calls.append(level.clone()) or original(level))
    return calls


@pytest.mark.parametrize("cfg", [tiny_policy_config(), mode_policy_config(objective="flow")], ids=["dense-ddpm", "mode-flow"])
def test_noise_embeddings_are_computed_once_per_level_and_reused_bit_for_bit(cfg, monkeypatch):
    policy = make_tiny_policy(cfg).eval()
    obs = make_obs()
    first = policy.plan(obs, torch.Generator().manual_seed(0)).actions
    calls = _embed_calls(policy, monkeypatch)
    second = policy.plan(obs, torch.Generator().manual_seed(0)).actions
    assert calls == []  # every step's embedding came from the first chunk
    assert torch.equal(first, second)
    policy.net._level_cache.clear()
    fresh = policy.plan(obs, torch.Generator().manual_seed(0)).actions
    assert len(calls) == cfg.objective.num_inference_steps and torch.equal(fresh, first)


def test_changed_weights_drop_the_reused_embeddings(monkeypatch):
    policy = make_tiny_policy().eval()
    obs = make_obs()
    policy.plan(obs, torch.Generator().manual_seed(0))
    calls = _embed_calls(policy, monkeypatch)
    with torch.no_grad():
        policy.net.noise_embed.mlp[0].weight.add_(0.5)  # an in-place update, as an optimizer step
    after = policy.plan(obs, torch.Generator().manual_seed(0)).actions
    assert len(calls) == 4
    # the same weights in a fresh policy (nothing cached) give the same chunk
    other = DenoisingPolicy(policy.cfg, policy.shape_meta).eval()
    other.load_state_dict(policy.state_dict())
    assert torch.equal(other.plan(obs, torch.Generator().manual_seed(0)).actions, after)
    # load_state_dict into the first policy is an in-place copy too
    policy.load_state_dict(make_tiny_policy(seed=1).state_dict())
    calls.clear()
    policy.plan(obs, torch.Generator().manual_seed(0))
    assert len(calls) == 4


def test_a_different_batch_or_level_is_embedded_anew(monkeypatch):
    policy = make_tiny_policy().eval()
    policy.plan(make_obs(b=3))
    calls = _embed_calls(policy, monkeypatch)
    policy.plan(make_obs(b=2))
    assert len(calls) == 4
    net = policy.net
    policy.prepare_sampling(policy.objective.schedule(4))
    level = torch.full((2,), 7.0)
    calls.clear()
    net.embed_level(level, step=0)  # step 0's cached level differs: computed
    assert len(calls) == 1 and torch.equal(calls[0], level)


def test_training_never_uses_the_sampling_cache(monkeypatch):
    policy = make_tiny_policy().eval()
    policy.plan(make_obs())
    policy.train()
    calls = _embed_calls(policy, monkeypatch)
    batch = {"state": make_obs()["state"], "action": torch.rand(3, 4, 3), "task": torch.tensor([0, 1, 0])}
    loss, _ = policy.compute_loss(batch)
    loss.backward()
    assert len(calls) == 1 and policy.net._sampling is None and policy.net._level_cache == {}
    assert policy.net.pos.grad is not None and policy.net.pos.grad.abs().sum() > 0


def test_a_forward_with_gradients_after_sampling_reaches_the_position_embeddings():
    cfg = tiny_policy_config()
    cfg = type(cfg)(**{**cfg.__dict__, "network": type(cfg.network)(**{**cfg.network.__dict__, "condition": "cached"})})
    policy = make_tiny_policy(cfg).eval()
    policy.plan(make_obs())  # leaves the chunk's gathered positions behind
    net = policy.net
    assert net._sampling is not None
    with torch.enable_grad():
        net.stream_pos().sum().backward()
    assert net.pos.grad is not None and net.pos.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["ddpm", "edm", "flow"])
def test_scalar_level_coefficients_equal_the_per_sample_ones(kind):
    obj = make_objective(objective_config(kind, num_train_timesteps=20, num_inference_steps=4))
    x = torch.randn(3, 4, 2)
    out = torch.randn(3, 4, 2)
    schedule = obj.schedule(4)
    with torch.no_grad():
        for i in range(len(schedule)):
            scalar = obj.prediction(out, x, schedule[i])
            rows = obj.prediction(out, x, schedule[i].expand(3).clone())
            for a, b in zip(scalar, rows):
                assert torch.equal(a, b)
            again = obj.prediction(out, x, schedule[i])  # memoized
            assert all(torch.equal(a, b) for a, b in zip(scalar, again))
    assert per_sample(schedule[0], x).ndim == 0
    # with gradients on, nothing is memoized (a cached tensor must not enter a backward graph)
    n = len(obj._scalars)
    xr = x.clone().requires_grad_()
    obj.prediction(out, xr, schedule[1])[0].sum().backward()
    assert len(obj._scalars) == n and xr.grad is not None
