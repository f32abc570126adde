"""RTI warm start: exact noise levels, shift/pad, reset, starting points, discrete dims.

Parametrized over every registered objective, so objectives added later are covered.
"""

import numpy as np
import pytest
import torch

from mixpolicy.config import ConfigError
from mixpolicy.deploy.rti import RTIConfig, RTISampler, shift_chunk, warm_schedule_steps
from mixpolicy.errors import UserError
from mixpolicy.policies.config import OBJECTIVE_CONFIGS
from mixpolicy.policies.denoising_policy import DenoisingPolicy, ShapeMeta
from mixpolicy.policies.solvers import sample
from factories import objective_config, spy_denoiser_calls, tiny_policy_config

STATE_DIM, ACTION_DIM = 6, 3


def odd_steps(objective: str) -> int:
    """A schedule length that is not a power of two where the objective allows one (shortcut models do not)."""
    return 4 if objective == "shortcut" else 5


def make_policy(objective="ddpm", steps=4, scale=1.0, **obj_kw):
    torch.manual_seed(0)
    obj = objective_config(objective, num_train_timesteps=20, num_inference_steps=steps, **obj_kw)
    cfg = tiny_policy_config(objective=obj, horizon=6, discrete_action_scale=scale)
    meta = ShapeMeta(obs={"state": [STATE_DIM]}, action_dim=ACTION_DIM, tasks=["a", "b"], discrete_action_dims=[2])
    policy = DenoisingPolicy(cfg, meta).eval()
    # A non-trivial action normalization: raw = (x - offset) / scale.
    p = policy.normalizer.params["action"]
    p.scale.copy_(torch.tensor([0.5, 2.0, 1.0]) / scale ** torch.tensor([0.0, 0.0, 1.0]))
    p.offset.copy_(torch.tensor([0.1, -0.2, 0.0]))
    return policy


def net_input(policy, x, level):
    """What the network sees for state ``x`` at ``level`` (EDM preconditions its input)."""
    f = getattr(policy.objective, "network_input", None)
    return f(x, level.expand(x.shape[0])) if f else x


def test_shift_chunk_drops_executed_and_pads_with_last():
    chunk = torch.arange(2 * 5 * 1, dtype=torch.float32).reshape(2, 5, 1)
    out = shift_chunk(chunk, 2)
    assert out[0, :, 0].tolist() == [2, 3, 4, 4, 4]
    per_sample = shift_chunk(chunk, torch.tensor([0, 7]))  # MoH-style executed count per sample
    assert per_sample[0, :, 0].tolist() == [0, 1, 2, 3, 4]
    assert per_sample[1, :, 0].tolist() == [9, 9, 9, 9, 9]
    with pytest.raises(ValueError, match="entries"):
        shift_chunk(chunk, torch.tensor([1, 2, 3]))


@pytest.mark.parametrize("objective", sorted(OBJECTIVE_CONFIGS))
def test_first_call_is_full_denoising_and_matches_the_policy(objective, obs_factory):
    policy = make_policy(objective)
    rti = RTISampler(policy, RTIConfig(k=2, discrete="none"))
    obs = obs_factory(2)
    res = rti(obs, shift=3, generator=torch.Generator().manual_seed(5))
    ref = policy.predict_action_chunk(obs, generator=torch.Generator().manual_seed(5))
    assert res.steps == 4 and not res.warm
    torch.testing.assert_close(res.actions, ref)


@pytest.mark.parametrize("objective", sorted(OBJECTIVE_CONFIGS))
def test_warm_call_runs_the_last_k_steps_at_their_true_levels(objective, monkeypatch, obs_factory):
    n = odd_steps(objective)
    policy = make_policy(objective, steps=n)
    rti = RTISampler(policy, RTIConfig(k=2, renoise=False, discrete="none", start_noise="tail"))
    calls = spy_denoiser_calls(policy, monkeypatch)
    obs = obs_factory(2)
    rti(obs, generator=torch.Generator().manual_seed(1))
    schedule = policy.objective.schedule(n)
    expected_full = [policy.objective.step_condition(schedule, i, s.expand(2)) for i, s in enumerate(schedule)]
    assert len(calls) == n
    for (got, _), want in zip(calls, expected_full):
        torch.testing.assert_close(got, want)
    calls.clear()
    prev = rti._prev.clone()
    res = rti(obs, shift=2, generator=torch.Generator().manual_seed(2))
    assert res.steps == 2 and res.warm
    assert [c[0] for c in calls] and len(calls) == 2
    for (got, _), want in zip(calls, expected_full[-2:]):
        torch.testing.assert_close(got, want)
    # reference starting point: the shifted clean guess itself, no noise added
    torch.testing.assert_close(calls[0][1], net_input(policy, shift_chunk(prev, 2), schedule[n - 2]))


