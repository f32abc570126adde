"""Cameras end to end: several Meta-World cameras per step (collect and eval), the train-side
checks for camera datasets, and the quickstart's camera preset."""

import json

import numpy as np
import pytest

from mixpolicy.cli import compose, main
from mixpolicy.commands import validate
from mixpolicy.config import from_dict
from mixpolicy.policies.checkpoint import read_checkpoint_meta, save_policy
from mixpolicy.policies.config import PolicyConfig
from mixpolicy.policies.denoising_policy import DenoisingPolicy, ShapeMeta
from test_train_data import make_image_store
from test_train_data_cli import SMALL_ARGS, one_line_error

from factories import make_dataset


def test_quickstart_camera_preset_composes_a_camera_run():
    d = compose("quickstart", ["preset=camera"])
    stages = {s: validate(s, d[s], prefix=f"{s}.") for s in ("collect", "train", "eval")}
    assert stages["collect"].cameras == ["front", "side"] and stages["collect"].image_size == 64 and stages["collect"].tasks == ["reach-v3", "push-v3", "drawer-open-v3"]
    policy = stages["train"].policy
    assert policy.obs_keys == ["proprio", "image_front", "image_side"]  # no 39-float state: the goal is seen, not given
    assert policy.image_encoder.trunk == "light" and policy.image_encoder.crop_size == "auto"
    assert policy.objective.prediction_type == "sample"  # the quickstart's policy otherwise
    assert stages["train"].dataset == "runs/quickstart_camera/data.zarr"
    plain = compose("quickstart", [])
    assert plain["collect"]["cameras"] == [] and plain["train"]["policy"]["obs_keys"] == ["state"]


def test_train_refuses_camera_datasets_that_lack_a_key(tmp_path, capsys):
    store = make_image_store(tmp_path / "d.zarr")
    base = ["train", f"dataset={store}", f"out_dir={tmp_path / 'run'}", "steps=1", *SMALL_ARGS, "policy.image_encoder.num_keypoints=4"]
    one_line_error(capsys, [*base, "policy.obs_keys=[state,image_cam]"], r"lacks required key\(s\) \['state'\]")
    one_line_error(capsys, [*base, "policy.obs_keys=[proprio,image_corner]"], r"lacks required key\(s\) \['image_corner'\]")
    make_dataset(tmp_path / "state.zarr")
    one_line_error(capsys, [*base[:1], f"dataset={tmp_path / 'state.zarr'}", *base[2:], "policy.obs_keys=[state,image_cam]"], r"lacks required key\(s\) \['image_cam'\]")


def test_train_prints_the_encoder_and_saves_the_resolved_crop(tmp_path, capsys):
    store = make_image_store(tmp_path / "d.zarr")
    args = ["train", f"dataset={store}", f"out_dir={tmp_path / 'run'}", "steps=1", *SMALL_ARGS,
            "policy.obs_keys=[proprio,image_cam]", "policy.image_encoder.trunk=light", "policy.image_encoder.num_keypoints=4"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("image encoder"))
    assert "image encoder light, 1 camera(s), crop 36:" in line and "MFLOPs per sample (2 frame(s) per camera)" in line
    meta = read_checkpoint_meta(tmp_path / "run" / "checkpoints" / "last")
    assert meta["policy"]["image_encoder"]["crop_size"] == 36 and meta["shape_meta"]["obs"]["image_cam"] == [40, 40, 3]
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert saved["policy"]["image_encoder"]["crop_size"] == "auto"  # the run's config keeps what was asked


@pytest.mark.slow
def test_two_camera_metaworld_collect_and_eval(tmp_path, capsys):
    from mixpolicy.envs.collect import CollectConfig, collect
    from mixpolicy.datasets.replay_buffer import ReplayBuffer

    collect(CollectConfig(tasks=["reach-v3"], episodes_per_task=1, out=str(tmp_path / "d.zarr"), cameras=["corner", "gripperPOV"],
                          image_size=40, max_episode_steps=6, keep_successful_only=False, progress=False))  # fmt: skip
    ep = ReplayBuffer.open(tmp_path / "d.zarr").get_episode(0)
    assert ep["image_corner"].shape == ep["image_gripperPOV"].shape == (6, 40, 40, 3)
    assert not np.array_equal(ep["image_corner"], ep["image_gripperPOV"])
    cfg = from_dict(PolicyConfig, dict(
        obs_keys=["proprio", "image_corner", "image_gripperPOV"], horizon=4, n_action_steps=2, obs_hidden=32,
        network=dict(width=32, depth=1, heads=2), image_encoder=dict(trunk="light", num_keypoints=4),
    ))  # fmt: skip
    shape_meta = ShapeMeta(obs={"proprio": [4], "image_corner": [40, 40, 3], "image_gripperPOV": [40, 40, 3]}, action_dim=4, tasks=["reach-v3"], fps=80.0)
    ckpt = save_policy(DenoisingPolicy(cfg, shape_meta), tmp_path / "ckpt")
    args = ["eval", f"checkpoint={ckpt}", "episodes_per_task=2", "num_envs=2", "max_episode_steps=8", "device=cpu", "progress=false", f"out={tmp_path / 'eval'}"]
    assert main(args) == 0
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["tasks"]["reach-v3"]["episodes"] == 2
    capsys.readouterr()
    one_line_error(capsys, [*args, "cameras=[corner]"], r"cameras=\['corner'\] differ from the checkpoint's cameras \['corner', 'gripperPOV'\]")
    one_line_error(capsys, [*args, "image_size=84"], r"image_size=84 differs from the checkpoint's 40x40 frames of image_corner, 40x40 frames of image_gripperPOV")


