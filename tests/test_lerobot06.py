"""Optional tier: LeRobot 0.6 (scripts/install_lerobot06.sh, a Python 3.12 venv).

Datasets written by the real ``LeRobotDataset`` 0.6 (video and image mode) import with
``mixpolicy data convert``; the mixpolicy LeRobot plugin trains under ``lerobot-train`` and
its ``pretrained_model/`` loads back through LeRobot's factories (as lerobot-eval and
lerobot-rollout load a policy) and through mixpolicy's own loader, ``mixpolicy eval`` and
``mixpolicy deploy``. Skipped with a reason where lerobot 0.6 is not importable.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

lerobot = pytest.importorskip("lerobot", reason="lerobot is not installed (optional: bash scripts/install_lerobot06.sh)")
if not lerobot.__version__.startswith("0.6."):
    pytest.skip(f"lerobot {lerobot.__version__} is installed; this tier needs 0.6 (bash scripts/install_lerobot06.sh)", allow_module_level=True)

from lerobot.datasets.lerobot_dataset import LeRobotDataset, LeRobotDatasetMetadata  # noqa: E402

from mixpolicy.datasets.replay_buffer import ReplayBuffer  # noqa: E402
from mixpolicy.policies.checkpoint import load_policy, read_checkpoint_meta  # noqa: E402
from test_cli import run_main  # noqa: E402

REPO = "local/test"
CAM = "observation.images.cam"


def offline_env(tmp_path) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_LEROBOT_HOME": str(tmp_path / "hf_lerobot"), "WANDB_MODE": "disabled"}


def write_dataset(root, use_videos: bool, camera: bool = True, state_dim: int = 4, tasks=("task 0", "task 1"), lengths=(8, 9, 10)):
    features = {
        "observation.state": {"dtype": "float32", "shape": (state_dim,), "names": None},
        "action": {"dtype": "float32", "shape": (2 if camera else 4,), "names": None},
    }
    if camera:
        features[CAM] = {"dtype": "video" if use_videos else "image", "shape": (48, 48, 3), "names": ["height", "width", "channels"]}
    ds = LeRobotDataset.create(REPO, fps=10, features=features, root=root, use_videos=use_videos, robot_type="sim")
    for e, n in enumerate(lengths):
        for t in range(n):
            frame = {
                "observation.state": np.full(state_dim, 100 * e + t, np.float32),
                "action": np.full(features["action"]["shape"], 0.1 * t - 0.2 * e, np.float32),
                "task": tasks[e % len(tasks)],
            }
            if camera:
                frame[CAM] = np.full((48, 48, 3), 40 * e + 15 * t, np.uint8)
            ds.add_frame(frame)
        ds.save_episode()
    ds.finalize()
    return root


@pytest.mark.parametrize("use_videos", [True, False], ids=["video", "image"])
def test_convert_a_dataset_written_by_lerobot_06(tmp_path, capsys, monkeypatch, use_videos):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    write_dataset(tmp_path / "lr", use_videos)
    code, out, err = run_main(capsys, "data", "convert", f"src={tmp_path / 'lr'}", f"out={tmp_path / 'x.zarr'}", "progress=false")
    assert code == 0, err
    assert "wrote 3 episodes (27 steps)" in out
    buf = ReplayBuffer.open(tmp_path / "x.zarr")
    assert buf.episode_lengths.tolist() == [8, 9, 10]
    assert buf.episode_tasks == ["task 0", "task 1", "task 0"]
    ep = buf.get_episode(2)
    np.testing.assert_array_equal(ep["state"][:, 0], 200 + np.arange(10))
    np.testing.assert_allclose(ep["action"][:, 1], 0.1 * np.arange(10) - 0.4, atol=1e-6)
    want = 80 + 15 * np.arange(10)
    got = ep["image_cam"][:, 24, 24].astype(int)
    assert ep["image_cam"].shape == (10, 48, 48, 3) and ep["image_cam"].dtype == np.uint8
    if use_videos:  # AV1 in yuv420p is lossy: flat frames come back within a few levels
        assert np.abs(got - want[:, None]).max() <= 6, got[:, 0]
    else:
        np.testing.assert_array_equal(got, np.repeat(want[:, None], 3, 1))


def lerobot_train(tmp_path, root, out, *policy_args):
    train = Path(sys.executable).parent / "lerobot-train"
    args = [
        str(train), "--policy.type=mixpolicy", f"--dataset.repo_id={REPO}", f"--dataset.root={root}",
        "--dataset.video_backend=pyav", "--policy.device=cpu", "--policy.push_to_hub=false", "--policy.width=32",
        "--policy.depth=1", "--policy.heads=2", "--batch_size=4", "--steps=3", "--save_freq=3", "--log_freq=1",
        "--num_workers=0", "--wandb.enable=false", f"--output_dir={out}", *policy_args,
    ]  # fmt: skip
    proc = subprocess.run(args, env=offline_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step:3 " in proc.stdout + proc.stderr
    return out / "checkpoints" / "last" / "pretrained_model"


def lerobot_load(pretrained, root):
    """The policy and processors as LeRobot's eval and rollout scripts build them."""
    from lerobot.configs import PreTrainedConfig
    from lerobot.policies.factory import make_policy, make_pre_post_processors
    from lerobot.utils.import_utils import register_third_party_plugins

    register_third_party_plugins()
    cfg = PreTrainedConfig.from_pretrained(pretrained)
    cfg.pretrained_path = pretrained
    policy = make_policy(cfg, ds_meta=LeRobotDatasetMetadata(REPO, root=root))
    pre, post = make_pre_post_processors(cfg, pretrained_path=str(pretrained), preprocessor_overrides={"device_processor": {"device": "cpu"}})
    return policy, pre, post


