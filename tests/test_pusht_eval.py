"""PushT closed-loop evaluation (`mixpolicy eval env=pusht`): observations in Diffusion Policy's
layout, its score, a synthetic PushT store made in gym-pusht, trained and evaluated through the CLI.
Tests that need gym-pusht (the pusht extra: bash scripts/install_pusht.sh) skip without it."""

import json
import sys

import numpy as np
import pytest
import torch
import zarr

from mixpolicy.cli import main
from mixpolicy.datasets.normalizer import Normalizer
from mixpolicy.envs.pusht_env import INSTALL_HINT, PUSHT, SUCCESS_COVERAGE, PushTEnv
from mixpolicy.errors import UserError
from mixpolicy.policies.checkpoint import save_policy
from mixpolicy.policies.denoising_policy import DenoisingPolicy, ShapeMeta
from mixpolicy.utils import wilson_interval
from factories import tiny_policy_config

try:
    from gym_pusht.envs.pusht import PushTEnv as GymPushT
except ImportError:
    GymPushT = None
needs_pusht = pytest.mark.skipif(GymPushT is None, reason="gym-pusht is not installed (bash scripts/install_pusht.sh)")
SMALL = ["policy.network.width=32", "policy.network.depth=1", "policy.network.heads=2", "policy.obs_hidden=32"]
GOAL = np.array([256.0, 256.0])


def _state_checkpoint(tmp_path):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    norm = Normalizer.from_data({"state": rng.uniform(0, 512, (20, 5)), "action": rng.uniform(0, 512, (20, 2))})
    policy = DenoisingPolicy(tiny_policy_config(), ShapeMeta(obs={"state": [5]}, action_dim=2, tasks=["unknown"], fps=10.0), norm)
    return save_policy(policy, tmp_path / "ckpt")


def test_pusht_score_and_success_follow_diffusion_policy():
    """Score: max coverage / 0.95 clipped, averaged; success: max coverage >= 0.9."""
    eps = [{"max_coverage": c} for c in (0.97, 0.5, 0.9, 0.0)]
    assert [PUSHT.episode_success(False, {"coverage": e["max_coverage"]}) for e in eps] == [True, False, True, False]
    summary = PUSHT.summarize(eps)
    assert summary["mean_max_coverage"] == pytest.approx((0.97 + 0.5 + 0.9) / 4)
    assert summary["mean_score"] == pytest.approx((1.0 + 0.5 / 0.95 + 0.9 / 0.95) / 4)
    assert SUCCESS_COVERAGE == 0.9 and PUSHT.max_episode_steps == 300


def test_bad_env_and_task_are_one_line_errors(tmp_path, capsys):
    _state_checkpoint(tmp_path)
    assert main(["eval", f"checkpoint={tmp_path}/ckpt", "env=mujoco"]) == 2
    assert capsys.readouterr().err.strip() == "mixpolicy: error: config field 'env': unknown env 'mujoco'; choose from metaworld, pusht"
    assert main(["eval", f"checkpoint={tmp_path}/ckpt", "env=pusht", "tasks=[push-v3]"]) == 2
    assert capsys.readouterr().err.strip() == "mixpolicy: error: PushT has one task, 'pusht'; got 'push-v3'"
    with pytest.raises(UserError, match="cannot produce observation key 'keypoint'"):
        PushTEnv({"state": [5], "keypoint": [18]})
    with pytest.raises(UserError, match="'agent_pos' has shape \\[2\\]"):
        PushTEnv({"agent_pos": [3]})


