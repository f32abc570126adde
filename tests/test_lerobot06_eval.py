"""Optional tier: LeRobot 0.6's own evaluation (``lerobot-eval``) runs a mixpolicy plugin policy.

A tiny PushT-shaped dataset (96x96 camera, 2-d agent position and action) trains a few steps
under ``lerobot-train``; the real ``lerobot-eval`` binary then rolls the checkpoint out in
LeRobot's ``pusht`` env (gym-pusht, LeRobot's batched sync vector env) and writes its
``eval_info.json``. LeRobot's rollout loop, run in-process on the same checkpoint, shows the
actions the policy sends. Needs lerobot 0.6 and gym-pusht (scripts/install_lerobot06.sh);
skipped with a reason where either is missing. LeRobot 0.6's other simulators need packages
that are not on the package index here (LIBERO, RoboCasa, ...) or render 480x480 frames for
500-step episodes (its Meta-World env), too slow for a test.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

lerobot = pytest.importorskip("lerobot", reason="lerobot is not installed (optional: bash scripts/install_lerobot06.sh)")
if not lerobot.__version__.startswith("0.6."):
    pytest.skip(f"lerobot {lerobot.__version__} is installed; this tier needs 0.6 (bash scripts/install_lerobot06.sh)", allow_module_level=True)
pytest.importorskip("gym_pusht", reason="gym-pusht is not installed (optional: bash scripts/install_lerobot06.sh)")

from test_lerobot06 import REPO, lerobot_train, offline_env  # noqa: E402

from lerobot.datasets.lerobot_dataset import LeRobotDataset  # noqa: E402

pytestmark = pytest.mark.slow
EPISODE_STEPS = 12
# Demo actions span this box (PushT's 512x512 workspace); min-max normalization keeps the
# policy's actions inside it.
ACTION_LOW, ACTION_HIGH = np.array([210.0, 285.0]), np.array([300.0, 300.0])


def write_pusht_dataset(root):
    features = {
        "observation.state": {"dtype": "float32", "shape": (2,), "names": None},
        "action": {"dtype": "float32", "shape": (2,), "names": None},
        "observation.image": {"dtype": "image", "shape": (96, 96, 3), "names": ["height", "width", "channels"]},
    }
    ds = LeRobotDataset.create(REPO, fps=10, features=features, root=root, use_videos=False, robot_type="sim")
    for e in range(4):
        for t in range(10):
            ds.add_frame({
                "observation.state": np.array([200 + 10 * t, 300 - 5 * e], np.float32),
                "action": np.array([210 + 10 * t, 300 - 5 * e], np.float32),
                "observation.image": np.full((96, 96, 3), 20 * t + 5 * e, np.uint8),
                "task": "Push the T-shaped block onto the T-shaped target.",
            })  # fmt: skip
        ds.save_episode()
    ds.finalize()
    return root


@pytest.fixture(scope="module")
def pusht_checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lerobot_eval")
    root = write_pusht_dataset(tmp / "lr")
    return tmp, lerobot_train(
        tmp, root, tmp / "run", "--policy.horizon=8", "--policy.n_action_steps=4", "--policy.num_inference_steps=3"
    )


def test_lerobot_eval_binary_rolls_out_the_plugin_policy_in_pusht(pusht_checkpoint):
    tmp, pretrained = pusht_checkpoint
    out = tmp / "eval"
    args = [
        str(Path(sys.executable).parent / "lerobot-eval"), f"--policy.path={pretrained}", "--policy.device=cpu",
        "--env.type=pusht", f"--env.episode_length={EPISODE_STEPS}", "--eval.n_episodes=2", "--eval.batch_size=2",
        "--eval.use_async_envs=false", "--seed=0", f"--output_dir={out}",
    ]  # fmt: skip
    proc = subprocess.run(args, env=offline_env(tmp), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads((out / "eval_info.json").read_text())
    overall = info["overall"]
    assert overall["n_episodes"] == 2 and 0.0 <= overall["pc_success"] <= 100.0
    (task,) = info["per_task"]
    assert task["task_group"] == "pusht" and len(task["metrics"]["sum_rewards"]) == 2
    rewards = np.array(task["metrics"]["sum_rewards"] + task["metrics"]["max_rewards"])
    assert np.isfinite(rewards).all() and (rewards >= 0).all()
    assert np.isclose(overall["avg_sum_reward"], np.mean(task["metrics"]["sum_rewards"]))
    videos = [Path(p) for p in overall["video_paths"]]
    assert len(videos) == 2 and all(v.is_file() and v.stat().st_size > 0 for v in videos)


def test_lerobot_rollout_loop_sends_the_policy_actions_to_a_batch_of_envs(pusht_checkpoint):
    from lerobot.configs import PreTrainedConfig
    from lerobot.envs.configs import PushtEnv
    from lerobot.envs.factory import make_env, make_env_pre_post_processors
    from lerobot.envs.utils import close_envs
    from lerobot.policies.factory import make_policy, make_pre_post_processors
    from lerobot.scripts.lerobot_eval import rollout
    from lerobot.utils.import_utils import register_third_party_plugins

    _, pretrained = pusht_checkpoint
    register_third_party_plugins()
    env_cfg = PushtEnv(episode_length=EPISODE_STEPS)
    cfg = PreTrainedConfig.from_pretrained(pretrained)
    cfg.pretrained_path = pretrained
    policy = make_policy(cfg, env_cfg=env_cfg)
    policy.eval()
    pre, post = make_pre_post_processors(cfg, pretrained_path=str(pretrained), preprocessor_overrides={"device_processor": {"device": "cpu"}})
    env_pre, env_post = make_env_pre_post_processors(env_cfg=env_cfg, policy_cfg=cfg)
    envs = make_env(env_cfg, n_envs=3, use_async_envs=False)
    try:
        (vec_env,) = [e for group in envs.values() for e in group.values()]
        torch.manual_seed(0)
        out = rollout(vec_env, policy, env_pre, env_post, pre, post, seeds=[0, 1, 2], return_observations=True)
    finally:
        close_envs(envs)
    actions = out["action"].numpy()
    assert actions.shape == (3, EPISODE_STEPS, 2)  # PushT never succeeds this early: every step runs
    assert np.isfinite(actions).all()
    assert (actions >= ACTION_LOW - 1e-3).all() and (actions <= ACTION_HIGH + 1e-3).all(), actions.min((0, 1))
    # One plan per n_action_steps=4 steps, one trajectory per env: the chunks differ across envs.
    assert not np.allclose(actions[0], actions[1])
    state = out["observation"]["observation.state"]
    assert state.shape == (3, EPISODE_STEPS + 1, 2) and not torch.equal(state[:, 0], state[:, -1])  # the agent moved
