"""Adapter that drives LeRobot robot classes (optional extra: lerobot).

LeRobot robots (``lerobot.robots.Robot``) expose ``connect()``, ``get_observation()`` (a
flat dict: scalar motor readings such as ``"shoulder_pan.pos"`` and camera frames),
``send_action(dict)`` with the names of ``action_features``, and ``disconnect()``. The
adapter turns them into this package's Robot protocol: the scalar readings named in
``state_features`` (default: all, in ``observation_features`` order) become the ``state``
vector, each camera ``<name>`` becomes ``image_<name>``, and action vectors map onto
``action_features`` in order. Position targets (``*.pos``) are absolute, so holding still
means repeating the last one, and the hold at an episode start is the pose read from the
joints of the same names; any other command (``*.vel``, ``*.torque``) holds at zero.

LeRobot registers a robot type only when the module defining it is imported, so
``make_lerobot_robot`` imports the robot and camera modules as LeRobot's own scripts do
(lerobot_record, lerobot_teleoperate) and builds the config with draccus, LeRobot's
config parser, so nested configs (cameras, the two arms of a bimanual robot) work.
"""

from __future__ import annotations

import importlib
import math
from typing import Any

import numpy as np

from mixpolicy.deploy.clock import now
from mixpolicy.errors import UserError
from mixpolicy.keys import camera_key, camera_name, is_image_key

# lerobot.robots.<module> for each robot family of lerobot 0.4.x; absent ones are skipped.
ROBOT_MODULES = (
    "bi_openarm_follower", "bi_so_follower", "earthrover_mini_plus", "hope_jr", "koch_follower", "lekiwi",
    "omx_follower", "openarm_follower", "reachy2", "so_follower", "unitree_g1",
)  # fmt: skip
CAMERA_MODULES = ("opencv", "realsense", "reachy2_camera", "zmq")  # lerobot.cameras.<m>.configuration_<m>
POSITION_SUFFIX = ".pos"  # an absolute target; other commands (velocity, torque) hold at zero


