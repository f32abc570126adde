import json

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from mixpolicy.config import ConfigError, from_dict
from mixpolicy.datasets.normalizer import Normalizer
from mixpolicy.errors import UserError
from mixpolicy.policies.checkpoint import load_policy, save_policy
from mixpolicy.policies.config import DDPMConfig, TransformerConfig, policy_config_from_dict
from mixpolicy.policies.denoising_policy import DenoisingPolicy, example_observation
from mixpolicy.policies.objectives import DDPMObjective
from mixpolicy.policies.solvers import first_order_update, sample
from factories import tiny_policy_config, tiny_shape_meta


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_ddim_step_matches_diffusers(prediction_type):
    cfg = DDPMConfig(num_train_timesteps=100, num_inference_steps=10, prediction_type=prediction_type)
    obj = DDPMObjective(cfg)
    ref = DDIMScheduler(
        num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", prediction_type=prediction_type, clip_sample=True
    )
    ref.set_timesteps(10)
    schedule = obj.schedule(10)
    assert schedule.tolist() == ref.timesteps.tolist()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 3, generator=g)
    for i, t in enumerate(schedule):
        out = torch.randn(2, 4, 3, generator=g)
        mine = first_order_update(obj, out, x, schedule, i)
        theirs = ref.step(out, int(t), x).prev_sample
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
        x = theirs


def test_truncated_schedule_uses_true_levels():
    obj = DDPMObjective(DDPMConfig(num_train_timesteps=100, num_inference_steps=10))
    full = obj.schedule(10)
    seen = []

    def denoise(x, level, step=None):
        seen.append(level[0].item())
        return torch.zeros_like(x)

    sample(obj, denoise, torch.zeros(1, 2, 2), full, start=7)
    assert seen == [float(t) for t in full[7:]]


def test_shapes_and_receding_horizon_queue(tiny_policy, obs_factory):
    policy = tiny_policy
    chunk = policy.predict_action_chunk(obs_factory())
    assert chunk.shape == (3, 4, 3) and torch.isfinite(chunk).all()
    calls = []
    orig = policy.plan  # select_action plans through the one inference path
    policy.plan = lambda *a, **k: calls.append(1) or orig(*a, **k)
    actions = [policy.select_action(obs_factory()) for _ in range(5)]
    assert all(a.shape == (3, 3) for a in actions)
    assert len(calls) == 3  # n_action_steps=2: re-plan on steps 0, 2 and 4
    policy.reset()
    policy.select_action(obs_factory())
    assert len(calls) == 4


def test_example_observation_matches_the_policy_input_layout(tiny_policy):
    policy = tiny_policy
    obs = example_observation(policy, batch=5)
    assert set(obs) == {"state", "task"}
    assert obs["state"].shape == (5, 2, 6) and obs["task"].tolist() == [0] * 5
    assert policy.predict_action_chunk(obs).shape == (5, 4, 3)


def test_obs_shape_errors_are_clear(tiny_policy):
    policy = tiny_policy
    with pytest.raises(ValueError, match="n_obs_steps=2"):
        policy.predict_action_chunk({"state": torch.zeros(1, 3, 6), "task": torch.zeros(1, dtype=torch.long)})
    with pytest.raises(ValueError, match="task"):
        policy.predict_action_chunk({"state": torch.zeros(1, 2, 6)})
    with pytest.raises(UserError, match="not one this policy was trained on"):
        policy.task_index("door-open-v3")
    with pytest.raises(UserError, match="not in the dataset"):
        DenoisingPolicy(tiny_policy_config(obs_keys=["image"]), tiny_shape_meta())


