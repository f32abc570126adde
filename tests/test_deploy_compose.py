"""Compositions in `mixpolicy serve` and `mixpolicy deploy` (compose=[...] compose_weights=[...])."""

import numpy as np
import pytest
import torch

from mixpolicy.config import ConfigError, from_dict
from mixpolicy.deploy.local import LocalPolicy, load_inference_policy
from mixpolicy.deploy.loop import ControlLoop, LoopConfig
from mixpolicy.deploy.remote import RemotePolicy
from mixpolicy.deploy.rti import RTIConfig
from mixpolicy.deploy.runner import DeployConfig, InferenceConfig, make_client
from mixpolicy.deploy.safety import SafetyConfig
from mixpolicy.deploy.server import PolicyServer, ServeConfig
from mixpolicy.deploy.subprocess_backend import SubprocessPolicy
from mixpolicy.policies.checkpoint import save_policy
from mixpolicy.policies.compose import ComposedPolicy
from mixpolicy.policies.denoising_policy import DenoisingPolicy
from factories import tiny_policy_config, tiny_shape_meta
from test_cli import assert_one_line_error, run_main
from test_deploy_loop import FakeRobot


class TwoKeyRobot(FakeRobot):
    """A fake robot that also publishes an ``extra`` key (only the second policy reads it)."""

    def get_observation(self):
        obs = super().get_observation()
        obs["extra"] = np.full(2, 0.5 * obs["tick"], np.float32)
        return obs


@pytest.fixture(scope="module")
def parents(tmp_path_factory):
    """Two checkpoints on one action space: A reads state, B reads state and extra."""
    root = tmp_path_factory.mktemp("compose")
    meta = tiny_shape_meta(state_dim=3, action_dim=2, tasks=("t",))
    meta.obs["extra"] = [2]
    paths = []
    for i, keys in enumerate((["state"], ["state", "extra"])):
        torch.manual_seed(i)
        policy = DenoisingPolicy(tiny_policy_config(obs_keys=keys, horizon=8, n_action_steps=4), meta).eval()
        paths.append(str(save_policy(policy, root / f"p{i}")))
    return paths


def _obs(seed=0):
    rng = np.random.default_rng(seed)
    return {"state": rng.normal(size=(2, 3)).astype(np.float32), "extra": rng.normal(size=(2, 2)).astype(np.float32)}


def test_a_served_composition_answers_with_warm_starts(parents):
    rti = RTIConfig(k=2)
    composed = load_inference_policy(parents[0], "cpu", 1, compose=parents[1:], compose_weights=[0.3, 0.7])
    assert isinstance(composed, ComposedPolicy) and composed.cfg.obs_keys == ["state", "extra"]
    local = LocalPolicy(composed, rti, seed=5)
    with PolicyServer(lambda: LocalPolicy(composed, rti, seed=5)) as server:
        remote = RemotePolicy(server.url)
        assert remote.spec.obs_keys == ["state", "extra"]
        for shift, steps in ((None, 4), (2, 2), (2, 2)):  # cold, then RTI warm starts of k=2 steps
            a, b = local.infer(_obs(), 0, shift), remote.infer(_obs(), 0, shift)
            np.testing.assert_allclose(a.actions, b.actions, rtol=1e-6, atol=1e-6)
            assert (b.steps, b.warm) == (steps, shift is not None)
        remote.close()
    # one-hot weights are the first policy alone, which never reads `extra`
    one_hot = LocalPolicy(load_inference_policy(parents[0], "cpu", 1, compose=parents[1:], compose_weights=[1.0, 0.0]), rti, seed=5)
    alone = LocalPolicy(load_inference_policy(parents[0], "cpu", 1), rti, seed=5)
    np.testing.assert_allclose(one_hot.infer(_obs(), 0).actions, alone.infer({"state": _obs()["state"]}, 0).actions, rtol=0, atol=1e-6)
    first = LocalPolicy(load_inference_policy(parents[0], "cpu", 1), rti, seed=5).infer({"state": _obs()["state"]}, 0).actions
    mixed = LocalPolicy(composed, rti, seed=5).infer(_obs(), 0).actions
    assert np.abs(mixed - first).max() > 1e-3


def test_deploy_runs_a_composition_on_a_fake_robot(parents):
    client = make_client(InferenceConfig(backend="thread", device="cpu", rti=RTIConfig(k=1)), parents[0], parents[1:], [0.5, 0.5])
    assert isinstance(client.policy, ComposedPolicy)
    # a slow control rate and lenient observation age: a loaded CPU must not fault the episode
    robot = TwoKeyRobot(hz=20.0)
    loop = ControlLoop(robot, client, LoopConfig(control_hz=20.0, max_episode_ticks=30, initial_latency_ms=5.0, warmup_calls=0, execute_steps=2), SafetyConfig(max_obs_age_ms=500))
    try:
        result = loop.run_episode("t", 0)
    finally:
        loop.close()
    assert result.fault is None and result.ticks == 30
    assert any(np.abs(a).max() > 0 for a in robot.sent)  # the composition's actions reached the robot
    assert result.calls >= 2 and result.denoise_steps == 4 + (result.calls - 1)  # one full call, then k=1 warm starts


def test_composition_options_are_checked_in_one_line(parents, capsys):
    with pytest.raises(ConfigError, match="compose_weights.*needs 2 weights"):
        from_dict(ServeConfig, {"checkpoint": parents[0], "compose": parents[1:]})
    with pytest.raises(ConfigError, match="compose_weights.*weights without compose"):
        from_dict(DeployConfig, {"checkpoint": parents[0], "compose_weights": [1.0]})
    with pytest.raises(ConfigError, match="compose.*mixpolicy serve compose"):
        from_dict(DeployConfig, {"compose": parents[1:], "compose_weights": [0.5, 0.5], "inference": {"backend": "remote", "url": "ws://127.0.0.1:1"}})
    code, _, err = run_main(capsys, "serve", f"checkpoint={parents[0]}", f"compose=[{parents[1]}]", "compose_weights=[0.2,0.2]")
    assert_one_line_error(code, err, "sum to 1")
    code, _, err = run_main(capsys, "serve", f"checkpoint={parents[0]}", f"compose=[{parents[1]}]", "compose_weights=[0.5,0.5]", "execution=adaptive")
    assert_one_line_error(code, err, "fixed execution")


@pytest.mark.slow
def test_the_process_backend_serves_a_composition(parents):
    rti = RTIConfig(k=1)
    client = SubprocessPolicy(parents[0], rti, device="cpu", seed=4, timeout_s=10, compose=parents[1:], compose_weights=[0.4, 0.6])
    try:
        local = LocalPolicy(load_inference_policy(parents[0], "cpu", 1, compose=parents[1:], compose_weights=[0.4, 0.6]), rti, seed=4)
        for shift in (None, 2):
            np.testing.assert_allclose(local.infer(_obs(), 0, shift).actions, client.infer(_obs(), 0, shift).actions, rtol=1e-5, atol=1e-5)
    finally:
        client.close()
