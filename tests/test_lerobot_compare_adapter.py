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
