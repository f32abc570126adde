"""Policy composition at sampling time: a convex combination of the parents' predictions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mixpolicy.datasets.normalizer import Normalizer
from mixpolicy.deploy.rti import RTIConfig, RTISampler
from mixpolicy.errors import UserError
from mixpolicy.policies.checkpoint import save_policy
from mixpolicy.policies.compose import ComposedPolicy
from mixpolicy.policies.config import policy_config_from_dict
from mixpolicy.policies.denoising_policy import DenoisingPolicy, ShapeMeta, example_observation
from mixpolicy.policies.inference import load_composition

SHAPES = ShapeMeta(obs={"state": [5], "image_front": [40, 40, 3]}, action_dim=3, tasks=["a", "b"])
NORM = {"state": np.random.default_rng(0).normal(size=(30, 5)), "action": np.random.default_rng(1).uniform(-2, 2, (30, 3))}


def parent(seed, obs_keys=("state",), objective="flow", steps=4, network="transformer"):
    torch.manual_seed(seed)
    cfg = policy_config_from_dict(
        {"obs_keys": list(obs_keys), "horizon": 8, "n_action_steps": 4, "obs_hidden": 32,
         "image_encoder": {"crop_size": 36, "num_keypoints": 4}, "network": {"type": network, "width": 32, "depth": 1, "heads": 2},
         "objective": {"type": objective, "num_inference_steps": steps}}
    )  # fmt: skip
    keys = {k: NORM[k] for k in ("state", "action")}
    return DenoisingPolicy(cfg, SHAPES, Normalizer.from_data(keys)).eval()


def obs(policy, seed=0):
    torch.manual_seed(seed)
    return example_observation(policy, 2)


def test_a_one_hot_composition_is_its_parent():
    a, b = parent(0), parent(1, ("state", "image_front"))
    comp = ComposedPolicy([a, b], [1.0, 0.0])
    o = obs(comp)
    assert comp.cfg.obs_keys == ["state", "image_front"] and set(o) == {"state", "image_front", "task"}
    torch.testing.assert_close(comp.plan(o, torch.Generator().manual_seed(3)).actions, a.plan(o, torch.Generator().manual_seed(3)).actions, rtol=0, atol=0)


def test_one_step_of_the_composition_follows_the_mixed_prediction():
    """Flow matching, one Euler step from the same prior: the mixed velocity gives the mixed chunk."""
    a, b = parent(0, steps=1), parent(1, ("state", "image_front"), steps=1, network="mode")
    comp = ComposedPolicy([a, b], [0.3, 0.7])
    o = obs(comp)
    mixed = comp.plan(o, torch.Generator().manual_seed(5)).normalized
    xa = a.plan(o, torch.Generator().manual_seed(5)).normalized
    xb = b.plan(o, torch.Generator().manual_seed(5)).normalized
    torch.testing.assert_close(mixed, 0.3 * xa + 0.7 * xb, atol=1e-5, rtol=0)
    assert not torch.allclose(mixed, xa)


def test_a_composition_warm_starts_through_rti(tmp_path):
    paths = [save_policy(parent(0, objective="edm"), tmp_path / "a"), save_policy(parent(1, ("state", "image_front"), objective="edm"), tmp_path / "b")]
    comp, meta = load_composition([str(p) for p in paths], [0.5, 0.5], device="cpu", num_threads=1)
    rti = RTISampler(comp, RTIConfig(k=2, prefix="guidance", delay=2))
    o = obs(comp)
    assert not rti(o, generator=torch.Generator().manual_seed(0)).warm
    res = rti(o, shift=4, generator=torch.Generator().manual_seed(1))
    assert res.warm and res.steps == 2 and torch.isfinite(res.actions).all() and meta["policy_type"] == "dit"


def test_incompatible_parents_and_bad_weights_are_refused():
    a = parent(0)
    with pytest.raises(UserError, match="another objective"):
        ComposedPolicy([a, parent(1, objective="edm")], [0.5, 0.5])
    other = parent(2)
    other.normalizer.params["action"].scale.mul_(2)
    with pytest.raises(UserError, match="normalizes actions differently"):
        ComposedPolicy([a, other], [0.5, 0.5])
    with pytest.raises(UserError, match="sum to 1"):
        ComposedPolicy([a, parent(3)], [0.5, 0.6])
    with pytest.raises(UserError, match="at least two"):
        ComposedPolicy([a], [1.0])


@pytest.mark.slow
def test_eval_composes_checkpoints_with_fixed_or_per_task_weights(tmp_path, capsys):
    """Through the CLI, on Meta-World reach: fixed weights, then weights chosen on validation seeds."""
    import json

    from mixpolicy.cli import main

    shapes = ShapeMeta(obs={"state": [39]}, action_dim=4, tasks=["reach-v3"])
    norm = Normalizer.from_data({"state": np.random.default_rng(0).normal(size=(30, 39)), "action": np.random.default_rng(1).uniform(-1, 1, (30, 4))})
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        cfg = policy_config_from_dict({"horizon": 4, "n_action_steps": 2, "obs_hidden": 32, "network": {"width": 32, "depth": 1, "heads": 2},
                                       "objective": {"type": "flow", "num_inference_steps": 2}})  # fmt: skip
        paths.append(save_policy(DenoisingPolicy(cfg, shapes, norm), tmp_path / f"p{seed}"))
    common = [f"checkpoint={paths[0]}", f"compose=[{paths[1]}]", "episodes_per_task=2", "max_episode_steps=10", "num_envs=2", "progress=false"]
    assert main(["eval", *common, "compose_weights=[0.5,0.5]", f"out={tmp_path}/fixed"]) == 0
    fixed = json.loads((tmp_path / "fixed" / "results.json").read_text())
    assert fixed["composition"]["weights"] == [0.5, 0.5] and fixed["tasks"]["reach-v3"]["episodes"] == 2
    assert main(["eval", *common, "compose_val_episodes=1", f"out={tmp_path}/auto"]) == 0
    auto = json.loads((tmp_path / "auto" / "results.json").read_text())
    chosen = auto["composition"]["weights_per_task"]["reach-v3"]
    assert len(chosen) == 2 and abs(sum(chosen) - 1) < 1e-9 and auto["tasks"]["reach-v3"]["seeds"] == fixed["tasks"]["reach-v3"]["seeds"]
    capsys.readouterr()
    assert main(["eval", *common, "compose_weights=[1.0]"]) == 2
    assert "compose_weights" in capsys.readouterr().err