def one_line(exc: BaseException) -> str:
    """The innermost cause of an error, as one line."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = " ".join(part.strip() for part in str(exc).splitlines() if part.strip())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class LeRobotRobot:
    needs_local_limits = True  # a real arm: limits come from the local safety config

    def __init__(self, robot, control_hz: float, state_features: list[str] | None = None, state_key: str = "state"):
        self.robot = robot
        self.dt = 1.0 / control_hz
        obs_features = dict(robot.observation_features)
        scalars = [k for k, v in obs_features.items() if not isinstance(v, tuple)]
        self.camera_shapes = {k: tuple(int(s) for s in v) for k, v in obs_features.items() if isinstance(v, tuple)}
        self.cameras = list(self.camera_shapes)
        self.state_features = list(state_features) if state_features else scalars
        unknown = [k for k in self.state_features if k not in scalars]
        if unknown:
            raise UserError(f"robot.lerobot_state_features {unknown} are not scalar observation features of the robot ({scalars})")
        self.action_names = list(robot.action_features)
        self.positions = np.array([k.endswith(POSITION_SUFFIX) for k in self.action_names])
        # Holding at an episode start reads the joints by action name: a missing one would be a guess.
        unreadable = [k for k in self.action_names if k.endswith(POSITION_SUFFIX) and k not in scalars]
        if unreadable:
            raise UserError(f"the robot's actions {unreadable} have no observation feature of the same name, so its pose cannot be held")
        self.action_dim = len(self.action_names)
        self.action_low = None  # the local safety config bounds the actions
        self.action_high = None
        self.state_key = state_key
        self._start: float | None = None
        self._last: np.ndarray | None = None

    def connect(self) -> None:
        if getattr(self.robot, "is_connected", False):
            return
        try:
            self.robot.connect()
        except Exception as exc:
            port = getattr(getattr(self.robot, "config", None), "port", None)
            where = f" on {port}" if port else ""
            raise UserError(f"cannot connect the LeRobot robot{where}: {one_line(exc)}") from None

    def start_episode(self, seed: int | None = None) -> None:
        self._start = None  # tick 0 is the episode's first read
        self._last = None  # so the first hold is the pose read from the joints

    def _camera_stamps(self) -> list[float]:
        cams = getattr(self.robot, "cameras", None)
        stamps = [getattr(c, "latest_timestamp", None) for c in cams.values()] if isinstance(cams, dict) else []
        return [float(s) for s in stamps if isinstance(s, (int, float)) and math.isfinite(s)]

    def get_observation(self) -> dict[str, Any]:
        # The observation is no newer than the start of the read, nor than the newest frame
        # each camera held then (stamped on the same perf_counter clock by LeRobot).
        t0 = now()
        stamps = self._camera_stamps()
        raw = self.robot.get_observation()
        obs: dict[str, Any] = {self.state_key: np.asarray([raw[k] for k in self.state_features], np.float32)}
        for cam in self.cameras:
            obs[camera_key(cam)] = np.asarray(raw[cam])
        obs["timestamp"] = min([t0, *stamps])
        if self._start is None:
            # Tick 0 is the first observation: the loop schedules tick n half a period after
            # its timestamp + n * dt, so later reads fall mid-period of this grid and flooring
            # stays clear of tick boundaries (rounding flipped at half a period of latency).
            self._start = obs["timestamp"]
            obs["tick"] = 0
        else:
            obs["tick"] = max(0, int((t0 - self._start) // self.dt))
        return obs

    def send_action(self, action: np.ndarray) -> None:
        a = np.asarray(action, np.float64)
        if a.shape != (self.action_dim,):
            raise ValueError(f"action must have shape ({self.action_dim},), got {a.shape}")
        self.robot.send_action({name: float(v) for name, v in zip(self.action_names, a)})
        self._last = a

    def hold_action(self, last: np.ndarray | None) -> np.ndarray:
        ref = last if last is not None else self._last
        if ref is None:  # no previous command: hold where the joints are
            raw = self.robot.get_observation()
            missing = [name for name, pos in zip(self.action_names, self.positions) if pos and name not in raw]
            if missing:
                raise RuntimeError(f"the observation lacks joints {missing}: the pose to hold is unknown")
            ref = [raw[name] if pos else 0.0 for name, pos in zip(self.action_names, self.positions)]
        return np.where(self.positions, np.asarray(ref, np.float64), 0.0)

    def disconnect(self, keep_torque: bool = False) -> None:
        """``keep_torque``: leave the motors holding their last target (LeRobot followers disable torque by default)."""
        if not getattr(self.robot, "is_connected", True):
            return
        config = getattr(self.robot, "config", None)
        if not keep_torque or not hasattr(config, "disable_torque_on_disconnect"):
            self.robot.disconnect()
            return
        old = config.disable_torque_on_disconnect
        config.disable_torque_on_disconnect = False
        try:
            self.robot.disconnect()
        finally:
            config.disable_torque_on_disconnect = old

    def check_checkpoint(self, shape_meta: dict[str, Any], control_hz: float, action_key: str = "action") -> None:
        """Refuse a checkpoint trained for another rate, state layout or camera size (one line)."""
        problems = []
        fps = float(shape_meta.get("fps") or 0.0)
        if fps > 0 and abs(fps - control_hz) > 1e-6 * fps:
            problems.append(f"it was trained at {fps:g} Hz and loop.control_hz is {control_hz:g}")
        obs = shape_meta.get("obs", {})
        names = shape_meta.get("feature_names", {})
        if self.state_key in obs:
            want = [int(s) for s in obs[self.state_key]]
            if want != [len(self.state_features)]:
                problems.append(f"its {self.state_key} has shape {want} and the robot gives {len(self.state_features)} values {self.state_features}")
            elif names.get(self.state_key) and list(names[self.state_key]) != self.state_features:
                problems.append(f"its {self.state_key} features are {list(names[self.state_key])} and the robot's are {self.state_features}")
        if names.get(action_key) and list(names[action_key]) != self.action_names:
            problems.append(f"its actions are {list(names[action_key])} and the robot's are {self.action_names}")
        for key, shape in obs.items():
            if not is_image_key(key):
                continue
            cam = camera_name(key)
            if cam not in self.camera_shapes:
                problems.append(f"it needs camera {cam!r} and the robot has {self.cameras}")
            elif list(self.camera_shapes[cam]) != [int(s) for s in shape]:
                problems.append(f"camera {cam!r} gives {list(self.camera_shapes[cam])} and it was trained on {list(shape)}")
        if problems:
            raise UserError("the checkpoint does not fit the robot: " + "; ".join(problems))


def import_lerobot_modules() -> dict[str, str]:
    """Import LeRobot's robot and camera modules so their config types register; returns {module: why not}."""
    failed = {}
    for name in ROBOT_MODULES:
        try:
            importlib.import_module(f"lerobot.robots.{name}")
        except ImportError as exc:
            failed[f"lerobot.robots.{name}"] = one_line(exc)
    for name in CAMERA_MODULES:
        try:
            importlib.import_module(f"lerobot.cameras.{name}.configuration_{name}")
        except ImportError as exc:
            failed[f"lerobot.cameras.{name}"] = one_line(exc)
    try:  # third-party robot packages (lerobot_robot_*) register themselves on import
        from lerobot.utils.import_utils import register_third_party_plugins

        register_third_party_plugins()
    except ImportError:
        pass
    return failed


def make_lerobot_robot(cfg, spec, control_hz: float) -> LeRobotRobot:
    """Build a LeRobot robot from its type name and config fields (``robot.lerobot_*``)."""
    adapter = build_lerobot_robot(cfg.lerobot_type, cfg.lerobot_args, control_hz, cfg.lerobot_state_features or None)
    if adapter.action_dim != spec.action_dim:
        raise UserError(f"the robot takes {adapter.action_dim} action values, the policy outputs {spec.action_dim}")
    return adapter


def build_lerobot_robot(lerobot_type: str, lerobot_args: dict[str, Any], control_hz: float, state_features: list[str] | None = None) -> LeRobotRobot:
    try:
        import draccus
        from lerobot.robots import RobotConfig, make_robot_from_config
    except ImportError:
        raise UserError("robot.type=lerobot needs lerobot: bash scripts/install_lerobot.sh (see README)") from None
    failed = import_lerobot_modules()
    known = sorted(RobotConfig.get_known_choices())
    if lerobot_type not in known:
        skipped = f"; not importable: {', '.join(failed)}" if failed else ""
        raise UserError(f"unknown LeRobot robot type {lerobot_type!r} (known: {', '.join(known)}{skipped})")
    config_cls = RobotConfig.get_choice_class(lerobot_type)
    try:
        config = draccus.decode(config_cls, dict(lerobot_args))
    except Exception as exc:
        raise UserError(f"robot.lerobot_args do not fit {lerobot_type}: {one_line(exc)}") from None
    try:
        robot = make_robot_from_config(config)
    except Exception as exc:
        raise UserError(f"cannot build the LeRobot robot {lerobot_type}: {one_line(exc)}") from None
    return LeRobotRobot(robot, control_hz, state_features)
