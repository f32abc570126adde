"""Mixture of horizons: gating, masking, equivalences, adaptive execution, configs, wiring."""

import json

import numpy as np
import pytest
import torch

from mixpolicy.config import ConfigError, from_dict
from mixpolicy.datasets.normalizer import Normalizer
from mixpolicy.errors import UserError
from mixpolicy.policies.checkpoint import load_policy, save_policy
from mixpolicy.policies.config import (
    EDMConfig,
    MoDETransformerConfig,
    MoHConfig,
    PolicyConfig,
    TransformerConfig,
    policy_config_from_dict,
)
from mixpolicy.policies.denoising_policy import DenoisingPolicy
from mixpolicy.policies.factory import make_objective
from mixpolicy.policies.moh import HorizonLayout, MoHHead, adaptive_lengths, gate_balance, horizon_padding
from factories import make_obs, metaworld_shape_meta, objective_config, tiny_shape_meta

HORIZONS = [2, 4, 8]


def moh_config(kind="dit", objective="edm", solver="", horizons=HORIZONS, attention="bidirectional", **moh):
    common = dict(
        obs_keys=["state"],
        horizon=horizons[-1],
        n_action_steps=min(4, horizons[-1]),
        obs_hidden=32,
        objective=objective_config(objective, solver=solver, num_inference_steps=4, num_train_timesteps=20),
        head=MoHConfig(horizons=list(horizons), **moh),
    )
    if kind == "mode":
        net = MoDETransformerConfig(width=32, depth=2, heads=2, action_attention=attention)
        return PolicyConfig(network=net, **common)
    return PolicyConfig(network=TransformerConfig(width=32, depth=2, heads=2, mlp_ratio=2.0, action_attention=attention), **common)


def make(kind="dit", seed=0, **kw):
    torch.manual_seed(seed)
    cfg = moh_config(kind, **kw)
    policy = DenoisingPolicy(cfg, tiny_shape_meta())
    with torch.no_grad():  # a gate that is not uniform, so the tests see real weighting
        policy.head.gate.weight.normal_(0, 0.5)
    return policy


def _sample_chunk(policy, cond, x, schedule):
    policy.prepare_sampling(schedule)
    return policy.head.sample(policy.net, policy.objective, cond, x, schedule)