def test_lerobot_train_dense_ddpm_on_a_video_dataset_and_load_back(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root = write_dataset(tmp_path / "lr", use_videos=True)
    pretrained = lerobot_train(tmp_path, root, tmp_path / "run", "--policy.horizon=8", "--policy.n_action_steps=4")
    files = sorted(p.name for p in pretrained.iterdir())
    assert {"config.json", "model.safetensors", "policy_preprocessor.json", "policy_postprocessor.json"} <= set(files)
    assert json.loads((pretrained / "config.json").read_text())["type"] == "mixpolicy"

    policy, pre, post = lerobot_load(pretrained, root)
    assert type(policy).__name__ == "MixpolicyPolicy" and not policy.training
    item = LeRobotDataset(REPO, root=root, video_backend="pyav")[9]  # episode 1, frame 1
    obs = {k: item[k] for k in ("observation.state", CAM, "task")}
    policy.reset()
    actions = [post(policy.select_action(pre(dict(obs)))) for _ in range(5)]
    assert all(a.shape == (1, 2) and torch.isfinite(a).all() for a in actions)

    # mixpolicy's loader reads the same folder; same observation history and noise, same chunk.
    mp, meta = load_policy(pretrained)
    assert meta["info"]["layout"] == "lerobot" and mp.cfg.obs_keys == ["state", "image_cam"] and mp.cfg.horizon == 8
    policy.reset()
    torch.manual_seed(3)
    chunk = policy.predict_action_chunk(pre(dict(obs)))
    image = (item[CAM] * 255).round().to(torch.uint8).permute(1, 2, 0)
    history = {"state": item["observation.state"].expand(1, 2, 4), "image_cam": image.expand(1, 2, 48, 48, 3)}
    torch.manual_seed(3)
    torch.testing.assert_close(mp.predict_action_chunk(history), chunk)


def test_lerobot_train_mode_moh_flow_with_tasks_then_mixpolicy_eval_and_deploy(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # Meta-World's layout (39-d state, 4-d action, task names), so mixpolicy's simulator can run it.
    root = write_dataset(tmp_path / "lr", use_videos=False, camera=False, state_dim=39, tasks=("reach-v3", "push-v3"))
    pretrained = lerobot_train(
        tmp_path, root, tmp_path / "run", "--policy.network=mode", "--policy.head=moh", "--policy.objective=flow",
        "--policy.horizon=8", "--policy.horizons=[4,8]", "--policy.n_action_steps=4", "--policy.num_inference_steps=4",
        "--policy.task_conditioning=embedding",
    )  # fmt: skip
    meta = read_checkpoint_meta(pretrained)
    assert meta["policy_type"] == "mode_moh" and meta["policy"]["objective"]["type"] == "flow"
    assert meta["shape_meta"]["tasks"] == ["reach-v3", "push-v3"]

    policy, pre, post = lerobot_load(pretrained, root)
    item = LeRobotDataset(REPO, root=root)[3]
    action = post(policy.select_action(pre({"observation.state": item["observation.state"], "task": item["task"]})))
    assert action.shape == (1, 4)

    code, out, err = run_main(
        capsys, "eval", f"checkpoint={pretrained}", "tasks=[reach-v3]", "episodes_per_task=1", "num_envs=1",
        "max_episode_steps=12", "progress=false", f"out={tmp_path / 'eval'}",
    )  # fmt: skip
    assert code == 0, err
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert "reach-v3" in json.dumps(results)
    log = tmp_path / "deploy" / "log.jsonl"
    code, out, err = run_main(
        capsys, "deploy", f"checkpoint={pretrained}", "robot.tasks=[reach-v3]", "robot.episodes_per_task=1",
        "loop.max_episode_ticks=10", "inference.backend=thread", f"log={log}", "progress=false",
    )  # fmt: skip
    assert code == 0, err
    episodes = [json.loads(line) for line in log.read_text().splitlines() if '"episode"' in line]
    assert [e["ticks"] for e in episodes if e.get("type") == "episode"] == [10]