@pytest.mark.parametrize("objective", sorted(OBJECTIVE_CONFIGS))
def test_renoised_start_is_the_forward_process_at_level_k(objective, monkeypatch, obs_factory):
    n = odd_steps(objective)
    policy = make_policy(objective, steps=n)
    rti = RTISampler(policy, RTIConfig(k=3, renoise=True, discrete="none", start_noise="tail"))
    obs = obs_factory(2)
    rti(obs, generator=torch.Generator().manual_seed(1))
    prev = rti._prev.clone()
    calls = spy_denoiser_calls(policy, monkeypatch)
    rti(obs, shift=1, generator=torch.Generator().manual_seed(9))
    noise = torch.randn(prev.shape, generator=torch.Generator().manual_seed(9))
    level = policy.objective.schedule(n)[n - 3]
    expected = policy.objective.add_noise(shift_chunk(prev, 1), noise, level.expand(2))
    torch.testing.assert_close(calls[0][1], net_input(policy, expected, level))
    assert not torch.allclose(calls[0][1], net_input(policy, shift_chunk(prev, 1), level))


@pytest.mark.parametrize("objective", sorted(OBJECTIVE_CONFIGS))
def test_reset_and_disabled_rti_denoise_fully(objective, obs_factory):
    policy = make_policy(objective)
    rti = RTISampler(policy, RTIConfig(k=1))
    obs = obs_factory(2)
    assert rti(obs).steps == 4
    assert rti(obs, shift=1).steps == 1
    assert rti(obs, shift=None).steps == 4  # no shift known: full
    rti.reset()
    assert rti(obs, shift=1).steps == 4  # new episode: full
    off = RTISampler(policy, RTIConfig(enabled=False))
    off(obs)
    assert off(obs, shift=1).steps == 4


def test_ddpm_truncated_schedule_steps_between_its_own_levels():
    """With 20 train steps and a 5-step DDIM schedule [16, 12, 8, 4, 0], k=2 must step
    8 -> 4 -> 0 -> clean: the levels of the truncated schedule, not consecutive train
    timesteps 1, 0 (the reference's skipped-timestep bug). With an epsilon model that
    predicts zero, a DDIM step from t to t' scales x by sqrt(abar_t'/abar_t)."""
    policy = make_policy("ddpm", steps=5, clip_sample=False)
    rti = RTISampler(policy, RTIConfig(k=2, renoise=False, discrete="none"))
    schedule = policy.objective.schedule(5)
    assert schedule.tolist() == [16, 12, 8, 4, 0]
    abar = policy.objective.sample_scheduler.alphas_cumprod
    x = torch.randn(2, 6, ACTION_DIM)
    zero_eps = lambda x, level, **kw: torch.zeros_like(x)  # noqa: E731
    out = sample(policy.objective, zero_eps, x, schedule, start=len(schedule) - rti.cfg.k)
    torch.testing.assert_close(out, x / abar[4].sqrt())
    assert not torch.allclose(out, x / abar[1].sqrt())


def test_k_larger_than_schedule_is_a_user_error():
    with pytest.raises(UserError, match="rti.k=9 exceeds"):
        RTISampler(make_policy(), RTIConfig(k=9))


def test_clip_variant_executes_the_sign_and_stores_the_snapped_guess(obs_factory):
    policy = make_policy()
    rti = RTISampler(policy, RTIConfig(k=2, discrete="clip"))
    res = rti(obs_factory(4), generator=torch.Generator().manual_seed(0))
    p = policy.normalizer.params["action"]
    raw_extremes = sorted(((torch.tensor([-1.0, 1.0]) - p.offset[2]) / p.scale[2]).tolist())
    gripper = res.actions[..., 2].flatten().tolist()
    assert set(np.round(gripper, 5)) <= set(np.round(raw_extremes, 5))
    assert set(rti._prev[..., 2].flatten().tolist()) <= {-1.0, 1.0}
    # continuous dims untouched by the snapping
    assert len(set(np.round(res.actions[..., 0].flatten().tolist(), 5))) > 2


def test_scale_variant_keeps_the_unsnapped_guess_and_needs_a_scaled_policy(obs_factory):
    with pytest.raises(UserError, match="discrete_action_scale > 1"):
        RTISampler(make_policy(scale=1.0), RTIConfig(discrete="scale"))
    policy = make_policy(scale=10.0)
    rti = RTISampler(policy, RTIConfig(k=2, discrete="scale"))
    res = rti(obs_factory(4), generator=torch.Generator().manual_seed(0))
    stored = rti._prev[..., 2]
    assert not set(stored.flatten().tolist()) <= {-0.1, 0.1}  # the raw guess is kept
    # executed: sign in normalized space, i.e. +-0.1 there, which unnormalizes to the raw extremes
    p = policy.normalizer.params["action"]
    executed_norm = res.actions[..., 2] * p.scale[2] + p.offset[2]
    torch.testing.assert_close(executed_norm.abs(), torch.full_like(executed_norm, 0.1))
    torch.testing.assert_close(torch.sign(executed_norm), torch.where(stored >= 0, 1.0, -1.0))


