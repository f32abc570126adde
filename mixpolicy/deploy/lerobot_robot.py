"""Adapter that drives LeRobot robot classes (optional extra: lerobot).

LeRobot robots (``lerobot.robots.Robot``) expose ``connect()``, ``get_observation()`` (a
flat dict: scalar motor readings such as ``"shoulder_pan.pos"`` and camera frames),
``send_action(dict)`` with the names of ``action_features``, and ``disconnect()``. The
adapter turns them into this package's Robot protocol: the scalar readings named in
``state_features`` (default: all, in ``observation_features`` order) become the ``state``
vector, each camera ``<name>`` becomes ``image_<name>``, and action vectors map onto
``action_features`` in order. Their actions are absolute joint targets, so holding still
means repeating the last one.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mixpolicy.deploy.clock import now
from mixpolicy.errors import UserError


class LeRobotRobot:
    def __init__(self, robot, control_hz: float, state_features: list[str] | None = None, state_key: str = "state"):
        self.robot = robot
        self.dt = 1.0 / control_hz
        obs_features = dict(robot.observation_features)
        scalars = [k for k, v in obs_features.items() if not isinstance(v, tuple)]
        self.cameras = [k for k, v in obs_features.items() if isinstance(v, tuple)]
        self.state_features = list(state_features) if state_features else scalars
        unknown = [k for k in self.state_features if k not in scalars]
        if unknown:
            raise UserError(f"robot.lerobot_state_features {unknown} are not scalar observation features of the robot ({scalars})")
        self.action_names = list(robot.action_features)
        self.action_dim = len(self.action_names)
        self.action_low = None  # the policy's training range bounds the actions
        self.action_high = None
        self.state_key = state_key
        self._start = now()
        self._last: np.ndarray | None = None

    def connect(self) -> None:
        if not getattr(self.robot, "is_connected", False):
            self.robot.connect()

    def start_episode(self, seed: int | None = None) -> None:
        self._start = now()

    def get_observation(self) -> dict[str, Any]:
        raw = self.robot.get_observation()
        obs: dict[str, Any] = {self.state_key: np.asarray([raw[k] for k in self.state_features], np.float32)}
        for cam in self.cameras:
            obs[f"image_{cam}"] = np.asarray(raw[cam])
        t = now()
        obs["timestamp"] = t
        # Reads are on demand: the tick is the control period the read falls in.
        obs["tick"] = int(round((t - self._start) / self.dt))
        return obs

    def send_action(self, action: np.ndarray) -> None:
        a = np.asarray(action, np.float64)
        if a.shape != (self.action_dim,):
            raise ValueError(f"action must have shape ({self.action_dim},), got {a.shape}")
        self.robot.send_action({name: float(v) for name, v in zip(self.action_names, a)})
        self._last = a

    def hold_action(self, last: np.ndarray | None) -> np.ndarray:
        ref = last if last is not None else self._last
        if ref is None:
            raw = self.robot.get_observation()
            # Without a previous command, hold where the joints are (same names as the actions).
            ref = np.asarray([raw.get(name, 0.0) for name in self.action_names], np.float64)
        return np.asarray(ref, np.float64).copy()

    def disconnect(self) -> None:
        if getattr(self.robot, "is_connected", True):
            self.robot.disconnect()


def make_lerobot_robot(cfg, spec, control_hz: float) -> LeRobotRobot:
    """Build a LeRobot robot from its type name and config fields (``robot.lerobot_*``)."""
    try:
        from lerobot.robots import RobotConfig
        from lerobot.robots.utils import make_robot_from_config
    except ImportError:
        raise UserError("robot.type=lerobot needs lerobot: bash scripts/install_lerobot.sh (see README)") from None
    try:
        config_cls = RobotConfig.get_choice_class(cfg.lerobot_type)
    except Exception:
        raise UserError(f"unknown LeRobot robot type {cfg.lerobot_type!r}") from None
    try:
        robot = make_robot_from_config(config_cls(**cfg.lerobot_args))
    except TypeError as exc:
        raise UserError(f"robot.lerobot_args do not fit {cfg.lerobot_type}: {exc}") from None
    adapter = LeRobotRobot(robot, control_hz, cfg.lerobot_state_features or None)
    if adapter.action_dim != spec.action_dim:
        raise UserError(f"the robot takes {adapter.action_dim} action values, the policy outputs {spec.action_dim}")
    return adapter
