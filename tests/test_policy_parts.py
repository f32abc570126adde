"""The policy composed of parts: YAML defaults, any combination from config, a new part by registration."""

from __future__ import annotations

import ast
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from mixpolicy.cli import compose
from mixpolicy.config import VARIANTS, ConfigError
from mixpolicy.deploy.rti import RTIConfig, RTISampler
from mixpolicy.policies import factory
from mixpolicy.policies.config import (
    HEAD_CONFIGS,
    NETWORK_CONFIGS,
    OBJECTIVE_CONFIGS,
    ObjectiveConfig,
    PART_CONFIGS,
    PolicyConfig,
    policy_config_from_dict,
)
from mixpolicy.policies.denoising_policy import DenoisingPolicy, ShapeMeta, example_observation
from mixpolicy.policies.objectives import Objective, per_sample

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "policy"
PRESETS = sorted(p.stem for p in CONFIGS.glob("*.yaml") if p.stem != "base")


def _plain_yaml(path: Path) -> dict:
    data = yaml.safe_load(path.read_text())
    data.pop("defaults", None)
    return data


def _defaults(cls) -> dict:
    return {k: v for k, v in dataclasses.asdict(cls()).items()}


@pytest.mark.parametrize("part", sorted(PART_CONFIGS))
def test_every_part_yaml_holds_its_dataclass_defaults(part):
    """configs/policy/<part>/<type>.yaml composes to exactly the defaults of that type's dataclass."""
    variants = PART_CONFIGS[part][1]
    files = sorted((CONFIGS / part).glob("*.yaml"))
    assert sorted(f.stem for f in files) == sorted(variants)
    for f in files:
        composed = compose("train", ["dataset=x", "policy=dit", f"policy/{part}={f.stem}"])["policy"][part]
        assert composed == _defaults(variants[f.stem]), f


def test_base_yaml_holds_the_policy_defaults():
    base = _plain_yaml(CONFIGS / "base.yaml")
    expected = {k: v for k, v in _defaults(PolicyConfig).items() if k not in PART_CONFIGS}
    assert base == expected


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_is_a_composition_of_parts(name):
    d = compose("train", ["dataset=x", f"policy={name}"])["policy"]
    cfg = policy_config_from_dict(d)
    assert dataclasses.asdict(cfg) == d  # every field present, none unknown
    assert cfg.network.type == ("mode" if name.startswith("mode") else "transformer")
    assert cfg.head.type == ("moh" if name.endswith("_moh") else "single")
    assert cfg.type == ("mode" if name.startswith("mode") else "dit") + ("_moh" if name.endswith("_moh") else "")
    # a preset file is a defaults list plus at most a few values, in at most two parts
    assert len(_plain_yaml(CONFIGS / f"{name}.yaml")) <= 2


def test_a_combination_that_is_no_preset_trains_and_samples_from_config_alone():
    """MoDE network + mixture-of-horizons head + flow objective + a camera, chosen by config groups."""
    overrides = [
        "dataset=x", "policy=dit", "policy/network=mode", "policy/head=moh", "policy/objective=flow",
        "policy.obs_keys=[state,image_front]", "policy.network.width=32", "policy.network.depth=1", "policy.network.heads=2",
        "policy.obs_hidden=32", "policy.horizon=8", "policy.n_action_steps=4", "policy.head.horizons=[4,8]",
        "policy.image_encoder.crop_size=40", "policy.objective.num_inference_steps=3",
    ]  # fmt: skip
    cfg = policy_config_from_dict(compose("train", overrides)["policy"])
    shapes = ShapeMeta(obs={"state": [5], "image_front": [48, 48, 3]}, action_dim=3, tasks=["a", "b"])
    torch.manual_seed(0)
    policy = DenoisingPolicy(cfg, shapes)
    assert policy.cfg.type == "mode_moh" and policy.skips_parameters and not policy.adaptive_execution
    batch = example_observation(policy, batch=2)
    batch["action"] = torch.rand(2, 8, 3) * 2 - 1
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    before = policy.net.action_in.weight.detach().clone()
    loss, logs = policy.train().compute_loss(batch, torch.Generator().manual_seed(0))
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and {"fused_loss", "horizon_loss_4", "load_balance"} <= set(logs)
    assert not torch.equal(before, policy.net.action_in.weight)
    plan = policy.eval().plan(example_observation(policy, batch=2), torch.Generator().manual_seed(1))
    assert plan.actions.shape == (2, 8, 3) and torch.isfinite(plan.actions).all() and plan.executable.tolist() == [4, 4]


@dataclass
class ToyConfig(ObjectiveConfig):
    """A variance-exploding objective with sigma = level and epsilon prediction (test only)."""

    type: str = "toy"
    sigma_max: float = 2.0
    SOLVERS = ("euler",)


class ToyObjective(Objective):
    def sample_level(self, n, generator, device):
        return 0.05 + (self.cfg.sigma_max - 0.05) * torch.rand(n, generator=generator, device=device)

    def target(self, x0, noise, x, level):
        return noise

    def schedule(self, num_steps=None):
        return torch.linspace(self.cfg.sigma_max, 0.05, int(num_steps or self.cfg.num_inference_steps))

    def prior(self, shape, generator=None, device=None, dtype=torch.float32):
        return self.cfg.sigma_max * torch.randn(shape, generator=generator, device=device, dtype=dtype)

    def network_level(self, level):
        return 100.0 * level.float()

    def coefficients(self, level):
        return torch.ones_like(level), level

    def coefficient_slopes(self, level):
        return torch.zeros_like(level), torch.ones_like(level)

    def prediction(self, model_out, x, level):
        return x - per_sample(level, x) * model_out, model_out


