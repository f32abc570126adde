"""Shortcut-model objective: step-size conditioning, self-consistency training, 1-2 step sampling."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from mixpolicy.cli import main
from mixpolicy.config import ConfigError
from mixpolicy.datasets.normalizer import Normalizer
from mixpolicy.deploy.local import LocalPolicy
from mixpolicy.deploy.rti import RTIConfig, RTISampler, shift_chunk
from mixpolicy.errors import UserError
from mixpolicy.policies.checkpoint import load_policy, save_policy
from mixpolicy.policies.config import FlowConfig, MoDETransformerConfig, MoHConfig, ShortcutConfig, TransformerConfig, policy_config_from_dict
from mixpolicy.policies.denoising_policy import DenoisingPolicy, WarmStart
from mixpolicy.policies.factory import make_objective
from mixpolicy.policies.networks.transformer import NoiseEmbedding
from mixpolicy.policies.prefix import PrefixConstraint
from mixpolicy.policies.solvers import function_evaluations, sample
from factories import make_obs, make_tiny_policy, metaworld_shape_meta, spy_denoiser_calls, tiny_policy_config


def shortcut_policy(steps=2, seed=0, **kw):
    obj = ShortcutConfig(num_inference_steps=steps, max_inference_steps=kw.pop("max_steps", 128))
    return make_tiny_policy(tiny_policy_config(objective=obj, **kw), seed=seed)


# ---------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "kw, field",
    [
        ({"num_inference_steps": 3}, "objective.num_inference_steps"),
        ({"num_inference_steps": 256}, "objective.num_inference_steps"),
        ({"max_inference_steps": 96}, "objective.max_inference_steps"),
        ({"max_inference_steps": 1, "num_inference_steps": 1}, "objective.max_inference_steps"),
        ({"consistency_fraction": 0.0}, "objective.consistency_fraction"),
        ({"consistency_fraction": 1.0}, "objective.consistency_fraction"),
        ({"solver": "heun"}, "objective.solver"),
    ],
)
def test_bad_shortcut_configs_are_one_line_errors_naming_the_field(kw, field):
    with pytest.raises(ConfigError, match=f"^config field '{field}'"):
        policy_config_from_dict({"objective": {"type": "shortcut", **kw}})


def test_the_default_config_samples_in_two_steps():
    cfg = policy_config_from_dict({"objective": {"type": "shortcut"}}).objective
    assert isinstance(cfg, ShortcutConfig)
    assert (cfg.num_inference_steps, cfg.solver, cfg.max_inference_steps, cfg.consistency_fraction) == (2, "euler", 128, 0.25)


# ---------------------------------------------------------------------- schedule and conditions
def test_schedule_steps_of_one_over_n_and_conditions_carry_the_step_size():
    obj = make_objective(ShortcutConfig(max_inference_steps=8))
    assert obj.schedule(1).tolist() == [1.0]
    assert obj.schedule(2).tolist() == [1.0, 0.5]
    assert obj.schedule(4).tolist() == [1.0, 0.75, 0.5, 0.25]
    s = obj.schedule(2)
    assert obj.schedule_conditions(s).tolist() == [[1000.0, 500.0], [500.0, 500.0]]
    assert obj.step_condition(s, 1, s[1].expand(3)).tolist() == [[500.0, 500.0]] * 3
    assert obj.schedule_conditions(obj.schedule(1)).tolist() == [[1000.0, 1000.0]]
    # the finest step (1 / max_inference_steps) is conditioned as the instantaneous velocity
    assert obj.schedule_conditions(obj.schedule(8))[:, 1].tolist() == [0.0] * 8
    for n in (3, 16):
        with pytest.raises(ValueError, match="power of two"):
            obj.schedule(n)
    assert function_evaluations(obj, 2) == 2 and function_evaluations(obj, 2, start=1) == 1


def test_an_oracle_average_velocity_lands_on_the_data_in_one_step():
    """s(x, t, d) = (x - x0) / t is exact for a single clean sample: any step count recovers it."""
    obj = make_objective(ShortcutConfig())
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(2, 5, 3, generator=g) - 0.5

    def oracle(x, cond, step=None):
        assert cond.shape == (x.shape[0], 2)
        return (x - x0) / (cond[:, 0] / 1000.0).view(-1, 1, 1)

    for n in (1, 2, 4):
        out = sample(obj, oracle, obj.prior(x0.shape, g), obj.schedule(n))
        torch.testing.assert_close(out, x0, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------- networks
def test_the_step_embedding_leaves_unconditioned_networks_unchanged():
    torch.manual_seed(0)
    plain = NoiseEmbedding(16)
    torch.manual_seed(0)
    stepped = NoiseEmbedding(16, step_conditioned=True)
    assert set(plain.state_dict()) == {k for k in stepped.state_dict() if not k.startswith("step_mlp")}
    for k, v in plain.state_dict().items():
        assert torch.equal(v, stepped.state_dict()[k]), k
    level = torch.tensor([10.0, 500.0])
    both = stepped(torch.stack([level, torch.tensor([0.0, 250.0])], -1))
    assert both.shape == (2, 16)
    torch.testing.assert_close(both - stepped.step_mlp(stepped.sin(torch.tensor([0.0, 250.0]))), plain(level))
    with pytest.raises(ValueError, match=r"\(batch, 2\)"):
        stepped(level)
    with pytest.raises(ValueError, match="step-conditioned"):
        plain(torch.zeros(2, 2))
    assert not any("step_mlp" in k for k in make_tiny_policy().state_dict())


def test_plan_shapes_and_network_evaluations(monkeypatch):
    policy = shortcut_policy().eval()
    calls = spy_denoiser_calls(policy, monkeypatch)
    plan = policy.plan(make_obs(3), torch.Generator().manual_seed(1))
    assert plan.actions.shape == (3, 4, 3) and plan.steps == 2 and len(calls) == 2
    assert [c[0][0].tolist() for c in calls] == [[1000.0, 500.0], [500.0, 500.0]]
    calls.clear()
    one = policy.plan(make_obs(3), torch.Generator().manual_seed(1), num_steps=1)
    assert one.steps == 1 and len(calls) == 1 and calls[0][0][0].tolist() == [1000.0, 1000.0]
    assert torch.isfinite(one.actions).all()


def test_mode_expert_cache_is_exact_for_the_shortcut_schedule():
    net = MoDETransformerConfig(width=32, depth=2, heads=2, num_experts=4, top_k=2)
    policy = shortcut_policy(network=net).eval()
    obs = make_obs(2)
    cached = policy.plan(obs, torch.Generator().manual_seed(3)).normalized
    assert policy.net._cached_schedule.tolist() == [1.0, 0.5]
    policy.cfg.network.expert_cache = False
    uncached = policy.plan(obs, torch.Generator().manual_seed(3)).normalized
    torch.testing.assert_close(cached, uncached, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------- training
def fixed_batch(b=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    batch = make_obs(b, seed)
    batch["action"] = torch.randn(b, 4, 3, generator=g) * 0.5 + 0.3
    return batch


@pytest.mark.parametrize(
    "variant",
    [{}, {"head": MoHConfig(horizons=[2, 4])}, {"train_delay_max": 2},
     {"network": TransformerConfig(width=32, depth=2, heads=2, condition="cached")},
     pytest.param({"network": MoDETransformerConfig(width=32, depth=2, heads=2)}, marks=pytest.mark.slow)],
)  # fmt: skip
def test_loss_is_finite_and_decreases_on_a_fixed_batch(variant):
    policy = shortcut_policy(**variant).train()
    opt = torch.optim.Adam(policy.parameters(), lr=3e-3)
    batch, losses = fixed_batch(), []
    for i in range(100):
        # one draw of noise, levels and step sizes: a fixed objective the model can fit
        loss, logs = policy.compute_loss(batch, generator=torch.Generator().manual_seed(0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(np.isfinite(losses))
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10]), (losses[:10], losses[-10:])
    if isinstance(variant.get("network"), MoDETransformerConfig):
        assert "load_balance" in logs  # the router losses of the trained (last) forward


def test_the_consistency_rows_query_the_model_at_half_the_step_on_their_own_samples():
    """Per sample: flow rows at d = 0; consistency rows ask two d-steps of the same samples' conditions."""
    obj = make_objective(ShortcutConfig(max_inference_steps=8, consistency_fraction=0.5))
    x0 = torch.randn(8, 4, 3)
    seen = []

    def denoise(x, cond, step=None, rows=None):
        seen.append((cond.clone(), None if rows is None else rows.tolist()))
        return torch.zeros_like(x)

    per_elem = obj.loss(denoise, x0, torch.Generator().manual_seed(0))
    assert per_elem.shape == x0.shape
    (c1, r1), (c2, r2), (c, r) = seen
    assert r1 == r2 == [4, 5, 6, 7] and r is None
    assert c[:4, 1].tolist() == [0.0] * 4
    two_d = c[4:, 1]
    assert set(two_d.tolist()) <= {1000.0, 500.0, 250.0}
    torch.testing.assert_close(c1[:, 0], c[4:, 0])  # the first half-step from the sample's own level
    torch.testing.assert_close(c2[:, 0], c[4:, 0] - two_d / 2)  # the second from half a step later
    d = two_d / 2
    torch.testing.assert_close(c1[:, 1], torch.where(d <= 125.0, 0.0, d))
    assert bool(((c[4:, 0] - two_d) >= -1e-3).all())  # a 2d step never passes t = 0


