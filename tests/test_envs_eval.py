import json

import numpy as np
import pytest
import torch

from mixpolicy.datasets.normalizer import Normalizer
from mixpolicy.envs.metaworld_env import MetaWorldEnv, scripted_expert
from mixpolicy.errors import UserError
from mixpolicy.policies.checkpoint import save_policy
from mixpolicy.policies.denoising_policy import DenoisingPolicy
from mixpolicy.envs.collect import CollectConfig, collect
from mixpolicy.envs.evaluate import EvalConfig, evaluate, evaluate_policy, format_table, wilson_interval
from mixpolicy.datasets.replay_buffer import ReplayBuffer
from factories import metaworld_shape_meta, tiny_policy_config


@pytest.mark.slow
def test_env_seeding_and_observation():
    env = MetaWorldEnv("reach-v3", max_episode_steps=3)
    o1, _ = env.reset(seed=11)
    o2, _ = env.reset(seed=11)
    o3, _ = env.reset(seed=12)
    np.testing.assert_array_equal(o1["state"], o2["state"])
    assert not np.allclose(o1["state"][-3:], o3["state"][-3:])  # the goal moved
    assert np.any(o1["state"][-3:] != 0)  # and is observable
    assert o1["state"].shape == (39,) and o1["state"].dtype == np.float32
    np.testing.assert_array_equal(o1["proprio"], o1["state"][:4])
    for i in range(3):
        _, _, success, truncated, info = env.step(np.zeros(4, np.float32))
    assert truncated and not success and info["task"] == "reach-v3"
    with pytest.raises(ValueError, match="NaN"):
        env.step(np.array([np.nan, 0, 0, 0]))
    with pytest.raises(ValueError, match="shape"):
        env.step(np.zeros(3))


def test_unknown_task_and_camera():
    with pytest.raises(UserError, match="unknown Meta-World task 'rech-v3' \\(did you mean 'reach-v3'\\?\\)"):
        MetaWorldEnv("rech-v3")
    with pytest.raises(UserError, match="unknown camera"):
        MetaWorldEnv("reach-v3", cameras=["nope"])


@pytest.mark.slow
@pytest.mark.parametrize("camera", ["corner", "corner2", "corner3"])
def test_camera_image_is_rendered_upright(camera):
    """Raising the hand must move the (red) robot up in the image."""
    env = MetaWorldEnv("reach-v3", cameras=[camera], image_size=64)
    obs, _ = env.reset(seed=0)
    img = obs[f"image_{camera}"]
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8 and img.std() > 0

    def red_rows(im):
        im = im.astype(int)
        red = (im[..., 0] > 120) & (im[..., 1] < 80) & (im[..., 2] < 80)
        return np.nonzero(red)[0].mean()

    before = red_rows(img)
    for _ in range(15):
        obs, *_ = env.step(np.array([0, 0, 1, 0], np.float32))
    after = red_rows(obs[f"image_{camera}"])
    env.close()
    assert after < before - 0.5, (before, after)


@pytest.mark.slow
def test_collect_writes_seeded_successful_demos(tmp_path):
    cfg = CollectConfig(tasks=["reach-v3"], episodes_per_task=2, out=str(tmp_path / "d.zarr"), progress=False, post_success_steps=2)
    res = collect(cfg)
    buf = ReplayBuffer.open(tmp_path / "d.zarr")
    assert res["episodes"] == 2 and buf.n_episodes == 2
    assert buf.episode_tasks == ["reach-v3", "reach-v3"]
    assert buf.episode_seeds.tolist() == [0, 1] and buf.episode_success.all()
    assert buf.meta.discrete_action_dims == [3] and buf.meta.fps == 80.0
    assert buf.meta.task_descriptions["reach-v3"] == "reach the goal position"
    assert set(buf.keys) == {"state", "proprio", "action"}
    # replaying the recorded actions from the recorded seed reproduces the states
    ep = buf.get_episode(0)
    env = MetaWorldEnv("reach-v3")
    obs, _ = env.reset(seed=0)
    np.testing.assert_allclose(obs["state"], ep["state"][0], atol=1e-6)
    obs, *_ = env.step(ep["action"][0])
    np.testing.assert_allclose(obs["state"], ep["state"][1], atol=1e-5)
    # refusing to overwrite leaves the dataset intact
    with pytest.raises(UserError, match="already exists"):
        collect(cfg)
    assert ReplayBuffer.open(tmp_path / "d.zarr").n_episodes == 2


@pytest.mark.slow
def test_wilson_interval():
    lo, hi = wilson_interval(45, 50)
    assert lo == pytest.approx(0.7864, abs=1e-3) and hi == pytest.approx(0.9565, abs=1e-3)
    lo, hi = wilson_interval(50, 50)
    assert hi == 1.0 and lo == pytest.approx(0.9287, abs=1e-3)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def _tiny_metaworld_policy(tmp_path):
    torch.manual_seed(0)
    shapes = metaworld_shape_meta()
    norm = Normalizer.from_data({"state": np.random.default_rng(0).normal(size=(20, 39)), "action": np.random.default_rng(0).uniform(-1, 1, (20, 4))})
    policy = DenoisingPolicy(tiny_policy_config(), shapes, norm)
    save_policy(policy, tmp_path / "ckpt")
    return policy


@pytest.mark.slow
def test_closed_loop_episode_through_eval_path(tmp_path):
    _tiny_metaworld_policy(tmp_path)
    res = evaluate(
        EvalConfig(checkpoint=str(tmp_path / "ckpt"), episodes_per_task=3, num_envs=2, max_episode_steps=9, progress=False, device="cpu")
    )
    r = res["tasks"]["reach-v3"]
    assert r["episodes"] == 3 and r["seeds"] == [100000, 100001, 100002]
    assert [e["length"] for e in r["per_episode"]] == [9, 9, 9]
    # 9 steps with 2 actions per chunk: 5 policy calls per episode
    assert [e["policy_calls"] for e in r["per_episode"]] == [5, 5, 5]
    saved = json.loads((tmp_path / "ckpt" / "eval" / "results.json").read_text())
    assert saved["tasks"]["reach-v3"]["seeds"] == r["seeds"]
    assert "reach-v3" in format_table(res)


@pytest.mark.slow
def test_eval_is_deterministic_and_rejects_unknown_tasks(tmp_path):
    policy = _tiny_metaworld_policy(tmp_path)
    kw = dict(episodes_per_task=2, num_envs=2, max_episode_steps=4, progress=False)
    a = evaluate_policy(policy, ["reach-v3"], **kw)
    b = evaluate_policy(policy, ["reach-v3"], **kw)
    assert a["tasks"] == b["tasks"]
    with pytest.raises(UserError, match="not one this policy was trained on"):
        evaluate_policy(policy, ["push-v3"], **kw)


@pytest.mark.slow
def test_expert_solves_reach():
    env = MetaWorldEnv("reach-v3")
    expert = scripted_expert("reach-v3")
    obs, _ = env.reset(seed=3)
    for _ in range(200):
        obs, _, success, truncated, _ = env.step(expert(obs["state"]))
        if success:
            break
    assert success
