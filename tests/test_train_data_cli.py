"""The data options from the command line, and bad input refused with one line and exit 2:
camera frames of the wrong kind, a missing key, contradictory options, eval cameras or sizes
that differ from the checkpoint's."""

from __future__ import annotations

import json
import re

import gymnasium as gym
import numpy as np
import pytest

from mixpolicy.cli import main
from mixpolicy.config import from_dict
from mixpolicy.envs.evaluate import _check_rendered
from mixpolicy.errors import UserError
from mixpolicy.policies.checkpoint import load_policy, read_checkpoint_meta, save_policy
from mixpolicy.policies.config import PolicyConfig
from mixpolicy.policies.denoising_policy import DenoisingPolicy, ShapeMeta
from test_train_data import make_image_store

from factories import SMALL_POLICY_OVERRIDES, make_dataset

SMALL_ARGS = [
    *SMALL_POLICY_OVERRIDES,
    "progress=false",
    "num_threads=1",
    "warmup_steps=1",
    "batch_size=4",
]
IMAGE_ARGS = ["policy.obs_keys=[proprio,image_cam]", "policy.image_encoder.crop_size=36", "policy.image_encoder.num_keypoints=4"]


def one_line_error(capsys, args, pattern):
    code = main(args)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert re.search(pattern, lines[0]), lines[0]


def test_every_data_option_is_reachable_from_the_command_line(tmp_path, capsys):
    store = make_image_store(tmp_path / "d.zarr", lengths=(6, 5, 7, 6, 6, 8))
    run = tmp_path / "run"
    args = [
        "train",
        f"dataset={store}",
        f"out_dir={run}",
        "steps=2",
        "data.storage=disk",
        "data.memory_budget_gb=0.001",
        "normalizer.mode=mean_std",
        "+normalizer.modes={action: identity}",
        "augment.shift_pad=2",
        "augment.brightness=0.2",
        "val_ratio=0.3",
        "val_every=1",
        "val_windows=8",
        "loader.num_workers=1",
        *SMALL_ARGS,
        *IMAGE_ARGS,
    ]
    assert main(args) == 0
    capsys.readouterr()
    saved = json.loads((run / "train_config.json").read_text())
    assert saved["data"] == {"storage": "disk", "memory_budget_gb": 0.001, "image_size": []}
    assert saved["normalizer"]["modes"] == {"action": "identity"} and saved["augment"]["shift_pad"] == 2
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "val"] == [1, 2]
    policy, meta = load_policy(run / "checkpoints" / "last")
    assert np.all(policy.normalizer.params["action"].scale.numpy() == 1)
    assert meta["shape_meta"]["fps"] == 15.0 and meta["shape_meta"]["obs"]["image_cam"] == [40, 40, 3]


def test_camera_frames_of_the_wrong_kind_and_missing_keys_are_one_line(tmp_path, capsys):
    base = ["train", f"out_dir={tmp_path / 'run'}", "steps=1", *SMALL_ARGS, *IMAGE_ARGS]
    make_image_store(tmp_path / "float.zarr", dtype="float32")
    one_line_error(capsys, [*base, f"dataset={tmp_path / 'float.zarr'}"], r"dataset key 'image_cam' holds float32 images; camera keys must be uint8")
    make_image_store(tmp_path / "rgba.zarr", channels=4)
    one_line_error(capsys, [*base, f"dataset={tmp_path / 'rgba.zarr'}"], r"dataset key 'image_cam' has frames of shape \(40, 40, 4\); camera keys must be \(H, W, 3\)")
    make_dataset(tmp_path / "state.zarr")  # state and action only
    one_line_error(
        capsys,
        ["train", f"dataset={tmp_path / 'state.zarr'}", f"out_dir={tmp_path / 'run'}", "policy.obs_keys=[proprio]", *SMALL_ARGS],
        r"lacks required key\(s\) \['proprio'\]",
    )