def test_training_with_discrete_action_scale_shrinks_the_gripper_column(tmp_path, dataset_factory):
    from mixpolicy.config import from_dict
    from mixpolicy.train.trainer import TrainConfig, Trainer

    dataset_factory(lengths=(6, 5, 7))
    small = dict(network=dict(width=16, depth=1, heads=2), horizon=4, n_action_steps=2, obs_hidden=16, objective=dict(num_train_timesteps=10, num_inference_steps=2))
    cfgs = {}
    for scale in (1.0, 10.0):
        cfg = from_dict(TrainConfig, dict(dataset=str(tmp_path / "d.zarr"), out_dir=str(tmp_path / f"r{scale}"), steps=1, batch_size=4, progress=False, policy={**small, "discrete_action_scale": scale}))
        cfgs[scale] = Trainer(cfg).policy.normalizer.params["action"]
    torch.testing.assert_close(cfgs[10.0].scale[2], cfgs[1.0].scale[2] / 10)
    torch.testing.assert_close(cfgs[10.0].offset[2], cfgs[1.0].offset[2] / 10)
    torch.testing.assert_close(cfgs[10.0].scale[:2], cfgs[1.0].scale[:2])


@pytest.mark.parametrize("objective", sorted(OBJECTIVE_CONFIGS))
@pytest.mark.parametrize("k", [1, 2, 3])
def test_start_noise_picks_the_schedule_whose_kth_last_level_is_nearest(objective, k):
    base = 8 if objective == "shortcut" else 10  # a shortcut model samples powers of two
    obj = make_policy(objective, steps=base).objective
    n = warm_schedule_steps(obj, k, base, 0.5)
    assert n > k  # n = k would start at the prior
    gap = lambda m: abs(np.log(float(obj.noise_std(obj.schedule(m)[m - k]))) - np.log(0.5))  # noqa: E731
    for m in range(k + 1, 64):  # no other valid length comes closer
        try:
            obj.schedule(m)
        except ValueError:
            continue
        if 0 < float(obj.noise_std(obj.schedule(m)[m - k])) < np.inf:
            assert gap(n) <= gap(m) + 1e-9
    assert warm_schedule_steps(obj, k, base, "tail") == base


def test_auto_start_is_the_tail_for_even_schedules_and_noise_half_for_edm():
    assert warm_schedule_steps(make_policy("ddpm", steps=10).objective, 2, 10) == 10
    assert warm_schedule_steps(make_policy("flow", steps=10).objective, 2, 10) == 10
    edm = make_policy("edm", steps=10).objective
    assert float(edm.noise_std(edm.schedule(10)[8])) < 0.01  # the tail of 10 steps: sigma 0.0035
    n = warm_schedule_steps(edm, 2, 10)
    assert 0.25 < float(edm.noise_std(edm.schedule(n)[n - 2])) < 1.0


@pytest.mark.parametrize("objective", ["edm", "flow", "ddpm"])
def test_warm_call_with_a_start_noise_runs_k_steps_of_its_own_schedule(objective, monkeypatch, obs_factory):
    policy = make_policy(objective, steps=10)
    rti = RTISampler(policy, RTIConfig(k=2, renoise=False, discrete="none", start_noise=0.5))
    obs = obs_factory(2)
    rti(obs, generator=torch.Generator().manual_seed(1))
    prev = rti._prev.clone()
    calls = spy_denoiser_calls(policy, monkeypatch)
    res = rti(obs, shift=1, generator=torch.Generator().manual_seed(2))
    n = rti.warm_schedule_steps
    schedule = policy.objective.schedule(n)
    assert res.steps == 2 and res.warm and len(calls) == 2
    for i, (got, _) in enumerate(calls):
        torch.testing.assert_close(got, policy.objective.step_condition(schedule, n - 2 + i, schedule[n - 2 + i].expand(2)))
    torch.testing.assert_close(calls[0][1], net_input(policy, shift_chunk(prev, 1), schedule[n - 2]))
    assert rti.start_level() == pytest.approx(float(policy.objective.noise_std(schedule[n - 2])))
    assert 0.2 < rti.start_level() < 1.25
    # Full calls keep the policy's own 10 steps.
    rti.reset()
    assert rti(obs).steps == 10


def test_edm_warm_start_at_noise_half_moves_the_guess_the_tail_does_not(obs_factory):
    """The shifted guess is far from what this observation wants: from sigma 0.5 the warm call
    moves it; from the tail of the 10-step schedule (sigma 0.0035) it barely can."""
    policy = make_policy("edm", steps=10)
    obs = obs_factory(2)
    moved = {}
    for mode in ("tail", "auto"):
        rti = RTISampler(policy, RTIConfig(k=2, renoise=False, discrete="none", start_noise=mode))
        rti(obs, generator=torch.Generator().manual_seed(1))
        rti._prev = torch.zeros_like(rti._prev) + 0.9  # a guess unrelated to the policy's chunk
        out = rti(obs, shift=0, generator=torch.Generator().manual_seed(2))
        moved[mode] = float((policy.normalizer.normalize("action", out.actions) - 0.9).abs().mean())
    assert moved["auto"] > 5 * moved["tail"]


@pytest.mark.parametrize("bad", [-0.5, 0, "middle", True])
def test_bad_start_noise_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="rti.start_noise"):
        RTIConfig(start_noise=bad)
