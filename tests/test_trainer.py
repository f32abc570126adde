import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mixpolicy.cli import main
from mixpolicy.config import from_dict
from mixpolicy.errors import UserError
from mixpolicy.policies.checkpoint import load_policy
from mixpolicy.train.setup import lr_lambda
from mixpolicy.train.trainer import TrainConfig, Trainer
from factories import make_small_policy_dict

def _cfg(tmp_path, **kw):
    d = dict(dataset=str(tmp_path / "d.zarr"), out_dir=str(tmp_path / "run"), steps=6, batch_size=8, log_every=2, progress=False, policy=make_small_policy_dict(), warmup_steps=2)
    d.update(kw)
    return from_dict(TrainConfig, d)


def test_training_run_writes_checkpoint_metrics_and_tensorboard(tmp_path, dataset_factory):
    dataset_factory(lengths=(6, 5, 7))
    res = Trainer(_cfg(tmp_path)).run()
    assert res["steps"] == 6
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [2, 4, 6]
    assert all(np.isfinite(l["loss"]) and l["lr"] > 0 for l in lines)
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "run" / "tb").iterdir())
    policy, meta = load_policy(tmp_path / "run" / "checkpoints" / "last")
    assert meta["info"]["step"] == 6
    assert policy.shape_meta.tasks == ["task-a", "task-b"]
    # successful_only (default) dropped the failed episode 1: normalizer spans episodes 0 and 2 only
    scale = policy.normalizer.params["action"].scale[0].item()
    offset = policy.normalizer.params["action"].offset[0].item()
    lo, hi = (-1 - offset) / scale, (1 - offset) / scale
    assert lo == pytest.approx(0.0) and hi == pytest.approx(206.0)
    # the saved policy weights are the EMA weights, not the raw ones
    state = load_file(str(tmp_path / "run" / "checkpoints" / "last" / "training_state.safetensors"))
    raw = state["model.net.action_out.weight"]
    assert not torch.equal(raw, policy.net.action_out.weight)


def test_refuses_non_empty_out_dir_and_resumes(tmp_path, dataset_factory):
    dataset_factory(lengths=(6, 5, 7))
    Trainer(_cfg(tmp_path, steps=4)).run()
    with pytest.raises(UserError, match="not empty"):
        Trainer(_cfg(tmp_path, steps=4))
    t = Trainer(_cfg(tmp_path, steps=8, resume=True, resume_overrides=["steps"]))
    assert t.step == 4
    t.run()
    assert load_policy(tmp_path / "run" / "checkpoints" / "last")[1]["info"]["step"] == 8
    with pytest.raises(UserError, match="nothing to resume"):
        Trainer(_cfg(tmp_path, out_dir=str(tmp_path / "other"), resume=True))


def test_resume_matches_uninterrupted_run(tmp_path, dataset_factory):
    dataset_factory(lengths=(6, 5, 7))
    Trainer(_cfg(tmp_path, out_dir=str(tmp_path / "a"), steps=8)).run()
    Trainer(_cfg(tmp_path, out_dir=str(tmp_path / "c"), steps=8)).run(until=4)  # interrupted at step 4
    Trainer(_cfg(tmp_path, out_dir=str(tmp_path / "c"), steps=8, resume=True)).run()
    a = load_file(str(tmp_path / "a/checkpoints/last/training_state.safetensors"))
    c = load_file(str(tmp_path / "c/checkpoints/last/training_state.safetensors"))
    for k in a:
        if k.startswith(("model.", "ema.")):
            torch.testing.assert_close(a[k], c[k], rtol=0, atol=1e-6, msg=k)


def test_lr_schedule_warmup_then_cosine():
    f = lr_lambda(warmup=10, total=110, min_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55)
    assert f(110) == pytest.approx(0.1)


def test_cli_train_on_tiny_dataset(tmp_path, capsys, dataset_factory):
    dataset_factory(lengths=(6, 5, 7))
    code = main(
        [
            "train",
            f"dataset={tmp_path}/d.zarr",
            f"out_dir={tmp_path}/run",
            "steps=3",
            "batch_size=4",
            "progress=false",
            "policy.network.width=32",
            "policy.network.depth=1",
            "policy.network.heads=2",
            "policy.horizon=4",
            "policy.n_action_steps=2",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and "trained 3 steps" in out


def test_training_on_images_keeps_them_out_of_the_normalizer(tmp_path, small_policy_dict):
    from mixpolicy.datasets.replay_buffer import DatasetMeta, KeySpec, ReplayBuffer

    meta = DatasetMeta(
        fps=10.0,
        obs_keys=["proprio", "image_corner"],
        action_key="action",
        task_descriptions={"task-a": "do a"},
        specs={"proprio": KeySpec((4,), "float32"), "image_corner": KeySpec((40, 40, 3), "uint8"), "action": KeySpec((3,), "float32")},
    )
    buf = ReplayBuffer.create(tmp_path / "img.zarr", meta)
    rng = np.random.default_rng(0)
    for n in (5, 6):
        buf.add_episode(
            {
                "proprio": rng.normal(size=(n, 4)).astype(np.float32),
                "image_corner": rng.integers(0, 256, (n, 40, 40, 3), dtype=np.uint8),
                "action": rng.uniform(-1, 1, (n, 3)).astype(np.float32),
            },
            task="task-a",
            success=True,
            seed=n,
        )
    policy = dict(small_policy_dict, obs_keys=["proprio", "image_corner"], image_encoder=dict(crop_size=36, num_keypoints=4))
    res = Trainer(_cfg(tmp_path, dataset=str(tmp_path / "img.zarr"), steps=2, batch_size=3, policy=policy)).run()
    loaded, meta = load_policy(res["checkpoint"])
    assert sorted(loaded.normalizer.params.keys()) == ["action", "proprio"]
    assert meta["shape_meta"]["task_descriptions"] == {"task-a": "do a"}
    assert loaded.image_keys == ["image_corner"]