def test_metaworld_camera_sets_that_cannot_render_are_one_error():
    from mixpolicy.envs.metaworld_env import METAWORLD, MetaWorldEnv
    from mixpolicy.errors import UserError

    with pytest.raises(UserError, match=r"cameras \['corner', 'corner'\] name a camera twice"):
        MetaWorldEnv("reach-v3", cameras=["corner", "corner"])
    shapes = {"proprio": [4], "image_corner": [40, 40, 3], "image_gripperPOV": [32, 32, 3]}
    with pytest.raises(UserError, match=r"one square size; the checkpoint's cameras are \[\(32, 32\), \(40, 40\)\]"):
        METAWORLD.make("reach-v3", shapes, 0, 10)
    with pytest.raises(UserError, match=r"one square size; the checkpoint's cameras are \[\(96, 128\)\]"):
        METAWORLD.make("reach-v3", {"image_corner": [96, 128, 3]}, 0, 10)


def test_resize_batch_covers_then_centre_crops():
    import torch

    from mixpolicy.datasets.augment import BatchImageAugment, resize_batch

    x = torch.zeros(1, 1, 3, 4, 8)
    x[..., 4:] = 1.0
    out = resize_batch(x, (2, 2))  # 4x8 -> cover 2x4 -> centre 2x2: one dark, one bright column
    assert out.shape == (1, 1, 3, 2, 2)
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([[0.0, 1.0], [0.0, 1.0]]), atol=0.15, rtol=0)  # antialiasing blurs the edge a little
    frames = torch.randint(0, 256, (2, 3, 40, 40, 3), dtype=torch.uint8)
    resized = BatchImageAugment(resize=(24, 32)).eval().frames(frames)
    assert resized.shape == (2, 3, 24, 32, 3) and resized.dtype == torch.uint8
    assert BatchImageAugment(resize=(24, 32)).active and not BatchImageAugment().active


@pytest.mark.slow
def test_train_resizes_camera_batches_to_data_image_size(tmp_path):
    from mixpolicy.train.config import TrainConfig
    from mixpolicy.train.trainer import Trainer
    from factories import make_small_policy_dict

    store = make_image_store(tmp_path / "d.zarr", lengths=(6, 5, 7, 6))
    policy = dict(make_small_policy_dict(), obs_keys=["proprio", "image_cam"], image_encoder=dict(trunk="light", num_keypoints=4))
    cfg = from_dict(TrainConfig, dict(dataset=str(store), out_dir=str(tmp_path / "run"), steps=2, batch_size=4, progress=False, policy=policy,
                                      warmup_steps=1, data=dict(image_size=[24, 32]), val_ratio=0.3, val_every=2))  # fmt: skip
    trainer = Trainer(cfg)
    seen = []
    trainer.policy.image_encoder.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0]["image_cam"].shape[-3:])))
    res = trainer.run()
    trainer.close()
    assert seen and set(seen) == {(24, 32, 3)}  # training and validation batches alike
    meta = read_checkpoint_meta(res["checkpoint"])
    assert meta["shape_meta"]["obs"]["image_cam"] == [24, 32, 3]
    assert meta["policy"]["image_encoder"]["crop_size"] == 22  # auto: 0.9 x the resized smaller side
    with pytest.raises(Exception, match="'data.image_size': must be \\[height, width\\]"):
        from_dict(TrainConfig, dict(dataset=str(store), policy=policy, data=dict(image_size=[24])))


@pytest.mark.slow
def test_framed_cameras_show_the_push_goal_larger_than_the_model_corner_camera():
    """``front`` / ``side`` are free cameras framed on the workspace: at 64x64 the push goal
    (the only pure-green pixels in the scene) covers more pixels than in ``corner`` at 84x84."""
    from mixpolicy.envs.metaworld_env import MetaWorldEnv

    def green_pixels(frame):
        f = frame.astype(int)
        return int(((f[..., 1] > 150) & (f[..., 0] < 100) & (f[..., 2] < 100)).sum())

    counts = {}
    for cams, size in ((["corner"], 84), (["front", "side"], 64)):
        env = MetaWorldEnv("push-v3", cameras=cams, image_size=size)
        obs, _ = env.reset(seed=300000)
        again, _ = env.reset(seed=300000)
        for c in cams:
            assert obs[f"image_{c}"].shape == (size, size, 3)
            np.testing.assert_array_equal(obs[f"image_{c}"], again[f"image_{c}"])  # deterministic per seed
            counts[c] = green_pixels(obs[f"image_{c}"])
        step, *_ = env.step(np.array([1.0, 0.0, 0.0, 0.0], np.float32))
        assert not np.array_equal(step[f"image_{cams[0]}"], obs[f"image_{cams[0]}"])  # the hand moved
        env.close()
    assert counts["corner"] >= 1
    assert counts["front"] >= 3 * counts["corner"] and counts["side"] >= 2 * counts["corner"], counts
