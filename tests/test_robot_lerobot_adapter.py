"""The LeRobot adapter and `mixpolicy deploy robot.type=lerobot` with a fake LeRobot arm and
motor bus (lerobot itself is not needed): timestamps, ticks, holds, torque on a fault, and
the checkpoint compared with the robot before it connects."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import mixpolicy.deploy.lerobot_robot as lr
from mixpolicy.config import ConfigError
from mixpolicy.deploy.lerobot_robot import LeRobotRobot
from mixpolicy.deploy.loop import LoopConfig
from mixpolicy.deploy.report import format_summary
from mixpolicy.deploy.runner import DeployConfig, InferenceConfig, RobotConfig, deploy
from mixpolicy.deploy.safety import SafetyConfig
from mixpolicy.errors import UserError
from mixpolicy.policies.checkpoint import save_policy
from mixpolicy.policies.denoising_policy import DenoisingPolicy, ShapeMeta
from factories import tiny_policy_config
from test_deploy_loop import ScriptedClient

HZ = 100.0
JOINTS = ["shoulder.pos", "elbow.pos"]


class FakeBus:
    """Records what the arm was told: goal positions and, per disconnect, whether torque went off."""

    def __init__(self):
        self.goals: list[dict] = []
        self.torque_off: list[bool] = []

    def disconnect(self, disable_torque: bool = True):
        self.torque_off.append(disable_torque)


class FakeArm:
    """Shaped like a LeRobot follower: flat features, a config with disable_torque_on_disconnect."""

    def __init__(self, fail_at_read=None, camera=(4, 4, 3), action_features=None):
        self.observation_features = {**{j: float for j in JOINTS}, "front": camera}
        self.action_features = action_features or {j: float for j in JOINTS}
        self.config = SimpleNamespace(disable_torque_on_disconnect=True, port="/dev/fake")
        self.bus = FakeBus()
        self.cameras = {"front": SimpleNamespace(latest_timestamp=None)}
        self.is_connected = False
        self.connects = 0
        self.pose = np.array([0.5, -0.25])
        self.reads = 0
        self.fail_at_read = fail_at_read

    def connect(self):
        self.connects += 1
        self.is_connected = True

    def get_observation(self):
        self.reads += 1
        if self.fail_at_read is not None and self.reads >= self.fail_at_read:
            raise TimeoutError("serial read timed out")
        return {**dict(zip(JOINTS, self.pose)), "front": np.zeros((4, 4, 3), np.uint8)}

    def send_action(self, action):
        self.bus.goals.append(dict(action))
        self.pose = np.array([action.get(j, p) for j, p in zip(JOINTS, self.pose)])
        return action

    def disconnect(self):
        self.bus.disconnect(self.config.disable_torque_on_disconnect)
        self.is_connected = False


class FakeClock:
    def __init__(self, t=1000.0):
        self.t = t

    def __call__(self):
        return self.t


def test_timestamps_are_capture_times_and_ticks_floor_the_read_time(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(lr, "now", clock)
    arm = FakeArm()
    robot = LeRobotRobot(arm, HZ)
    robot.start_episode()
    arm.cameras["front"].latest_timestamp = 1000.0 - 0.030  # the newest frame is 30 ms old
    obs = robot.get_observation()
    assert obs["tick"] == 0 and obs["timestamp"] == pytest.approx(999.97)
    assert obs["image_front"].shape == (4, 4, 3)
    np.testing.assert_array_equal(obs["state"], [0.5, -0.25])
    dt = 1 / HZ
    # The loop reads tick k half a period after the first timestamp + k * dt; a read latency
    # near half a period flipped round() between ticks, and camera age must not move them.
    for k, late, frame_age in [(1, 0.49, 0.0), (2, 0.0, 0.03), (3, 0.3, 0.01), (4, -0.49, 0.0), (9, 0.2, 0.05)]:
        clock.t = 999.97 + (k + 0.5 + late) * dt
        arm.cameras["front"].latest_timestamp = clock.t - frame_age
        obs = robot.get_observation()
        assert obs["tick"] == k and obs["timestamp"] == pytest.approx(clock.t - frame_age)


def test_holds_read_the_pose_by_joint_name_and_never_invent_one():
    arm = FakeArm()
    robot = LeRobotRobot(arm, HZ)
    np.testing.assert_array_equal(robot.hold_action(None), [0.5, -0.25])
    robot.send_action(np.array([0.1, 0.2]))
    np.testing.assert_array_equal(robot.hold_action(None), [0.1, 0.2])
    robot.start_episode()  # a new episode holds where the joints are now
    arm.pose = np.array([0.3, 0.3])
    np.testing.assert_array_equal(robot.hold_action(None), [0.3, 0.3])
    with pytest.raises(UserError, match=r"actions \['wrist.pos'\] have no observation feature"):
        LeRobotRobot(FakeArm(action_features={"shoulder.pos": float, "wrist.pos": float}), HZ)
    arm.get_observation = lambda: {"shoulder.pos": 0.0}  # a reading that lacks a joint
    robot.start_episode()
    with pytest.raises(RuntimeError, match=r"lacks joints \['elbow.pos'\]"):
        robot.hold_action(None)
    # A velocity command holds at zero, not at its last value.
    base = FakeArm(action_features={"shoulder.pos": float, "x.vel": float})
    mobile = LeRobotRobot(base, HZ)
    mobile.send_action(np.array([0.4, 0.7]))
    np.testing.assert_array_equal(mobile.hold_action(None), [0.4, 0.0])


def test_disconnect_keeps_torque_when_asked_and_restores_the_config():
    arm = FakeArm()
    robot = LeRobotRobot(arm, HZ)
    robot.connect()
    robot.disconnect(keep_torque=True)
    assert arm.bus.torque_off == [False] and arm.config.disable_torque_on_disconnect is True
    robot.connect()
    robot.disconnect()
    assert arm.bus.torque_off == [False, True]


def test_connect_failure_is_one_line():
    arm = FakeArm()

    def fail():
        try:
            raise OSError("[Errno 2] No such file or directory: '/dev/fake'")
        except OSError as exc:
            raise ConnectionError("\nCould not connect on port '/dev/fake'.\nTry again\n") from exc

    arm.connect = fail
    with pytest.raises(UserError) as info:
        LeRobotRobot(arm, HZ).connect()
    assert str(info.value) == "cannot connect the LeRobot robot on /dev/fake: OSError: [Errno 2] No such file or directory: '/dev/fake'"


def shape_meta(**kw):
    meta = {"fps": HZ, "obs": {"state": [2], "image_front": [4, 4, 3]}, "feature_names": {"state": JOINTS, "action": JOINTS}}
    meta.update(kw)
    return meta


@pytest.mark.parametrize(
    "meta, message",
    [
        (shape_meta(fps=30.0), "it was trained at 30 Hz and loop.control_hz is 100"),
        (shape_meta(obs={"state": [3]}), "its state has shape [3] and the robot gives 2 values"),
        (shape_meta(feature_names={"state": JOINTS[::-1]}), "its state features are ['elbow.pos', 'shoulder.pos']"),
        (shape_meta(feature_names={"action": ["a", "b"]}), "its actions are ['a', 'b']"),
        (shape_meta(obs={"state": [2], "image_front": [8, 8, 3]}), "camera 'front' gives [4, 4, 3] and it was trained on [8, 8, 3]"),
        (shape_meta(obs={"state": [2], "image_wrist": [4, 4, 3]}), "it needs camera 'wrist' and the robot has ['front']"),
    ],
)
def test_a_checkpoint_that_does_not_fit_is_refused_in_one_line(meta, message):
    robot = LeRobotRobot(FakeArm(), HZ)
    with pytest.raises(UserError, match="the checkpoint does not fit the robot") as info:
        robot.check_checkpoint(meta, HZ)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_fitting_or_unrecorded_checkpoint_passes():
    robot = LeRobotRobot(FakeArm(), HZ)
    robot.check_checkpoint(shape_meta(), HZ)
    robot.check_checkpoint({"fps": 0.0, "obs": {"state": [2]}, "feature_names": {}}, HZ)  # older checkpoint: nothing to compare


def deploy_cfg(tmp_path, checkpoint="", **robot_kw):
    return DeployConfig(
        checkpoint=checkpoint,
        log=str(tmp_path / "log.jsonl"),
        progress=False,
        overwrite=True,
        robot=RobotConfig(type="lerobot", lerobot_type="fake_arm", episodes_per_task=2, **robot_kw),
        inference=InferenceConfig(backend="remote", url="ws://127.0.0.1:1"),
        loop=LoopConfig(control_hz=HZ, max_episode_ticks=20, warmup_calls=0, initial_latency_ms=5.0),
        safety=SafetyConfig(action_low=[-1.0], action_high=[1.0], max_delta=[0.05], max_obs_age_ms=50),
    )


def far_chunks(i, tick):
    return np.tile([-1.0, 1.0], (16, 1))


@pytest.fixture
def fake_arm(monkeypatch):
    made = []

    def make(cfg, spec, control_hz):
        arm = FakeArm(fail_at_read=made_fail.get("at"))
        made.append(arm)
        return LeRobotRobot(arm, control_hz)

    made_fail: dict = {}
    monkeypatch.setattr(lr, "make_lerobot_robot", make)
    return made, made_fail


def events(path):
    return [r for r in map(json.loads, open(path)) if r["type"] == "event"]


@pytest.mark.slow
def test_deploy_a_lerobot_arm_keeps_torque_on_a_fault(tmp_path, fake_arm):
    made, fail = fake_arm
    fail["at"] = 12
    summary = deploy(deploy_cfg(tmp_path), client=ScriptedClient(make=far_chunks))
    assert summary["stopped"] == "robot_error"
    (arm,) = made
    assert arm.bus.torque_off == [False]  # the motors keep holding
    goals = np.array([[g[j] for j in JOINTS] for g in arm.bus.goals])
    assert np.all(np.isfinite(goals)) and np.abs(goals).max() <= 1.0
    steps = np.diff(np.vstack([[0.5, -0.25], goals]), axis=0)
    assert np.abs(steps).max() <= 0.05 + 1e-9  # rate-limited from the pose read at the start
    np.testing.assert_allclose(goals[-1], goals[-2])  # the last command is a hold
    ev = events(tmp_path / "log.jsonl")
    fault = next(e for e in ev if e["kind"] == "fault")
    assert fault["detail"] == "get_observation: TimeoutError: serial read timed out" and fault["hold_error"] is None
    assert ev[-1] == {"type": "event", "kind": "disconnect", "keep_torque": True}
    assert any(e["kind"] == "note" and "not compared" in e["message"] for e in ev)
    assert summary["torque_kept"] and summary["faults"][0]["fault"] == "robot_error"
    text = format_summary(summary)
    assert "FAULT robot_error in episode 0: get_observation: TimeoutError" in text and "left holding their last target" in text


@pytest.mark.slow
def test_deploy_torque_goes_off_on_a_fault_only_when_asked(tmp_path, fake_arm):
    made, fail = fake_arm
    fail["at"] = 12
    deploy(deploy_cfg(tmp_path, torque_off_on_fault=True), client=ScriptedClient(make=far_chunks))
    assert made[0].bus.torque_off == [True]


@pytest.mark.slow
def test_a_clean_run_disconnects_as_lerobot_is_configured(tmp_path, fake_arm):
    made, _ = fake_arm
    summary = deploy(deploy_cfg(tmp_path), client=ScriptedClient(make=far_chunks))
    assert summary["stopped"] is None and summary["episodes"] == 2
    assert made[0].bus.torque_off == [True]


def test_deploy_refuses_a_checkpoint_trained_at_another_rate_before_connecting(tmp_path, fake_arm):
    made, _ = fake_arm
    torch.manual_seed(0)
    cfg = tiny_policy_config(horizon=8, n_action_steps=4, task_conditioning="none")
    meta = ShapeMeta(obs={"state": [2]}, action_dim=2, fps=30.0, feature_names={"state": JOINTS})
    ckpt = save_policy(DenoisingPolicy(cfg, meta), tmp_path / "ckpt")
    with pytest.raises(UserError, match="the checkpoint does not fit the robot: it was trained at 30 Hz and loop.control_hz is 100"):
        deploy(deploy_cfg(tmp_path, checkpoint=str(ckpt)), client=ScriptedClient(make=far_chunks))
    assert made[0].connects == 0


def test_a_real_robot_needs_local_bounds_and_a_delta_limit(tmp_path):
    cfg = deploy_cfg(tmp_path)
    with pytest.raises(ConfigError, match="safety.action_low.*local bounds"):
        DeployConfig(robot=cfg.robot, inference=cfg.inference, safety=SafetyConfig(max_delta=[0.1]))
    with pytest.raises(ConfigError, match="safety.max_delta"):
        DeployConfig(robot=cfg.robot, inference=cfg.inference, safety=SafetyConfig(action_low=[-1.0], action_high=[1.0]))
