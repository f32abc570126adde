"""Optional tier: the LeRobot adapter against lerobot's own robot classes
(bash scripts/install_lerobot.sh installs lerobot; skipped with a reason without it).

Every robot type lerobot registers builds from ``robot.lerobot_args`` (or fails with one
line naming the missing SDK), its features map to this package's keys, connecting on a
missing port fails with one line, and with a fake motor bus under the real follower class a
whole `mixpolicy deploy` run goes through the loop.
"""

import dataclasses
import json
import typing
from contextlib import contextmanager

import numpy as np
import pytest

pytest.importorskip("lerobot.robots", reason="lerobot is not installed (optional: bash scripts/install_lerobot.sh)")
draccus = pytest.importorskip("draccus", reason="lerobot's config parser draccus is not installed")

from lerobot.robots import RobotConfig  # noqa: E402

from mixpolicy.deploy.lerobot_robot import LeRobotRobot, build_lerobot_robot, import_lerobot_modules  # noqa: E402
from mixpolicy.deploy.loop import LoopConfig  # noqa: E402
from mixpolicy.deploy.runner import DeployConfig, InferenceConfig, RobotConfig as DeployRobotConfig, deploy  # noqa: E402
from mixpolicy.deploy.safety import SafetyConfig  # noqa: E402
from mixpolicy.errors import UserError  # noqa: E402
from test_deploy_loop import ScriptedClient  # noqa: E402

MISSING_PORT = "/dev/ttyACM_mixpolicy_missing"
HZ = 50.0


def required_args(config_cls, tmp_path) -> dict:
    """Values for the config fields without defaults, as a user would pass them."""
    args = {}
    names = {f.name for f in dataclasses.fields(config_cls)}
    if "calibration_dir" in names:
        args["calibration_dir"] = str(tmp_path)  # LeRobot creates it: keep it out of the home folder
    for f in dataclasses.fields(config_cls):
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
            continue
        if f.name == "port":
            args[f.name] = MISSING_PORT
        elif f.name == "side":
            args[f.name] = "left"
        elif f.name == "remote_ip":
            args[f.name] = "127.0.0.1"
        elif f.name.endswith("_arm_config"):  # a bimanual robot: each arm's own config
            args[f.name] = required_args(typing.get_type_hints(config_cls)[f.name], tmp_path)
        else:
            raise AssertionError(f"{config_cls.__name__}.{f.name}: no test value for this required field")
    return args


def robot_types():
    import_lerobot_modules()
    return sorted(RobotConfig.get_known_choices())


def test_the_robot_modules_register_the_followers():
    failed = import_lerobot_modules()
    known = robot_types()
    assert {"so100_follower", "so101_follower", "koch_follower"} <= set(known), (known, failed)


@pytest.mark.parametrize("robot_type", robot_types())
def test_every_robot_type_builds_from_lerobot_args_and_maps_its_features(robot_type, tmp_path):
    args = required_args(RobotConfig.get_choice_class(robot_type), tmp_path)
    try:
        robot = build_lerobot_robot(robot_type, args, HZ)
    except UserError as exc:  # an SDK lerobot does not install itself (unitree, zmq, ...) or a velocity-only base
        msg = str(exc)
        assert "\n" not in msg
        assert "No module named" in msg or "is required but not installed" in msg or "cannot be held" in msg, msg  # 0.4 | 0.6 wording
        return
    features = dict(robot.robot.observation_features)
    scalars = [k for k, v in features.items() if not isinstance(v, tuple)]
    assert robot.state_features == scalars and robot.action_names == list(robot.robot.action_features)
    assert robot.cameras == [k for k, v in features.items() if isinstance(v, tuple)]
    assert robot.action_dim == len(robot.robot.action_features) > 0


def test_unknown_type_and_bad_args_are_one_line(tmp_path):
    with pytest.raises(UserError, match="unknown LeRobot robot type 'so99_follower' \\(known: .*so100_follower"):
        build_lerobot_robot("so99_follower", {}, HZ)
    with pytest.raises(UserError, match="robot.lerobot_args do not fit so100_follower: .*bogus"):
        build_lerobot_robot("so100_follower", {"port": MISSING_PORT, "bogus": 1}, HZ)


def test_cameras_become_image_keys_with_their_configured_size(tmp_path):
    cams = {"front": {"type": "opencv", "index_or_path": 0, "width": 64, "height": 48, "fps": 30}}
    robot = build_lerobot_robot("so100_follower", {"port": MISSING_PORT, "id": "arm", "calibration_dir": str(tmp_path), "cameras": cams}, HZ)
    assert robot.camera_shapes == {"front": (48, 64, 3)}
    robot.check_checkpoint({"fps": HZ, "obs": {"state": [6], "image_front": [48, 64, 3]}}, HZ)
    with pytest.raises(UserError, match="camera 'front' gives \\[48, 64, 3\\] and it was trained on \\[96, 96, 3\\]"):
        robot.check_checkpoint({"obs": {"image_front": [96, 96, 3]}}, HZ)


