"""Camera encoders sized for the job: the light trunk, frozen and pretrained trunks, the auto
crop recorded in checkpoints, the counted cost, and camera inputs refused with one line."""

import numpy as np
import pytest
import torch

from mixpolicy.config import ConfigError, from_dict
from mixpolicy.errors import UserError
from mixpolicy.policies.checkpoint import load_policy, read_checkpoint_meta, save_policy
from mixpolicy.policies.config import PolicyConfig
from mixpolicy.policies.denoising_policy import DenoisingPolicy, ShapeMeta
from mixpolicy.policies.encoders import ImageEncoder, encoder_cost, trunk_output_size
from mixpolicy.policies.image_config import ImageEncoderConfig, auto_crop

LIGHT = ImageEncoderConfig(trunk="light", num_keypoints=8, film=False, crop_size=0)


def camera_policy(size=(96, 128), cameras=("front",), **encoder) -> DenoisingPolicy:
    cfg = from_dict(PolicyConfig, dict(
        obs_keys=["proprio", *[f"image_{c}" for c in cameras]], horizon=4, n_action_steps=2, obs_hidden=32,
        network=dict(width=32, depth=1, heads=2), image_encoder=dict(num_keypoints=4, **encoder),
    ))  # fmt: skip
    obs = {"proprio": [4], **{f"image_{c}": [*size, 3] for c in cameras}}
    return DenoisingPolicy(cfg, ShapeMeta(obs=obs, action_dim=4, tasks=["reach-v3"], fps=10.0))


def test_light_trunk_size_shape_and_counted_flops():
    enc = ImageEncoder(LIGHT, ["front"], width=16, goal_dim=0).eval()
    trunk_params = sum(p.numel() for p in enc.trunks[0].parameters())
    assert 100_000 <= trunk_params <= 300_000
    # (3->32 5x5) + (32->64, 64->128, 128->128 3x3), no biases; GroupNorm affine pairs
    assert trunk_params == 3 * 32 * 25 + 32 * 64 * 9 + 64 * 128 * 9 + 128 * 128 * 9 + 2 * (32 + 64 + 128 + 128)
    out = enc({"front": torch.randint(0, 256, (2, 3, 40, 40, 3), dtype=torch.uint8)}, None)
    assert out.shape == (2, 3, 1, 16)
    assert trunk_output_size(40, LIGHT) == 5 and trunk_output_size(40) == 2  # three halvings vs ResNet's five
    # FlopCounterMode counts 2 x multiply-adds of the convolutions and matrix products: check it against the formula
    sides = [20, 10, 5, 5]
    chans = [3, 32, 64, 128, 128]
    conv = sum(2 * chans[i] * chans[i + 1] * (25 if i == 0 else 9) * sides[i] ** 2 for i in range(4))
    keypoints = 2 * 128 * 8 * 5 * 5
    proj = 2 * 16 * 16
    cost = encoder_cost(enc, {"front": [40, 40, 3]})
    assert cost["mflops_per_sample"] == pytest.approx((conv + keypoints + proj) / 1e6)
    assert cost["params"] == sum(p.numel() for p in enc.parameters()) == cost["trainable"]
    assert encoder_cost(enc, {"front": [40, 40, 3]}, frames=2)["mflops_per_sample"] == pytest.approx(2 * cost["mflops_per_sample"])
    resnet = ImageEncoder(ImageEncoderConfig(num_keypoints=8, film=False, crop_size=0), ["front"], width=16, goal_dim=0)
    assert encoder_cost(resnet, {"front": [40, 40, 3]})["mflops_per_sample"] > 10 * cost["mflops_per_sample"]


def test_shared_and_per_camera_light_trunks():
    per_camera = ImageEncoder(LIGHT, ["a", "b"], width=16, goal_dim=0)
    shared = ImageEncoder(ImageEncoderConfig(trunk="light", num_keypoints=8, film=False, crop_size=0, share_trunk=True), ["a", "b"], width=16, goal_dim=0)
    assert len(per_camera.trunks) == 2 and len(shared.trunks) == 1
    assert sum(p.numel() for p in per_camera.trunks.parameters()) == 2 * sum(p.numel() for p in shared.trunks.parameters())