def _inputs(policy, b=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    cond = policy.encode_obs(make_obs(b))
    x = torch.randn(b, policy.cfg.horizon, 3, generator=g)
    level = torch.rand(b, generator=g) * 500
    return x, level, cond


# ---------------------------------------------------------------------- gate and masking
@pytest.mark.parametrize("training", [False, True])
def test_gate_weights_are_a_distribution_over_exactly_the_active_horizons(training):
    policy = make().train(training)
    x, level, cond = _inputs(policy)
    _, heads, alpha = policy.head.horizon_forward(policy.net, x, level, cond, generator=torch.Generator().manual_seed(0))
    active = ~horizon_padding(HORIZONS, 8)  # (K, H)
    assert alpha.shape == (3, 3, 8)
    torch.testing.assert_close(alpha.sum(0), torch.ones(3, 8))
    assert bool((alpha[:, :, :][~active[:, None, :].expand_as(alpha)] == 0).all())
    assert bool((alpha[active[:, None, :].expand_as(alpha)] > 0).all())
    # indices only the longest horizon covers take it with weight 1
    assert bool((alpha[-1, :, 4:] == 1).all())
    assert bool((heads[~active[:, None, :, None].expand_as(heads)] == 0).all())


def test_gate_noise_only_in_training():
    policy = make()
    x, level, cond = _inputs(policy)
    policy.train()
    a1 = policy.head.horizon_forward(policy.net, x, level, cond, generator=torch.Generator().manual_seed(1))[2]
    a2 = policy.head.horizon_forward(policy.net, x, level, cond, generator=torch.Generator().manual_seed(2))[2]
    assert not torch.allclose(a1, a2)
    policy.eval()
    e1 = policy.head.horizon_forward(policy.net, x, level, cond, generator=torch.Generator().manual_seed(1))[2]
    e2 = policy.head.horizon_forward(policy.net, x, level, cond, generator=torch.Generator().manual_seed(2))[2]
    assert torch.equal(e1, e2)


@pytest.mark.parametrize("kind", ["dit", "mode"])
def test_positions_past_a_horizon_do_not_influence_its_outputs(kind):
    policy = make(kind).eval()
    x, level, cond = _inputs(policy)
    fused, heads, alpha = policy.head.horizon_forward(policy.net, x, level, cond)
    for k, h in enumerate(HORIZONS[:-1]):
        perturbed = x.clone()
        perturbed[:, h:] += 5 * torch.randn_like(perturbed[:, h:])
        _, heads_p, _ = policy.head.horizon_forward(policy.net, perturbed, level, cond)
        for kk in range(k + 1):  # every horizon that ends at or before h sees the same prefix
            hk = HORIZONS[kk]
            torch.testing.assert_close(heads_p[kk, :, :hk], heads[kk, :, :hk], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(heads_p[-1], heads[-1])  # ... while the full horizon sees the change
    # the fused output at j mixes only the horizons covering j
    manual = torch.zeros_like(fused)
    for k, h in enumerate(HORIZONS):
        manual[:, :h] += alpha[k, :, :h, None] * heads[k, :, :h]
    torch.testing.assert_close(fused, manual, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("attention,pack", [("bidirectional", True), ("causal", True), ("bidirectional", False)])
def test_packed_rows_equal_each_horizon_run_alone_with_padded_keys_masked(attention, pack):
    policy = make(attention=attention).eval()
    policy.head.set_layout(HorizonLayout(HORIZONS, 1 + policy.net.n_cond_tokens, policy.net.mask, pack=pack))
    x, level, cond = _inputs(policy)
    _, heads, _ = policy.head.horizon_forward(policy.net, x, level, cond)
    pad = horizon_padding(HORIZONS, 8)
    for k, h in enumerate(HORIZONS):
        xk = x.masked_fill(pad[k][None, :, None], 0.0)
        ref = policy.net(xk, level, cond, None, pad[k][None].expand(3, -1))
        torch.testing.assert_close(heads[k, :, :h], ref[:, :h], atol=1e-5, rtol=1e-5)


def test_layout_packs_short_horizons_into_shared_rows():
    # 4 prefix tokens, rows of 20: [16] alone, then 8 + 4 share a row (12 + 8 tokens)
    layout = HorizonLayout([4, 8, 16], 4, None)
    assert layout.rows == 2 and layout.mask.shape == (2, 20, 20)
    # a 6-horizon mixture of an 8-chunk with 3 prefix tokens fits in 4 rows of 11 tokens
    layout = HorizonLayout([1, 2, 3, 4, 6, 8], 3, None)
    assert layout.rows == 4
    assert HorizonLayout([4, 8, 16], 4, None, pack=False).rows == 3
    assert bool(layout.mask.any(-1).all())  # every query (used or not) has a key


# ---------------------------------------------------------------------- equivalence
@pytest.mark.parametrize("kind", ["dit", "mode"])
def test_single_horizon_mixture_equals_the_plain_head(kind, obs_factory):
    torch.manual_seed(0)
    if kind == "dit":
        plain_cfg = PolicyConfig(
            obs_keys=["state"], horizon=8, n_action_steps=4, obs_hidden=32,
            network=TransformerConfig(width=32, depth=2, heads=2, mlp_ratio=2.0),
            objective=EDMConfig(num_inference_steps=4),
        )  # fmt: skip
        plain = DenoisingPolicy(plain_cfg, tiny_shape_meta())
    else:
        plain_cfg = PolicyConfig(
            obs_keys=["state"], horizon=8, n_action_steps=4, obs_hidden=32,
            network=MoDETransformerConfig(width=32, depth=2, heads=2), objective=EDMConfig(num_inference_steps=4),
        )  # fmt: skip
        plain = DenoisingPolicy(plain_cfg, tiny_shape_meta())
    single = make(kind, horizons=[8])
    missing, unexpected = single.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(missing) == ["head.gate.bias", "head.gate.weight", "head.gate_noise.bias", "head.gate_noise.weight"] and not unexpected
    plain.eval(), single.eval()
    x, level, cond = _inputs(plain)
    assert torch.equal(single.head.horizon_forward(single.net, x, level, cond)[0], plain.net(x, level, cond))
    a = plain.predict_action_chunk(obs_factory(), torch.Generator().manual_seed(3))
    b = single.predict_action_chunk(obs_factory(), torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    # and in training the fused loss is the plain denoising loss (same noise and levels)
    batch = {**obs_factory(), "action": torch.rand(3, 8, 3) * 2 - 1}
    plain.train(), single.train()
    torch.manual_seed(5)  # MoDE samples its training routes from the global generator
    _, plain_logs = plain.compute_loss(batch, torch.Generator().manual_seed(4))
    torch.manual_seed(5)
    _, logs = single.compute_loss(batch, torch.Generator().manual_seed(4))
    assert logs["fused_loss"] == pytest.approx(plain_logs["denoise_loss"], rel=1e-6)
    assert logs["horizon_loss_8"] == pytest.approx(plain_logs["denoise_loss"], rel=1e-6)
    assert logs["gate_balance"] == 0.0


# ---------------------------------------------------------------------- loss
@pytest.mark.parametrize("objective", ["ddpm", "edm", "flow"])
def test_objective_losses_broadcast_over_a_leading_head_dimension(objective):
    obj = make_objective(objective_config(objective, num_train_timesteps=20))
    x0 = torch.rand(3, 8, 3) * 2 - 1
    w = torch.randn(3)

    def single(x, level, step=None):
        return x * 0.3 + level.view(-1, 1, 1) * 1e-3

    def stacked(x, level, step=None):
        out = single(x, level)
        return torch.stack([out, out * w[0], out * w[1] + 1])

    ref = obj.loss(single, x0, torch.Generator().manual_seed(0))
    got = obj.loss(stacked, x0, torch.Generator().manual_seed(0))
    assert got.shape == (3, 3, 8, 3)
    torch.testing.assert_close(got[0], ref)
    assert not torch.allclose(got[1], ref)


def test_loss_terms_are_logged_weighted_and_each_horizon_scores_its_own_prefix(tiny_obs):
    policy = make(horizon_loss_weight=0.5, fused_loss_weight=2.0, balance_loss_weight=0.1).train()
    batch = {**tiny_obs, "action": torch.rand(3, 8, 3) * 2 - 1}
    loss, logs = policy.compute_loss(batch, torch.Generator().manual_seed(0))
    for key in ("fused_loss", "horizon_loss_2", "horizon_loss_4", "horizon_loss_8", "gate_balance", "gate_weight_2"):
        assert key in logs and np.isfinite(logs[key])
    expected = 2.0 * logs["fused_loss"] + 0.5 * sum(logs[f"horizon_loss_{h}"] for h in HORIZONS) + 0.1 * logs["gate_balance"]
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)
    # actions past horizon 2 do not enter horizon 2's loss (same noise, levels and gate noise)
    changed = {**batch, "action": batch["action"].clone()}
    changed["action"][:, 2:] = -changed["action"][:, 2:]
    _, logs2 = policy.compute_loss(changed, torch.Generator().manual_seed(0))
    assert logs2["horizon_loss_2"] == pytest.approx(logs["horizon_loss_2"], rel=1e-6)
    assert logs2["horizon_loss_8"] != pytest.approx(logs["horizon_loss_8"], rel=1e-3)
    loss.backward()
    assert policy.head.gate.weight.grad is not None and policy.head.gate_noise.weight.grad is not None


def test_gate_balance_is_zero_for_equal_use_and_grows_with_imbalance():
    alpha = torch.zeros(3, 2, 8)
    alpha[:, :, :2] = 1 / 3
    alpha[1:, :, 2:4] = 0.5
    alpha[2, :, 4:] = 1.0
    assert float(gate_balance(alpha, HORIZONS)) == pytest.approx(0.0, abs=1e-7)
    alpha[:, :, :2] = torch.tensor([0.6, 0.2, 0.2])[:, None, None]
    # segment [0, 2): weights (0.6, 0.2, 0.2), mean 1/3, variance 0.0355..: cv^2 = 0.32; segment [2, 4): 0
    assert float(gate_balance(alpha, HORIZONS)) == pytest.approx(0.32 / 2, rel=1e-4)


# ---------------------------------------------------------------------- adaptive execution
def test_adaptive_lengths_per_sample():
    d = torch.tensor(
        [
            [1.0, 1.0, 1.1, 1.2, 0.5, 0.5, 0.5, 0.5],  # extends to the longest covered prefix (4)
            [1.0, 1.0, 5.0, 0.1, 0.1, 0.1, 0.1, 0.1],  # stops at index 2
            [1.0, 3.0, 2.0, 2.5, 0.1, 0.1, 0.1, 0.1],  # tau = 1.2 * 2 = 2.4: extends over 2, stops at 3
            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # perfect agreement extends too
        ]
    )
    lengths = adaptive_lengths(d, HORIZONS, ratio=1.2, min_executed=2, min_active_horizons=2)
    assert lengths.tolist() == [4, 2, 3, 4]
    # one active horizon is enough: extension may run to the chunk's end
    assert adaptive_lengths(d, HORIZONS, 1.2, 2, 1).tolist() == [8, 2, 3, 8]
    assert adaptive_lengths(d, HORIZONS, 100.0, 3, 3).tolist() == [3, 3, 3, 3]


@pytest.mark.parametrize("kind,objective,solver", [("dit", "edm", ""), ("dit", "flow", "heun"), ("dit", "ddpm", ""), ("mode", "flow", "")])
def test_adaptive_execution_is_computed_per_sample_in_a_batch(kind, objective, solver, obs_factory):
    policy = make(kind, objective=objective, solver=solver, execution="adaptive", adaptive_ratio=1.5).eval()
    cond = policy.encode_obs(obs_factory(4))
    schedule = policy.objective.schedule()
    x = policy.objective.prior((4, 8, 3), torch.Generator().manual_seed(0))
    out, lengths = _sample_chunk(policy, cond, x, schedule)
    assert lengths.shape == (4,) and lengths.dtype == torch.long
    assert bool(((lengths >= 2) & (lengths <= 4)).all())  # [min_executed, longest prefix 2 horizons cover]
    d = policy.head.last_disagreement
    assert d.shape == (4, 8) and bool((d[:, :4] > 0).all()) and bool((d[:, 4:] == 0).all())
    for i in range(4):  # each sample alone gives its own length and actions
        out_i, len_i = _sample_chunk(policy, cond[i : i + 1], x[i : i + 1], schedule)
        assert int(len_i) == int(lengths[i])
        torch.testing.assert_close(out_i[0], out[i], atol=1e-5, rtol=1e-5)
    # fixed execution returns no lengths; the plan then carries n_action_steps
    policy.set_execution("fixed")
    assert _sample_chunk(policy, cond, x, schedule)[1] is None
    assert policy.plan(obs_factory(4)).executable.tolist() == [4, 4, 4, 4]


def test_ratio_controls_the_executed_length(obs_factory):
    policy = make(execution="adaptive", adaptive_ratio=0.01).eval()
    short = policy.plan(obs_factory(4), torch.Generator().manual_seed(0)).executable
    policy.set_execution(adaptive_ratio=100.0)
    long = policy.plan(obs_factory(4), torch.Generator().manual_seed(0)).executable
    assert short.tolist() == [2, 2, 2, 2] and long.tolist() == [4, 4, 4, 4]
    assert policy.execution_info() == {"execution": "adaptive", "adaptive_ratio": 100.0, "min_executed": 2, "min_active_horizons": 2, "longest": 4}


def test_select_action_runs_the_shortest_executable_prefix_of_the_batch(obs_factory):
    policy = make(execution="adaptive", adaptive_ratio=1.0).eval()
    calls = []
    orig = policy.plan
    policy.plan = lambda *a, **k: calls.append(orig(*a, **k)) or calls[-1]
    first = policy.select_action(obs_factory(3))
    n = int(calls[0].executable.min())
    for _ in range(n - 1):
        policy.select_action(obs_factory(3))
    assert len(calls) == 1
    torch.testing.assert_close(first, calls[0].actions[:, 0])
    policy.select_action(obs_factory(3))
    assert len(calls) == 2


def test_plain_policies_refuse_adaptive_execution():
    torch.manual_seed(0)
    plain = DenoisingPolicy(PolicyConfig(obs_keys=["state"], horizon=8, n_action_steps=4), tiny_shape_meta())
    with pytest.raises(UserError, match="needs a mixture-of-horizons policy"):
        plain.set_execution("adaptive")
    plain.set_execution("fixed")  # a no-op


# ---------------------------------------------------------------------- configs
def test_config_errors_fail_at_construction_naming_the_field():
    with pytest.raises(ConfigError, match=r"'policy.head.horizons'.*strictly increasing"):
        moh_config(horizons=[4, 2, 8])
    with pytest.raises(ConfigError, match=r"'policy.head.horizons'.*strictly increasing"):
        moh_config(horizons=[4, 4, 8])
    with pytest.raises(ConfigError, match=r"'policy.head.horizons'.*largest horizon \(8\) must equal.*policy.horizon=16"):
        PolicyConfig(horizon=16, head=MoHConfig(horizons=[2, 4, 8]))
    with pytest.raises(ConfigError, match=r"'policy.head.horizons'.*largest horizon \(16\).*horizon=8"):
        policy_config_from_dict({"type": "mode_moh", "horizon": 8, "n_action_steps": 4})
    with pytest.raises(ConfigError, match=r"'policy.head.min_executed'.*<= 4"):
        moh_config(execution="adaptive", min_executed=5)
    with pytest.raises(ConfigError, match=r"'policy.head.min_active_horizons'.*<= 3"):
        moh_config(execution="adaptive", min_active_horizons=4)
    with pytest.raises(ConfigError, match=r"'policy.head.execution'"):
        moh_config(execution="sometimes")
    with pytest.raises(ConfigError, match=r"unknown config key 'policy.head.horizon'"):
        policy_config_from_dict({"type": "dit_moh", "moh": {"horizon": [16]}})
    policy = make()
    with pytest.raises(ConfigError, match=r"'policy.head.adaptive_ratio'"):
        policy.set_execution("adaptive", -1.0)


# ---------------------------------------------------------------------- checkpoints, evaluation, deployment
def _metaworld_moh(tmp_path, **moh):
    torch.manual_seed(0)
    cfg = PolicyConfig(
        obs_keys=["state"], horizon=8, n_action_steps=4, obs_hidden=32,
        network=TransformerConfig(width=32, depth=1, heads=2, mlp_ratio=2.0),
        objective=EDMConfig(num_inference_steps=3),
        head=MoHConfig(horizons=[2, 4, 8], **moh),
    )  # fmt: skip
    shapes = metaworld_shape_meta()
    rng = np.random.default_rng(0)
    norm = Normalizer.from_data({"state": rng.normal(size=(20, 39)), "action": rng.uniform(-1, 1, (20, 4))})
    policy = DenoisingPolicy(cfg, shapes, norm)
    return save_policy(policy, tmp_path / "ckpt"), policy


@pytest.mark.slow
def test_checkpoint_round_trip_and_evaluation_with_adaptive_execution(tmp_path):
    from mixpolicy.envs.evaluate import EvalConfig, evaluate, format_table

    path, policy = _metaworld_moh(tmp_path)
    loaded, meta = load_policy(path)
    assert meta["policy_type"] == "dit_moh" and isinstance(loaded.head, MoHHead)
    policy.eval()
    torch.testing.assert_close(
        loaded.predict_action_chunk({"state": torch.zeros(2, 2, 39), "task": torch.zeros(2, dtype=torch.long)}, torch.Generator().manual_seed(0)),
        policy.predict_action_chunk({"state": torch.zeros(2, 2, 39), "task": torch.zeros(2, dtype=torch.long)}, torch.Generator().manual_seed(0)),
    )
    base = dict(checkpoint=str(path), episodes_per_task=2, num_envs=2, max_episode_steps=12, progress=False, device="cpu")
    fixed = evaluate(EvalConfig(**base, out=str(tmp_path / "fixed")))
    assert fixed["execution"] == {"execution": "fixed", "n_action_steps": 4}
    assert [e["policy_calls"] for e in fixed["tasks"]["reach-v3"]["per_episode"]] == [3, 3]
    adaptive = evaluate(EvalConfig(**base, execution="adaptive", adaptive_ratio=1.5, out=str(tmp_path / "adaptive")))
    assert adaptive["execution"]["execution"] == "adaptive" and adaptive["execution"]["adaptive_ratio"] == 1.5
    for e in adaptive["tasks"]["reach-v3"]["per_episode"]:
        assert 2 <= e["mean_executable"] <= 4
        assert e["policy_calls"] >= 12 / 4
    assert "actions/call" in format_table(adaptive)
    saved = json.loads((tmp_path / "adaptive" / "results.json").read_text())
    assert saved["mean_policy_calls"] == adaptive["mean_policy_calls"]
    with pytest.raises(ConfigError, match="'n_action_steps'"):
        EvalConfig(checkpoint="x", execution="adaptive", n_action_steps=4)


def test_rti_sampler_and_local_client_report_the_executable_length(tmp_path):
    from mixpolicy.deploy.local import load_local_policy
    from mixpolicy.deploy.rti import RTIConfig, RTISampler

    path, policy = _metaworld_moh(tmp_path, execution="adaptive", adaptive_ratio=1.5)
    policy.eval()
    sampler = RTISampler(policy, RTIConfig(k=2))
    obs = {"state": torch.randn(3, 2, 39), "task": torch.zeros(3, dtype=torch.long)}
    first = sampler(obs, generator=torch.Generator().manual_seed(0))
    assert first.executable.shape == (3,) and bool(((first.executable >= 2) & (first.executable <= 4)).all())
    warm = sampler(obs, shift=first.executable, generator=torch.Generator().manual_seed(1))  # per-sample shifts
    assert warm.warm and warm.steps == 2 and warm.executable.shape == (3,)
    client = load_local_policy(str(path), RTIConfig(k=2), device="cpu", execution="fixed")
    res = client.infer({"state": np.zeros((2, 39), np.float32)}, 0, None)
    assert res.executable is None
    client = load_local_policy(str(path), RTIConfig(k=2), device="cpu")
    res = client.infer({"state": np.zeros((2, 39), np.float32)}, 0, None)
    assert isinstance(res.executable, int) and 2 <= res.executable <= 4


@pytest.mark.slow
def test_control_loop_replans_after_the_executable_count_of_each_chunk():
    from mixpolicy.deploy.backend import InferenceResult
    from test_deploy_loop import ScriptedClient, run

    class AdaptiveClient(ScriptedClient):
        def infer(self, obs, task=0, shift=None):
            res = super().infer(obs, task, shift)
            return InferenceResult(res.actions, res.steps, res.warm, res.compute_ms, executable=[3, 6][len(self.calls) % 2])

    client = AdaptiveClient(n_action_steps=4)
    _, _, res = run(client, ticks=40, execute_steps=0)
    assert res.fault is None
    shifts = [s for _, s in client.calls][1:-1]
    # chunks alternately say execute 6 and 3 (n_action_steps is 4): the next request waits
    # that many ticks after the chunk's own request (more only if the loop ran late). The
    # first chunk starts on its arrival tick, a tick after its observation, so the call after
    # it may come one tick sooner.
    expected = [6 if i % 2 else 3 for i in range(1, len(shifts) + 1)]
    assert len(shifts) >= 4 and shifts[0] >= expected[0] - 1 and all(s >= e for s, e in zip(shifts[1:], expected[1:]))
    assert 3 in shifts[1::2] and 6 in shifts[0::2]


def test_moh_yaml_trains_through_the_cli(tmp_path, capsys, dataset_factory):
    from mixpolicy.cli import main

    dataset_factory(lengths=(9, 7, 10))
    code = main(
        ["train", f"dataset={tmp_path}/d.zarr", f"out_dir={tmp_path}/run", "steps=2", "batch_size=4", "progress=false", "policy=mode_moh",
         "policy.network.width=32", "policy.network.depth=1", "policy.network.heads=2", "policy.horizon=8", "policy.n_action_steps=4",
         "policy.head.horizons=[2,4,8]"]
    )  # fmt: skip
    assert code == 0
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for key in ("fused_loss", "horizon_loss_2", "horizon_loss_8", "gate_balance", "load_balance"):
        assert key in metrics[-1]
    loaded, _ = load_policy(tmp_path / "run" / "checkpoints" / "last")
    assert loaded.cfg.type == "mode_moh" and isinstance(loaded.head, MoHHead) and loaded.cfg.head.horizons == [2, 4, 8]
    assert from_dict(MoHConfig, {"horizons": [16]}).horizons == [16]