@pytest.mark.parametrize("robot_type", ["so100_follower", "koch_follower"])
def test_connect_on_a_missing_port_fails_with_one_line(robot_type, tmp_path):
    robot = build_lerobot_robot(robot_type, {"port": MISSING_PORT, "id": "arm", "calibration_dir": str(tmp_path)}, HZ)
    with pytest.raises(UserError) as info:
        robot.connect()
    msg = str(info.value)
    assert msg.startswith(f"cannot connect the LeRobot robot on {MISSING_PORT}: ") and "\n" not in msg


class FakeMotorBus:
    """Stands in for FeetechMotorsBus / DynamixelMotorsBus: positions in the bus's own units,
    goal positions move the motors at once, every disconnect records whether torque went off."""

    instances: list = []

    def __init__(self, port, motors, calibration=None, **kw):
        self.port = port
        self.motors = motors
        self.calibration = calibration
        self.is_connected = False
        self.is_calibrated = True
        self.present = {m: 10.0 * i for i, m in enumerate(motors)}
        self.goals: list[dict] = []
        self.torque_off: list[bool] = []
        FakeMotorBus.instances.append(self)

    def connect(self, handshake=True):
        self.is_connected = True

    @contextmanager
    def torque_disabled(self, motors=None):
        yield

    def configure_motors(self, *a, **kw):
        pass

    def write(self, *a, **kw):
        pass

    def enable_torque(self, *a, **kw):
        pass

    def disable_torque(self, *a, **kw):
        pass

    def sync_read(self, name, motors=None, **kw):
        assert name == "Present_Position"
        return dict(self.present)

    def sync_write(self, name, values, **kw):
        assert name == "Goal_Position"
        self.goals.append(dict(values))
        self.present.update(values)

    def disconnect(self, disable_torque=True):
        self.torque_off.append(bool(disable_torque))
        self.is_connected = False


@pytest.mark.slow
@pytest.mark.parametrize(
    "robot_type, module, bus_name",
    [
        ("so100_follower", "lerobot.robots.so_follower.so_follower", "FeetechMotorsBus"),
        ("koch_follower", "lerobot.robots.koch_follower.koch_follower", "DynamixelMotorsBus"),
    ],
)
def test_a_whole_deploy_run_through_the_real_follower_class(robot_type, module, bus_name, tmp_path, monkeypatch):
    import importlib

    monkeypatch.setattr(importlib.import_module(module), bus_name, FakeMotorBus)
    FakeMotorBus.instances.clear()
    pose = np.arange(6) * 10.0  # FakeMotorBus starts motor i at 10 * i

    def chunks(i, tick):
        return np.tile(pose + 30.0, (16, 1))  # far from the pose: the delta limit walks there

    cfg = DeployConfig(
        log=str(tmp_path / "log.jsonl"),
        progress=False,
        robot=DeployRobotConfig(type="lerobot", lerobot_type=robot_type, episodes_per_task=1, lerobot_args={"port": MISSING_PORT, "id": "arm", "calibration_dir": str(tmp_path)}),
        inference=InferenceConfig(backend="remote", url="ws://127.0.0.1:1"),
        loop=LoopConfig(control_hz=HZ, max_episode_ticks=25, warmup_calls=0, initial_latency_ms=5.0),
        safety=SafetyConfig(action_low=[-100.0], action_high=[100.0], max_delta=[2.0], max_obs_age_ms=80),
    )
    client = ScriptedClient(make=chunks)
    client.spec.action_dim = 6
    client.spec.obs_keys = ["state"]
    summary = deploy(cfg, client=client)
    assert summary["stopped"] is None and summary["cycles"] == 25
    (bus,) = FakeMotorBus.instances
    goals = np.array([[g[m] for m in bus.motors] for g in bus.goals])
    assert goals.shape == (25, 6) and np.all(np.isfinite(goals))
    steps = np.abs(np.diff(np.vstack([pose, goals]), axis=0))
    assert steps.max() <= 2.0 + 1e-9 and steps.max() == pytest.approx(2.0)  # limited from the pose read at the start
    assert bus.torque_off == [True]  # a clean end: LeRobot's disable_torque_on_disconnect default
    assert json.loads(open(tmp_path / "log.jsonl").readline())["config"]["robot"]["lerobot_type"] == robot_type
