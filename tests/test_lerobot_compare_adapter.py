"""The LeRobot comparison's adapter keeps up with the evaluator's policy interface: its
DiffusionPolicy is replaced by a stand-in, so this runs without lerobot installed."""

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mixpolicy.envs.evaluate import evaluate_policy

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "lerobot_compare" / "compare.py"
TASKS = ["reach-v3", "push-v3", "drawer-open-v3"]


def _compare():
    spec = importlib.util.spec_from_file_location("lerobot_compare", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class StandInDiffusion:
    def __init__(self, n_action):
        self.batches, self.n_action = [], n_action

    def generate_actions(self, batch, noise):
        self.batches.append(batch)
        return torch.full((noise.shape[0], self.n_action, noise.shape[2]), 0.25)


class StandInPolicy:
    def __init__(self, compare):
        self.config = SimpleNamespace(horizon=compare.HORIZON, output_features={"action": SimpleNamespace(shape=(4,))})
        self.diffusion = StandInDiffusion(compare.N_ACTION)

    def eval(self):
        return self


@pytest.mark.slow
def test_the_adapter_runs_through_the_closed_loop_evaluator():
    compare = _compare()
    policy = StandInPolicy(compare)
    adapter = compare.LeRobotAdapter(None, TASKS, parts=(policy, lambda b: b, lambda a: a))
    r = evaluate_policy(adapter, ["push-v3"], episodes_per_task=2, num_envs=2, max_episode_steps=12, progress=False)
    assert r["tasks"]["push-v3"]["episodes"] == 2
    # 12 steps at 8 executed actions per chunk: two chunks for the two environments together
    assert len(policy.diffusion.batches) == 2
    batch = policy.diffusion.batches[0]
    assert batch["observation.state"].shape == (2, compare.N_OBS, compare.PROPRIO)
    env_state = batch["observation.environment_state"]
    assert env_state.shape == (2, compare.N_OBS, 39 - compare.PROPRIO + len(TASKS))
    assert torch.equal(env_state[..., -len(TASKS):], torch.tensor([0.0, 1.0, 0.0]).expand(2, compare.N_OBS, 3))  # push's one-hot


def test_recipe_overrides_reach_mixpolicys_training_config(tmp_path):
    compare = _compare()

    def cfg(*extra):
        args = SimpleNamespace(
            data=tmp_path / "mw.zarr", width=64, depth=2, condition="cached", actions_per_token=4, condition_layers=1,
            norm="layer", steps=10, batch_size=8, seed=0, mixpolicy_lr=0.0, mixpolicy_warmup=-1, mixpolicy_prediction="epsilon",
        )
        for k, v in extra:
            setattr(args, k, v)
        return compare._mixpolicy_train_cfg(args, tmp_path / "run")

    default = cfg()
    assert (default.lr, default.warmup_steps, default.policy.objective.prediction_type) == (1e-3, 100, "epsilon")
    tuned = cfg(("mixpolicy_lr", 3e-4), ("mixpolicy_warmup", 250), ("mixpolicy_prediction", "sample"))
    assert (tuned.lr, tuned.warmup_steps, tuned.policy.objective.prediction_type) == (3e-4, 250, "sample")
    assert tuned.policy.network.actions_per_token == 4 and tuned.policy.network.condition == "cached"