@pytest.fixture
def toy_objective():
    factory.register("objective", "toy", ToyConfig, ToyObjective)
    yield
    OBJECTIVE_CONFIGS.pop("toy")
    VARIANTS[ObjectiveConfig].pop("toy")
    factory.IMPLEMENTATIONS["objective"].pop("toy")


def test_a_new_objective_is_one_module_and_one_registration(toy_objective):
    cfg = policy_config_from_dict(
        {"horizon": 4, "n_action_steps": 2, "obs_hidden": 32, "network": {"width": 32, "depth": 1, "heads": 2}, "objective": {"type": "toy", "num_inference_steps": 4}}
    )
    assert isinstance(cfg.objective, ToyConfig)
    policy = DenoisingPolicy(cfg, ShapeMeta(obs={"state": [5]}, action_dim=3, tasks=["a"]))
    batch = {**example_observation(policy, 2), "action": torch.rand(2, 4, 3) * 2 - 1}
    loss, _ = policy.compute_loss(batch, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)
    policy.eval()
    rti = RTISampler(policy, RTIConfig(k=2))
    cold = rti(example_observation(policy, 2), generator=torch.Generator().manual_seed(1))
    warm = rti(example_observation(policy, 2), shift=2, generator=torch.Generator().manual_seed(2))
    assert not cold.warm and cold.steps == 4 and warm.warm and warm.steps == 2 and torch.isfinite(warm.actions).all()
    with pytest.raises(ConfigError, match="'policy.objective.type': unknown objective type 'toy2'"):
        policy_config_from_dict({"objective": {"type": "toy2"}})


def test_configs_of_the_earlier_layout_are_upgraded():
    legacy = {"type": "mode_moh", "horizon": 8, "n_action_steps": 4, "objective": {"name": "flow", "solver": "heun", "sigma_max": 3.0}, "moh": {"horizons": [4, 8]}}
    cfg = policy_config_from_dict(legacy)
    assert (cfg.network.type, cfg.head.type, cfg.objective.type, cfg.objective.solver) == ("mode", "moh", "flow", "heun")
    assert cfg.head.horizons == [4, 8] and cfg.type == "mode_moh"
    assert policy_config_from_dict({"type": "mode"}).objective.type == "edm"  # the earlier type's default objective


def test_config_modules_import_no_implementation():
    policies = Path(__file__).resolve().parent.parent / "mixpolicy" / "policies"
    allowed = {
        "config.py": {"mixpolicy.config", "mixpolicy.keys", "mixpolicy.policies.objective_config", "mixpolicy.policies.image_config"},
        "objective_config.py": {"mixpolicy.config"},
        "image_config.py": {"mixpolicy.config"},
    }
    for name, expected in allowed.items():
        imported = {
            node.module for node in ast.walk(ast.parse((policies / name).read_text())) if isinstance(node, ast.ImportFrom) and node.module
        }
        assert {m for m in imported if m.startswith("mixpolicy")} == expected, name


def test_every_registered_type_has_an_implementation():
    for part, (_, variants) in PART_CONFIGS.items():
        assert sorted(variants) == sorted(factory.IMPLEMENTATIONS[part]), part
    assert sorted(NETWORK_CONFIGS) == ["mode", "transformer"] and sorted(HEAD_CONFIGS) == ["moh", "single"]


def test_several_actions_per_token_shrink_the_sequence_and_keep_the_interface():
    shapes = ShapeMeta(obs={"state": [5]}, action_dim=3, tasks=["a"])
    base = {"horizon": 8, "n_action_steps": 4, "obs_hidden": 32, "network": {"width": 32, "depth": 1, "heads": 2}}
    torch.manual_seed(0)
    one = DenoisingPolicy(policy_config_from_dict(base), shapes)
    two = DenoisingPolicy(policy_config_from_dict({**base, "network": {**base["network"], "actions_per_token": 2}}), shapes)
    assert one.net.pos.shape[1] == 1 + 1 + 2 + 8 and two.net.pos.shape[1] == 1 + 1 + 2 + 4  # noise, goal, 2 steps, actions
    batch = {**example_observation(two, 2), "action": torch.rand(2, 8, 3) * 2 - 1}
    loss, _ = two.compute_loss(batch, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)
    assert two.eval().plan(example_observation(two, 2)).actions.shape == (2, 8, 3)
    causal = DenoisingPolicy(policy_config_from_dict({**base, "network": {**base["network"], "actions_per_token": 2, "action_attention": "causal"}}), shapes).eval()
    x, level, cond = torch.randn(1, 8, 3), torch.tensor([5.0]), causal.encode_obs(example_observation(causal, 1))
    x2 = x.clone()
    x2[:, 6:] += 1.0  # the last token's actions
    torch.testing.assert_close(causal.net(x, level, cond)[:, :6], causal.net(x2, level, cond)[:, :6])
    with pytest.raises(ConfigError, match="must divide"):
        policy_config_from_dict({**base, "network": {**base["network"], "actions_per_token": 3}})
    with pytest.raises(ConfigError, match="single-horizon head"):
        policy_config_from_dict({**base, "head": {"type": "moh", "horizons": [4, 8]}, "network": {**base["network"], "actions_per_token": 2}})