def test_pretrained_light_trunk_and_freeze(tmp_path):
    from safetensors.torch import save_file

    source = camera_policy(size=(40, 40), trunk="light", film=False)
    state = {k: v for k, v in source.state_dict().items() if ".layers." in k}  # as saved inside a policy
    save_file(state, str(tmp_path / "light.safetensors"))
    torch.save({k.split("layers.", 1)[1]: v for k, v in state.items()}, tmp_path / "light.pth")  # the trunk's own names
    for path in ("light.safetensors", "light.pth"):
        enc = ImageEncoder(ImageEncoderConfig(trunk="light", pretrained=str(tmp_path / path), freeze=True), ["front"], width=16, goal_dim=8)
        torch.testing.assert_close(enc.trunks[0].layers[1][0].weight, source.image_encoder.trunks[0].layers[1][0].weight)
    assert not any(p.requires_grad for p in enc.trunks[0].layers.parameters())
    assert all(p.requires_grad for p in enc.trunks[0].film.parameters())  # FiLM, keypoints and projection still learn
    assert all(p.requires_grad for p in enc.pools.parameters()) and encoder_cost(enc, {"front": [40, 40, 3]}, 8)["trainable"] < encoder_cost(enc, {"front": [40, 40, 3]}, 8)["params"]
    with pytest.raises(ConfigError, match="'image_encoder.freeze': a frozen trunk needs pretrained weights"):
        ImageEncoderConfig(freeze=True)
    with pytest.raises(UserError, match=r"is not a light trunk \[16, 32\] state dict"):
        ImageEncoder(ImageEncoderConfig(trunk="light", light_channels=[16, 32], pretrained=str(tmp_path / "light.pth")), ["front"], width=16, goal_dim=0)
    torch.save({"weights": [torch.zeros(1)]}, tmp_path / "nested.pth")
    with pytest.raises(UserError, match="is not a light trunk"):
        ImageEncoder(ImageEncoderConfig(trunk="light", pretrained=str(tmp_path / "nested.pth")), ["front"], width=16, goal_dim=0)


def test_auto_crop_follows_the_image_size_and_is_saved(tmp_path):
    assert auto_crop([(96, 128)]) == 86 and auto_crop([(84, 84)]) == 76 and auto_crop([(96, 128), (64, 64)]) == 58
    policy = camera_policy(size=(96, 128), trunk="light")
    assert policy.cfg.image_encoder.crop_size == 86
    save_policy(policy, tmp_path / "ckpt")
    meta = read_checkpoint_meta(tmp_path / "ckpt")
    assert meta["policy"]["image_encoder"]["crop_size"] == 86 and meta["shape_meta"]["obs"]["image_front"] == [96, 128, 3]
    assert meta["shape_meta"]["fps"] == 10.0
    loaded, _ = load_policy(tmp_path / "ckpt")
    assert loaded.cfg.image_encoder.crop_size == 86
    policy.eval()
    x = torch.randint(0, 256, (1, 2, 96, 128, 3), dtype=torch.uint8)
    feats = []
    policy.image_encoder.trunks[0].register_forward_hook(lambda m, i, o: feats.append(i[0].shape))
    policy.image_encoder({"image_front": x}, torch.zeros(1, 32))
    assert feats[0][-2:] == (86, 86)  # a centre square crop of the smaller side's 0.9
    assert camera_policy(size=(96, 128), crop_size="64").cfg.image_encoder.crop_size == 64  # a number from the command line
    assert camera_policy(size=(96, 128), crop_size=0).cfg.image_encoder.crop_size == 0
    with pytest.raises(ConfigError, match="'image_encoder.crop_size': must be auto or a whole number of pixels, got 'big'"):
        camera_policy(crop_size="big")
    with pytest.raises(ConfigError, match="'image_encoder.trunk': must be one of \\('resnet18', 'light'\\)"):
        from_dict(PolicyConfig, {"image_encoder": {"trunk": "vit"}}, prefix="policy.")


def test_deployed_policy_refuses_other_camera_inputs():
    from mixpolicy.deploy.local import LocalPolicy

    local = LocalPolicy(camera_policy(size=(40, 40), cameras=("front", "wrist"), trunk="light"))
    good = {"proprio": np.zeros((2, 4), np.float32), "image_front": np.zeros((2, 40, 40, 3), np.uint8), "image_wrist": np.zeros((2, 40, 40, 3), np.uint8)}
    assert set(local.check_obs(good)) == set(good)
    cases = {
        "has shape \\(2, 48, 64, 3\\), the policy needs \\(2, 40, 40, 3\\)": {"image_front": np.zeros((2, 48, 64, 3), np.uint8)},
        "has dtype <f4, the policy takes \\|u1": {"image_front": np.zeros((2, 40, 40, 3), np.float32)},
        "image_wrist'\\] has shape \\(2, 40, 40, 4\\)": {"image_wrist": np.zeros((2, 40, 40, 4), np.uint8)},
    }
    for pattern, change in cases.items():
        with pytest.raises(UserError, match=pattern):
            local.check_obs({**good, **change})
    with pytest.raises(UserError, match="observation lacks key 'image_wrist'"):
        local.check_obs({k: v for k, v in good.items() if k != "image_wrist"})