class ToyDenoiser(nn.Module):
    """A small MLP on (x, t, d) for 1-D actions."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 64), nn.SiLU(), nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, 1))

    def forward(self, x, cond, step=None, rows=None):
        c = cond / 1000.0
        if c.ndim == 1:
            c = torch.stack([c, torch.zeros_like(c)], -1)
        return self.net(torch.cat([x.reshape(-1, 1), c], -1)).view(x.shape)


def bimodal(n, g):
    return torch.where(torch.rand(n, 1, 1, generator=g) < 0.5, -1.0, 1.0) + 0.1 * torch.randn(n, 1, 1, generator=g)


def train_toy(cfg, steps=300):
    torch.manual_seed(0)
    obj, model = make_objective(cfg), ToyDenoiser()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g, losses = torch.Generator().manual_seed(1), []
    for _ in range(steps):
        loss = obj.loss(model, bimodal(256, g), g).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    with torch.no_grad():
        x = sample(obj, model, obj.prior((4000, 1, 1), torch.Generator().manual_seed(2)), obj.schedule(1))
    return x, losses


def test_one_shortcut_step_reaches_both_modes_where_one_flow_step_collapses_to_the_mean():
    """Data: +-1 with noise 0.1 (|x| mean 1, std 1). One Euler step of plain flow matching
    lands on E[x0] = 0; one step of the shortcut model reproduces the two modes."""
    x, losses = train_toy(ShortcutConfig(max_inference_steps=8, num_inference_steps=1))
    assert np.isfinite(losses).all() and np.mean(losses[-20:]) < 0.8 * np.mean(losses[:20])
    assert abs(float(x.mean())) < 0.2
    assert abs(float(x.std()) - 1.0) < 0.2 and abs(float(x.abs().mean()) - 1.0) < 0.25
    flow, _ = train_toy(FlowConfig(num_inference_steps=1))
    assert float(flow.abs().mean()) < 0.5 and abs(float(flow.std()) - 1.0) > 0.4


# ---------------------------------------------------------------------- warm starts and RTI
def test_rti_warm_start_takes_the_remaining_shortcut_steps_from_the_noised_shifted_chunk(monkeypatch):
    policy = shortcut_policy().eval()
    rti = RTISampler(policy, RTIConfig(k=1, renoise=True))
    obs = make_obs(2)
    first = rti(obs, generator=torch.Generator().manual_seed(0))
    assert first.steps == 2 and not first.warm
    prev = rti._prev.clone()
    calls = spy_denoiser_calls(policy, monkeypatch)
    warm = rti(obs, shift=1, generator=torch.Generator().manual_seed(9))
    assert warm.steps == 1 and warm.warm and len(calls) == 1
    assert calls[0][0].tolist() == [[500.0, 500.0]] * 2  # level 1/2, one step of 1/2 to the data
    noise = torch.randn(prev.shape, generator=torch.Generator().manual_seed(9))
    expected = policy.objective.add_noise(shift_chunk(prev, 1), noise, torch.tensor(0.5).expand(2))
    torch.testing.assert_close(calls[0][1], expected)
    # a finer schedule for the warm start: two steps of 1/4 from level 1/2
    calls.clear()
    rti4 = RTISampler(policy, RTIConfig(k=2, schedule_steps=4))
    rti4(obs)
    calls.clear()
    assert rti4(obs, shift=1).steps == 2
    assert [c[0][0].tolist() for c in calls] == [[500.0, 250.0], [250.0, 250.0]]
    with pytest.raises(UserError, match="rti.k=3 exceeds the schedule's 2 steps"):
        RTISampler(policy, RTIConfig(k=3))
    with pytest.raises(UserError, match="rti.schedule_steps=3: .*power of two"):
        RTISampler(policy, RTIConfig(k=1, schedule_steps=3))


def test_a_warm_start_with_the_exact_average_velocity_returns_its_guess():
    """WarmStart at index 1 of two steps: level 1/2, one step of 1/2 along (x - guess) / t."""
    obj = make_objective(ShortcutConfig())
    guess = torch.randn(2, 4, 3)
    x = WarmStart(guess, 1).initial(obj, obj.schedule(2), torch.Generator().manual_seed(0))
    oracle = lambda x_in, cond, step=None: (x_in - guess) / (cond[:, 0] / 1000.0).view(-1, 1, 1)  # noqa: E731
    out = sample(obj, oracle, x, obj.schedule(2), start=1)
    torch.testing.assert_close(out, guess, atol=1e-5, rtol=0)


def test_a_clean_prefix_policy_runs_conditioned_real_time_chunking():
    policy = shortcut_policy(train_delay_max=2).eval()
    target = torch.randn(2, 4, 3)
    plan = policy.plan(make_obs(2), torch.Generator().manual_seed(0), prefix=PrefixConstraint(target, frozen=2, mode="conditioned"))
    torch.testing.assert_close(plan.normalized[:, :2], target[:, :2])


# ---------------------------------------------------------------------- CLI, eval, serve
SHORTCUT_OVERRIDES = ["policy=dit_shortcut", "policy.network.width=32", "policy.network.depth=1", "policy.network.heads=2",
                      "policy.horizon=4", "policy.n_action_steps=2", "policy.obs_hidden=32"]  # fmt: skip


def test_cli_trains_a_shortcut_policy_that_loads_and_plans_in_one_step(tmp_path, capsys, dataset_factory):
    dataset_factory(lengths=(6, 5, 7))
    run = tmp_path / "run"
    code = main(["train", f"dataset={tmp_path}/d.zarr", f"out_dir={run}", "steps=3", "batch_size=4", "progress=false", *SHORTCUT_OVERRIDES])
    assert code == 0, capsys.readouterr().err
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(m["loss"]) for m in metrics if "loss" in m)
    policy, _ = load_policy(run / "checkpoints" / "last")
    assert policy.cfg.objective.type == "shortcut" and policy.net.noise_embed.step_mlp is not None
    plan = policy.plan(make_obs(2), num_steps=1)
    assert plan.steps == 1 and plan.actions.shape == (2, 4, 3)


def test_cli_refuses_a_step_count_a_shortcut_model_cannot_sample(tmp_path, capsys):
    code = main(["train", "dataset=x", f"out_dir={tmp_path}/run", *SHORTCUT_OVERRIDES, "policy.objective.num_inference_steps=3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "'objective.num_inference_steps'" in err[0] and "power of two" in err[0]


def test_serving_a_shortcut_checkpoint_warm_starts_with_one_step(tmp_path):
    policy = shortcut_policy(seed=1)
    save_policy(policy, tmp_path / "ckpt")
    local = LocalPolicy(load_policy(tmp_path / "ckpt")[0], RTIConfig(k=1), seed=0)
    obs = {k: v[:1] for k, v in make_obs(1).items()}
    assert local.sampler.full_steps == 2 and local.sampler.warm_steps == 1
    first = local.sampler(obs)
    second = local.sampler(obs, shift=1)
    assert (first.steps, second.steps, second.warm) == (2, 1, True)


@pytest.mark.slow
def test_eval_runs_a_shortcut_policy_at_one_step_with_rti(tmp_path, capsys):
    torch.manual_seed(0)
    norm = Normalizer.from_data({"state": np.random.default_rng(0).normal(size=(20, 39)), "action": np.random.default_rng(0).uniform(-1, 1, (20, 4))})
    cfg = tiny_policy_config(objective=ShortcutConfig())
    save_policy(DenoisingPolicy(cfg, metaworld_shape_meta(), norm), tmp_path / "ckpt")
    common = [f"checkpoint={tmp_path}/ckpt", "episodes_per_task=1", "num_envs=1", "max_episode_steps=6", "progress=false", "device=cpu"]
    assert main(["eval", *common, "num_inference_steps=1", f"out={tmp_path}/one"]) == 0
    assert json.loads((tmp_path / "one" / "results.json").read_text())["num_inference_steps"] == 1
    assert main(["eval", *common, "mode=rti", "delay=1", "rti_k=1", f"out={tmp_path}/rti"]) == 0
    capsys.readouterr()
    assert main(["eval", *common, "num_inference_steps=3"]) == 2
    assert "power of two" in capsys.readouterr().err
