"""init_from: weights (EMA or raw) into a policy of the same architecture, shape errors,
normalizer, task vocabulary extension, frozen encoder and routers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mixpolicy.cli import main
from mixpolicy.config import from_dict
from mixpolicy.errors import UserError
from mixpolicy.policies.checkpoint import load_policy
from mixpolicy.train.trainer import TrainConfig, Trainer
from factories import make_dataset, make_small_policy_dict

MODE = {**make_small_policy_dict(), "type": "mode", "network": dict(width=32, depth=1, heads=2, num_experts=2, top_k=1)}


def _cfg(tmp_path, out, dataset="a.zarr", **kw) -> TrainConfig:
    d = dict(dataset=str(tmp_path / dataset), out_dir=str(tmp_path / out), steps=3, batch_size=4, log_every=1, progress=False, warmup_steps=1, num_threads=1, policy=make_small_policy_dict())
    d.update(kw)
    return from_dict(TrainConfig, d)


@pytest.fixture
def pretrained(tmp_path):
    """A 3-step run on tasks (task-a, task-b); returns its last checkpoint."""
    make_dataset(tmp_path / "a.zarr", lengths=(8, 7, 9), tasks=("task-a", "task-b"))
    Trainer(_cfg(tmp_path, "pre")).run()
    return tmp_path / "pre" / "checkpoints" / "last"


def test_init_from_loads_the_ema_or_the_raw_weights(tmp_path, pretrained):
    ema, _ = load_policy(pretrained)
    t = Trainer(_cfg(tmp_path, "ft", init_from=str(pretrained)))
    for k, v in ema.state_dict().items():
        torch.testing.assert_close(t.policy.state_dict()[k], v, rtol=0, atol=0, msg=k)
    raw = {k[len("model.") :]: v for k, v in load_file(str(pretrained / "training_state.safetensors")).items() if k.startswith("model.")}
    t = Trainer(_cfg(tmp_path, "ft_raw", init_from=str(pretrained), init_from_weights="raw"))
    for k, v in raw.items():
        torch.testing.assert_close(t.policy.state_dict()[k], v, rtol=0, atol=0, msg=k)
    assert not torch.equal(raw["net.action_out.weight"], ema.state_dict()["net.action_out.weight"])
    # The new run starts its own EMA from the loaded weights, then trains.
    res = t.run()
    assert res["steps"] == 3 and np.isfinite(res["final_loss"])


def test_init_from_uses_the_checkpoints_policy_config_when_none_is_given(tmp_path, pretrained):
    t = Trainer(_cfg(tmp_path, "ft", init_from=str(pretrained.parent.parent), policy=None))  # a run folder works too
    assert t.cfg.policy.network.width == 32 and t.cfg.policy.horizon == 4


def test_mismatched_architecture_is_one_line_naming_the_shapes(tmp_path, pretrained, capsys, small_policy_dict):
    with pytest.raises(UserError, match=r"obs_encoder\.net\.2\.weight is \[32, 32\] in the checkpoint, \[64, 32\] here") as err:
        Trainer(_cfg(tmp_path, "ft", init_from=str(pretrained), policy={**small_policy_dict, "network": dict(width=64, depth=1, heads=2)}))
    assert "\n" not in str(err.value) and "more" in str(err.value)
    code = main(["train", f"dataset={tmp_path / 'a.zarr'}", f"out_dir={tmp_path / 'cli'}", f"init_from={pretrained}", "policy.network.width=48", "progress=false"])
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err_lines) == 1 and "the weights do not fit the configured policy" in err_lines[0]


def test_new_tasks_extend_the_vocabulary_and_old_rows_are_kept(tmp_path, pretrained, dataset_factory):
    dataset_factory("b.zarr", lengths=(8, 9), tasks=("task-c", "task-a"), seed=1)
    old, _ = load_policy(pretrained)
    t = Trainer(_cfg(tmp_path, "ft", dataset="b.zarr", init_from=str(pretrained)))
    assert t.policy.shape_meta.tasks == ["task-a", "task-b", "task-c"]
    rows = t.policy.task_embedding.weight.detach()
    assert rows.shape[0] == 3
    torch.testing.assert_close(rows[:2], old.task_embedding.weight.detach(), rtol=0, atol=0)
    # windows carry vocabulary indices: episode 0 is task-c (2), episode 1 task-a (0)
    assert sorted(set(t.windows.extras["task"].tolist())) == [0, 2]
    t.run()
    trained, meta = load_policy(tmp_path / "ft" / "checkpoints" / "last")
    assert meta["shape_meta"]["tasks"] == ["task-a", "task-b", "task-c"]
    assert trained.task_index("task-c") == 2 and trained.task_index("task-b") == 1


def test_normalizer_comes_from_the_new_data_unless_kept(tmp_path, pretrained, dataset_factory):
    dataset_factory("b.zarr", lengths=(8, 9), tasks=("task-a",), seed=1)
    old, _ = load_policy(pretrained)
    fresh = Trainer(_cfg(tmp_path, "fresh", dataset="b.zarr"))  # what the new data alone gives
    new = Trainer(_cfg(tmp_path, "ft", dataset="b.zarr", init_from=str(pretrained)))
    kept = Trainer(_cfg(tmp_path, "keep", dataset="b.zarr", init_from=str(pretrained), init_keep_normalizer=True))
    for key in ("state", "action"):
        torch.testing.assert_close(new.policy.normalizer.params[key].scale, fresh.policy.normalizer.params[key].scale)
        torch.testing.assert_close(kept.policy.normalizer.params[key].scale, old.normalizer.params[key].scale)
    assert not torch.equal(new.policy.normalizer.params["action"].scale, old.normalizer.params["action"].scale)


def test_freeze_encoder_and_routers(tmp_path, pretrained):
    t = Trainer(_cfg(tmp_path, "ft", init_from=str(pretrained), freeze_encoder=True))
    before = {k: v.clone() for k, v in t.policy.obs_encoder.state_dict().items()}
    net_before = t.policy.net.action_out.weight.detach().clone()
    t.run()
    ckpt = load_file(str(tmp_path / "ft" / "checkpoints" / "last" / "training_state.safetensors"))
    for k, v in before.items():
        torch.testing.assert_close(ckpt[f"model.obs_encoder.{k}"], v, rtol=0, atol=0)
    assert not torch.equal(ckpt["model.net.action_out.weight"], net_before)

    with pytest.raises(UserError, match="freeze_routers=true needs a policy with routers"):
        Trainer(_cfg(tmp_path, "dense", freeze_routers=True))
    t = Trainer(_cfg(tmp_path, "mode", policy=MODE, freeze_routers=True))
    routers = [p for layer in t.policy.net.moe_layers() for p in layer.router.parameters()]
    assert routers and not any(p.requires_grad for p in routers)
    assert t.policy.cfg.network.freeze_router and not t.cfg.policy.network.freeze_router  # the run's config keeps its options


def test_an_interrupted_fine_tuning_run_resumes_exactly(tmp_path, pretrained, dataset_factory):
    dataset_factory("b.zarr", lengths=(8, 9), tasks=("task-c", "task-a"), seed=1)
    kw = dict(dataset="b.zarr", init_from=str(pretrained), steps=4, freeze_encoder=True)
    Trainer(_cfg(tmp_path, "ft", **kw)).run(until=2)
    t = Trainer(_cfg(tmp_path, "ft", resume=True, **kw))  # the same command again, with resume=true
    assert t.step == 2 and t.policy.shape_meta.tasks == ["task-a", "task-b", "task-c"]
    t.run()
    Trainer(_cfg(tmp_path, "straight", **kw)).run()
    a = load_file(str(tmp_path / "ft" / "checkpoints" / "last" / "training_state.safetensors"))
    b = load_file(str(tmp_path / "straight" / "checkpoints" / "last" / "training_state.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_frozen_routers_resume_from_the_same_command(tmp_path, pretrained):
    Trainer(_cfg(tmp_path, "mode", policy=MODE, freeze_routers=True, steps=4)).run(until=2)
    t = Trainer(_cfg(tmp_path, "mode", policy=MODE, freeze_routers=True, steps=4, resume=True))
    assert t.step == 2 and not any(p.requires_grad for layer in t.policy.net.moe_layers() for p in layer.router.parameters())