def test_without_gym_pusht_eval_fails_with_one_line_naming_the_extra(tmp_path, capsys, monkeypatch):
    _state_checkpoint(tmp_path)
    for name in ("gym_pusht", "gym_pusht.envs", "gym_pusht.envs.pusht"):
        monkeypatch.setitem(sys.modules, name, None)
    assert main(["eval", f"checkpoint={tmp_path}/ckpt", "env=pusht", "episodes_per_task=1", "device=cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"mixpolicy: error: {INSTALL_HINT}")


@needs_pusht
def test_observations_have_the_dataset_layout():
    env = PushTEnv({"state": [5], "agent_pos": [2], "img": [96, 96, 3], "image_top": [96, 96, 3]}, frame_size=120, max_episode_steps=3)
    obs, _ = env.reset(seed=4)
    reference = GymPushT(obs_type="state")  # gym-pusht's own state observation, same seed
    ref_state, _ = reference.reset(seed=4)
    np.testing.assert_allclose(obs["state"], ref_state, rtol=1e-6)
    assert obs["state"].dtype == np.float32 and obs["agent_pos"].tolist() == obs["state"][:2].tolist()
    assert obs["img"].dtype == np.float32 and obs["img"].shape == (96, 96, 3) and obs["img"].max() <= 255.0
    np.testing.assert_array_equal(obs["img"], obs["image_top"].astype(np.float32))  # float 0..255, as the zarr's img
    assert obs["image_top"].dtype == np.uint8 and env.render().shape == (120, 120, 3)
    action = ref_state[:2] + 15
    obs, reward, done, truncated, info = env.step(action)
    ref_state, ref_reward, *_ = reference.step(action)
    np.testing.assert_allclose(obs["state"], ref_state, rtol=1e-5)
    assert reward == pytest.approx(ref_reward) and 0.0 <= info["metrics"]["coverage"] <= 1.0
    env.step(action)
    assert env.step(action)[3]  # truncated after max_episode_steps
    # the block placed on the goal: coverage above 0.95 ends the episode
    on_goal = [100, 100, 256 - 31.8198, 256 - 13.1802, np.pi / 4]  # gym-pusht sets the pose before the centre of gravity
    env.reset(seed=0, options={"reset_to_state": on_goal})
    _, reward, done, _, info = env.step(np.array([100.0, 100.0]))
    assert done and reward == 1.0 and info["metrics"]["coverage"] > 0.95 and info["success"]
    with pytest.raises(ValueError, match="shape"):
        env.step(np.zeros(3))


def _scripted_episode(env, seed, steps, rng):
    """Go behind the block (seen from the goal), then push it towards the goal; a little noise."""
    raw, _ = env.reset(seed=seed)
    frames, states, keypoints, actions = [], [], [], []
    for _ in range(steps):
        state = np.array([*env.agent.position, *env.block.position, env.block.angle % (2 * np.pi)])
        agent, block = state[:2], state[2:4]
        away = (block - GOAL) / (np.linalg.norm(block - GOAL) + 1e-6)
        behind = block + 70 * away
        target = behind if np.linalg.norm(agent - behind) > 25 else block - 40 * away
        step = target - agent
        action = agent + step * min(1.0, 40 / (np.linalg.norm(step) + 1e-6)) + rng.normal(0, 2, 2)
        frames.append(raw["pixels"].astype(np.float32))
        states.append(state)
        keypoints.append(np.vstack([env.get_keypoints(env._block_shapes), block[None]]))  # 9 x 2, as the zarr's keypoint
        actions.append(np.clip(action, 0, 512))
        raw, *_ = env.step(actions[-1])
    return {"img": frames, "state": states, "keypoint": keypoints, "action": actions}


def write_pusht_store(path, episodes=4, steps=24):
    """A store in the layout of pusht_cchi_v7_replay.zarr (zarr v2, data/{img,state,keypoint,action}, meta/episode_ends)."""
    env = GymPushT(obs_type="pixels_agent_pos")
    rng = np.random.default_rng(0)
    data = {k: [] for k in ("img", "state", "keypoint", "action")}
    for e in range(episodes):
        for k, v in _scripted_episode(env, e, steps, rng).items():
            data[k] += v
    root = zarr.open_group(str(path), mode="w", zarr_format=2)
    for key, values in data.items():
        arr = np.asarray(values, np.float32)
        root.create_array(f"data/{key}", shape=arr.shape, chunks=(steps, *arr.shape[1:]), dtype="float32")[:] = arr
    root.create_array("meta/episode_ends", shape=(episodes,), chunks=(episodes,), dtype="int64")[:] = np.arange(1, episodes + 1) * steps
    return path


@needs_pusht
def test_synthetic_pusht_store_trains_and_evaluates_through_the_cli(tmp_path, capsys):
    store = write_pusht_store(tmp_path / "pusht_replay.zarr")
    assert main(["data", "info", str(store)]) == 0
    assert "img" in capsys.readouterr().out
    run = tmp_path / "run"
    train = ["train", f"dataset={store}", f"out_dir={run}", "steps=4", "batch_size=16", "warmup_steps=1", "progress=false",
             "tracking.tensorboard=false", "device=cpu", "policy.horizon=8", "policy.n_action_steps=4", *SMALL]  # fmt: skip
    assert main(train) == 0
    capsys.readouterr()
    ev = ["eval", f"checkpoint={run}/checkpoints/last", "env=pusht", "episodes_per_task=3", "num_envs=2", "max_episode_steps=20",
          "device=cpu", "progress=false"]  # fmt: skip
    assert main(ev) == 0
    out = capsys.readouterr().out
    assert "max coverage" in out and "score" in out and "pusht" in out
    results = json.loads((run / "eval" / "step_00000004" / "results.json").read_text())
    assert results["env"] == "pusht" and list(results["tasks"]) == ["pusht"] and results["max_episode_steps"] == 20
    r = results["tasks"]["pusht"]
    assert r["seeds"] == [100000, 100001, 100002]
    covers = [e["max_coverage"] for e in r["per_episode"]]
    assert all(0.0 <= c <= 1.0 for c in covers) and all(e["length"] <= 20 for e in r["per_episode"])
    assert r["mean_max_coverage"] == pytest.approx(np.mean(covers)) == results["mean_max_coverage"]
    assert r["mean_score"] == pytest.approx(np.mean(np.clip(np.array(covers) / 0.95, 0, 1)))
    assert r["successes"] == sum(c >= 0.9 for c in covers) == sum(e["success"] for e in r["per_episode"])
    assert r["wilson95"] == list(wilson_interval(r["successes"], 3))
    # the same seeds give the same episodes
    assert main([*ev, f"out={tmp_path}/again"]) == 0
    again = json.loads((tmp_path / "again" / "results.json").read_text())
    assert again["tasks"]["pusht"]["per_episode"] == r["per_episode"]


@needs_pusht
def test_pusht_rollout_recording(tmp_path):
    pytest.importorskip("rerun", reason="rerun-sdk is not installed (pip install -e '.[viewer]')")
    from test_viewer import read_recording

    _state_checkpoint(tmp_path)
    ev = ["eval", f"checkpoint={tmp_path}/ckpt", "env=pusht", "episodes_per_task=2", "num_envs=2", "max_episode_steps=6",
          "device=cpu", "progress=false", "rerun=true", "rerun_episodes=1", "video_size=96"]  # fmt: skip
    assert main(ev) == 0
    files = list((tmp_path / "ckpt" / "eval" / "rerun").iterdir())
    assert [f.name for f in files] == ["pusht_seed100000.rrd"]
    rec = read_recording(files[0])
    assert rec["/camera/render"]["step"] == list(range(7))  # before and after each of 6 steps
    assert rec["/metrics/coverage"]["step"] == list(range(6))
    assert all(0.0 <= v[0] <= 1.0 for v in rec["/metrics/coverage"]["Scalars:scalars"])
    assert len(rec["/action"]["Scalars:scalars"][0]) == 2 and rec["/outcome/success"]["step"] == [6]
    assert "max coverage" in rec["/events"]["TextLog:text"][-1][0]