def test_contradictory_data_options_are_one_line(tmp_path, capsys):
    make_image_store(tmp_path / "d.zarr")
    base = ["train", f"dataset={tmp_path / 'd.zarr'}", f"out_dir={tmp_path / 'run'}", "steps=1", *SMALL_ARGS]
    one_line_error(capsys, [*base, *IMAGE_ARGS, "augment.crop_size=32"], r"'augment.crop_size': 32 contradicts policy.image_encoder.crop_size=36")
    one_line_error(capsys, [*base, "policy.obs_keys=[proprio]", "augment.hue=0.1"], r"'augment': is set but policy.obs_keys has no image_<camera> key")
    one_line_error(capsys, [*base, "policy.obs_keys=[proprio]", "+normalizer.modes.image_cam=mean_std"], r"normalizer.modes names key\(s\) \['image_cam'\] that are not normalized")
    one_line_error(capsys, [*base, "policy.obs_keys=[proprio]", "data.storage=ram"], r"'data.storage': must be one of")
    make_image_store(tmp_path / "two.zarr", lengths=(6, 5))  # one episode per task: none to hold out
    one_line_error(
        capsys, [*base, f"dataset={tmp_path / 'two.zarr'}", "policy.obs_keys=[proprio]", "val_ratio=0.1", "val_every=1"], r"val_ratio=0.1 leaves no validation episode"
    )


def _camera_checkpoint(tmp_path):
    cfg = from_dict(
        PolicyConfig,
        dict(obs_keys=["proprio", "image_corner"], horizon=4, n_action_steps=2, obs_hidden=32, network=dict(width=32, depth=1, heads=2), image_encoder=dict(crop_size=36, num_keypoints=4)),
    )
    policy = DenoisingPolicy(cfg, ShapeMeta(obs={"proprio": [4], "image_corner": [40, 40, 3]}, action_dim=4, tasks=["reach-v3"], fps=80.0))
    return policy, save_policy(policy, tmp_path / "ckpt")


def test_eval_refuses_cameras_or_image_sizes_other_than_the_checkpoints(tmp_path, capsys):
    policy, ckpt = _camera_checkpoint(tmp_path)
    assert read_checkpoint_meta(ckpt)["shape_meta"]["fps"] == 80.0
    base = ["eval", f"checkpoint={ckpt}", "episodes_per_task=1", "progress=false", "device=cpu"]
    one_line_error(capsys, [*base, "image_size=84"], r"image_size=84 differs from the checkpoint's 40x40 frames of image_corner")
    one_line_error(capsys, [*base, "cameras=[gripperPOV]"], r"cameras=\['gripperPOV'\] differ from the checkpoint's cameras \['corner'\]")

    # what the environment renders must be what the checkpoint was trained on
    class Env:
        def __init__(self, spaces):
            self.observation_space = gym.spaces.Dict(spaces)

    frames = lambda n: gym.spaces.Box(0, 255, (n, n, 3), np.uint8)  # noqa: E731
    _check_rendered(policy, Env({"image_corner": frames(40)}))
    with pytest.raises(UserError, match="the checkpoint's image_corner frames are 40x40x3; the environment renders 84x84x3"):
        _check_rendered(policy, Env({"image_corner": frames(84)}))
    with pytest.raises(UserError, match=r"the checkpoint needs camera 'image_corner'; the environment renders \['image_topview'\]"):
        _check_rendered(policy, Env({"image_topview": frames(40)}))


def test_train_yaml_lists_every_data_option():
    import dataclasses

    from mixpolicy.cli import compose
    from mixpolicy.train.config import TrainConfig

    train = compose("train", ["dataset=x"])
    groups = {f.name: f.default_factory for f in dataclasses.fields(TrainConfig) if f.name in ("data", "normalizer", "augment")}
    for name, cls in groups.items():
        assert set(train[name]) == {f.name for f in dataclasses.fields(cls)}, name
    assert from_dict(TrainConfig, train).data.storage == "auto"