def test_tiny_policy_overfits_tiny_dataset():
    """Loss on a fixed small dataset falls at least 5x within 300 steps."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    n = 16
    state = torch.randn(n, 2, 6, generator=g)
    # actions are a deterministic function of the observation
    actions = torch.tanh(state[:, -1:, :3].repeat(1, 4, 1) * torch.linspace(0.5, 1.5, 4)[None, :, None])
    batch = {"state": state, "action": actions, "task": torch.zeros(n, dtype=torch.long)}
    norm = Normalizer.from_data({"state": state.reshape(-1, 6).numpy(), "action": actions.reshape(-1, 3).numpy()})
    policy = DenoisingPolicy(tiny_policy_config(), tiny_shape_meta(), norm)
    opt = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    lg = torch.Generator().manual_seed(2)

    def eval_loss():
        with torch.no_grad():
            return float(np.mean([policy.compute_loss(batch, torch.Generator().manual_seed(s))[0] for s in range(8)]))

    before = eval_loss()
    for _ in range(300):
        loss, _ = policy.compute_loss(batch, lg)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    assert after < before / 5, (before, after)
    # and sampling reproduces the training actions closely
    policy.eval()
    pred = policy.predict_action_chunk({k: v for k, v in batch.items() if k != "action"}, torch.Generator().manual_seed(0))
    err = (pred - actions).abs().mean().item()
    assert err < 0.15, err


def test_checkpoint_round_trip_gives_identical_actions(tmp_path, obs_factory):
    torch.manual_seed(0)
    norm = Normalizer.from_data({"state": np.random.default_rng(0).normal(size=(50, 6)), "action": np.random.default_rng(1).uniform(-2, 2, size=(50, 3))})
    policy = DenoisingPolicy(tiny_policy_config(), tiny_shape_meta(), norm).eval()
    save_policy(policy, tmp_path / "ckpt", info={"step": 3})
    loaded, meta = load_policy(tmp_path / "ckpt")
    assert meta["info"]["step"] == 3 and meta["policy_type"] == "dit"
    a = policy.predict_action_chunk(obs_factory(), torch.Generator().manual_seed(5))
    b = loaded.predict_action_chunk(obs_factory(), torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    # the normalizer travelled with the weights
    torch.testing.assert_close(loaded.normalizer.params["action"].scale, norm.params["action"].scale)
    # saving again over an existing checkpoint replaces it atomically
    save_policy(loaded, tmp_path / "ckpt", info={"step": 4})
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["info"]["step"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_checkpoint_errors(tmp_path, tiny_policy):
    policy = tiny_policy
    save_policy(policy, tmp_path / "ckpt")
    with pytest.raises(UserError, match="holds a 'dit' policy, expected 'mode'"):
        load_policy(tmp_path / "ckpt", expected_type="mode")
    with pytest.raises(UserError, match="checkpoint not found"):
        load_policy(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a mixpolicy checkpoint"):
        load_policy(tmp_path / "empty")
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    cfg["policy"]["network"]["width"] = 64
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="do not fit its config"):
        load_policy(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_policy(tmp_path / "ckpt")


@pytest.mark.parametrize(
    "data, field",
    [
        ({"n_action_steps": 20, "horizon": 16}, "policy.n_action_steps"),
        ({"objective": {"name": "magic"}}, "objective.name"),
        ({"network": {"width": 30, "heads": 4}}, "network.width"),
        ({"network": {"action_attention": "sideways"}}, "network.action_attention"),
        ({"type": "nonexistent"}, "policy.type"),
        ({"horizon": "long"}, "policy.horizon"),
        ({"objective": {"num_inference_steps": 500}}, "objective.num_inference_steps"),
    ],
)
def test_inconsistent_configs_fail_naming_the_field(data, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        policy_config_from_dict(data)


def test_unknown_config_key_is_rejected():
    with pytest.raises(ConfigError, match="unknown config key 'policy.network.widht'"):
        policy_config_from_dict({"network": {"widht": 3}})
    with pytest.raises(ConfigError, match="unknown config key 'foo'"):
        from_dict(TransformerConfig, {"foo": 1})


def test_causal_action_attention_does_not_look_ahead(obs_factory):
    torch.manual_seed(0)
    policy = DenoisingPolicy(tiny_policy_config(network=TransformerConfig(width=32, depth=2, heads=2, action_attention="causal")), tiny_shape_meta()).eval()
    cond = policy.encode_obs(obs_factory(1))
    x = torch.randn(1, 4, 3)
    level = torch.tensor([5.0])
    y1 = policy.net(x, level, cond)
    x2 = x.clone()
    x2[:, 3] += 1.0  # change only the last action
    y2 = policy.net(x2, level, cond)
    torch.testing.assert_close(y1[:, :3], y2[:, :3])
    assert not torch.allclose(y1[:, 3], y2[:, 3])
