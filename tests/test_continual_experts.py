"""add_experts: new experts for new tasks on a trained MoDE policy; the old tasks stay bit-identical."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from mixpolicy.config import ConfigError, from_dict
from mixpolicy.errors import UserError
from mixpolicy.policies.checkpoint import WEIGHTS_FILE, load_policy
from mixpolicy.train.trainer import TrainConfig, Trainer
from factories import make_dataset, make_small_policy_dict
from test_cli import assert_one_line_error, run_main


def _policy_dict(router_input: str) -> dict:
    d = make_small_policy_dict()
    d["network"] = dict(type="mode", width=32, depth=2, heads=2, num_experts=3, top_k=2, router_input=router_input)
    return d


def _cfg(tmp_path, out, dataset, **kw) -> TrainConfig:
    d = dict(dataset=str(tmp_path / dataset), out_dir=str(tmp_path / out), steps=4, batch_size=8, log_every=1, progress=False,
             warmup_steps=1, num_threads=1, lr=1e-2)  # fmt: skip
    d.update(kw)
    return from_dict(TrainConfig, d)


def _old_task_actions(policy, cache: bool) -> torch.Tensor:
    policy.cfg.network.expert_cache = cache
    g = torch.Generator().manual_seed(3)
    obs = {"state": torch.randn(4, 2, 6, generator=g), "task": torch.tensor([0, 1, 1, 0])}
    return torch.cat([policy.plan({k: v[i : i + 1] for k, v in obs.items()}, torch.Generator().manual_seed(i)).actions for i in range(4)])


@pytest.mark.slow
@pytest.mark.parametrize("router_input", ["task", "noise"])
def test_added_experts_train_while_old_tasks_stay_bit_identical(tmp_path, router_input):
    make_dataset(tmp_path / "a.zarr", lengths=(8, 7, 9), tasks=("task-a", "task-b"))
    make_dataset(tmp_path / "b.zarr", lengths=(8, 9, 7), tasks=("task-c", "task-d"), seed=1)
    Trainer(_cfg(tmp_path, "pre", "a.zarr", policy=_policy_dict(router_input))).run()
    pretrained = tmp_path / "pre" / "checkpoints" / "last"
    old, _ = load_policy(pretrained)
    before = {c: _old_task_actions(old, c) for c in (True, False)}

    t = Trainer(_cfg(tmp_path, "add", "b.zarr", init_from=str(pretrained), add_experts=2))
    net = t.policy.cfg.network
    assert (net.num_experts, net.added_experts, net.task_experts) == (5, [2], [3, 3, 5, 5])
    assert t.policy.shape_meta.tasks == ["task-a", "task-b", "task-c", "task-d"]
    trainable = {n for n, p in t.policy.named_parameters() if p.requires_grad}
    assert trainable == {"task_embedding.weight"} | {n for n in trainable if ".mlp.stages.0." in n} and len(trainable) == 1 + 2 * 5  # 2 blocks: w1, w3, w2, router weight and bias
    stage_init = {n: p.detach().clone() for n, p in t.policy.named_parameters() if ".stages." in n}
    rows_init = t.policy.task_embedding.weight.detach().clone()
    t.run()

    after_dir = tmp_path / "add" / "checkpoints" / "last"
    old_state, new_state = load_file(str(pretrained / WEIGHTS_FILE)), load_file(str(after_dir / WEIGHTS_FILE))
    for key, value in old_state.items():  # old experts, routers' old rows, everything else: bit-identical
        got = new_state[key][: value.shape[0]] if key.startswith("task_embedding.") else new_state[key]
        assert torch.equal(got, value), key
    raw = load_file(str(after_dir / "training_state.safetensors"))
    assert all(not torch.equal(raw[f"model.{n}"], v) for n, v in stage_init.items())  # the new experts and router outputs trained
    assert not torch.equal(raw["model.task_embedding.weight"][2:], rows_init[2:])
    assert torch.equal(raw["model.task_embedding.weight"][:2], rows_init[:2])

    new, meta = load_policy(after_dir)
    assert meta["policy"]["network"]["task_experts"] == [3, 3, 5, 5]
    for cache in (True, False):
        assert torch.equal(_old_task_actions(new, cache), before[cache])
    # the new tasks are routed to the new experts too
    layer = new.net.moe_layers()[0]
    new.encode_obs({"state": torch.randn(2, 2, 6), "task": torch.tensor([2, 3])})
    c = new.net.noise_embed(torch.tensor([0.3, 0.3]))
    assert new.net.route_input(c, None).groups == [(5, None)]
    assert layer.router_logits(new.net.route_input(c, None).vector).shape == (2, 5)


def test_add_experts_refuses_what_it_cannot_do(tmp_path, capsys):
    make_dataset(tmp_path / "a.zarr", lengths=(8, 7), tasks=("task-a", "task-b"))
    with pytest.raises(ConfigError, match="add_experts.*needs init_from"):
        _cfg(tmp_path, "x", "a.zarr", add_experts=2)
    code, _, err = run_main(capsys, "train", f"dataset={tmp_path / 'a.zarr'}", f"out_dir={tmp_path / 'y'}", "add_experts=2")
    assert_one_line_error(code, err, "add_experts")
    Trainer(_cfg(tmp_path, "dense", "a.zarr", steps=1, policy=make_small_policy_dict())).run()
    with pytest.raises(UserError, match="add_experts needs a policy with experts"):
        Trainer(_cfg(tmp_path, "x", "a.zarr", init_from=str(tmp_path / "dense"), add_experts=2))
    Trainer(_cfg(tmp_path, "mode", "a.zarr", steps=1, policy=_policy_dict("task"))).run()
    with pytest.raises(UserError, match="the dataset has no task the checkpoint lacks"):
        Trainer(_cfg(tmp_path, "x", "a.zarr", init_from=str(tmp_path / "mode"), add_experts=2))


@pytest.mark.slow
def test_an_interrupted_add_experts_run_resumes_exactly(tmp_path):
    make_dataset(tmp_path / "a.zarr", lengths=(8, 7, 9), tasks=("task-a", "task-b"))
    make_dataset(tmp_path / "b.zarr", lengths=(8, 9), tasks=("task-c",), seed=1)
    Trainer(_cfg(tmp_path, "pre", "a.zarr", steps=2, policy=_policy_dict("task"))).run()
    kw = dict(init_from=str(tmp_path / "pre"), add_experts=1, steps=4)
    Trainer(_cfg(tmp_path, "add", "b.zarr", **kw)).run(until=2)
    t = Trainer(_cfg(tmp_path, "add", "b.zarr", resume=True, **kw))  # the same command, resumed
    assert t.step == 2 and t.policy.cfg.network.task_experts == [3, 3, 4]
    assert {n for n, p in t.policy.named_parameters() if p.requires_grad} == {"task_embedding.weight"} | {
        n for n, _ in t.policy.named_parameters() if ".stages.0." in n
    }
    t.run()
    Trainer(_cfg(tmp_path, "straight", "b.zarr", **kw)).run()
    a = load_file(str(tmp_path / "add" / "checkpoints" / "last" / "training_state.safetensors"))
    b = load_file(str(tmp_path / "straight" / "checkpoints" / "last" / "training_state.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
