"""The Robot protocol and a simulated Meta-World robot that runs in real time.

A robot gives observations as ``{key: array, "timestamp": s, "tick": n, ...}`` where
``timestamp`` is on the ``clock.now()`` clock and ``tick`` counts the robot's control steps
since the episode started; ``success``/``done`` are optional episode flags. It takes one
action per control step and says what "hold still" means for it. A robot whose
``needs_local_limits`` is true (a real arm) takes its action bounds, rate limits and
discrete dims from the local safety config only.
"""

from __future__ import annotations

import threading
from typing import Any, Protocol

import numpy as np

from mixpolicy.deploy.clock import now


class Robot(Protocol):
    action_dim: int
    action_low: np.ndarray | None
    action_high: np.ndarray | None

    def connect(self) -> None: ...

    def start_episode(self, seed: int | None = None) -> None:
        """Bring the robot to an episode start (a simulator resets; a real arm may do nothing)."""

    def get_observation(self) -> dict[str, Any]: ...

    def send_action(self, action: np.ndarray) -> None: ...

    def hold_action(self, last: np.ndarray | None) -> np.ndarray:
        """The command that keeps the robot still, given the last executed action.

        With ``last=None`` (an episode start) it is the command for the current pose: it
        seeds the safety filter, so the first action is rate-limited from there.
        """

    def disconnect(self, keep_torque: bool = False) -> None:
        """``keep_torque``: after a fault, leave the motors holding their last target."""


class SimulatedMetaWorldRobot:
    """A Meta-World task stepped by its own thread at the control rate.

    Each control tick the robot applies the newest command it received (or its hold
    action when none came since the last tick, counted in ``missed_commands``, as a real
    controller's watchdog would), steps the simulator, and publishes the observation with
    its timestamp. Actions are end-effector deltas plus the gripper, so holding still
    means a zero delta with the gripper unchanged.
    """

    def __init__(self, task: str, control_hz: float = 50.0, max_episode_steps: int = 500):
        from mixpolicy.envs.metaworld_env import GRIPPER_ACTION_DIM, MetaWorldEnv

        self.task = task
        self.dt = 1.0 / control_hz
        self.env = MetaWorldEnv(task, max_episode_steps=max_episode_steps)
        self.action_dim = int(self.env.action_space.shape[0])
        self.action_low = self.env.action_space.low.astype(np.float64)
        self.action_high = self.env.action_space.high.astype(np.float64)
        self._gripper = GRIPPER_ACTION_DIM
        # _env_lock spans a whole simulator step; _lock only guards the short hand-offs
        # (observation, command), so readers never wait for a step.
        self._env_lock = threading.Lock()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._obs: dict[str, Any] | None = None
        self._command: np.ndarray | None = None
        self._last: np.ndarray | None = None
        self._running = False
        self._stopped = False
        self._episode = 0
        self._thread: threading.Thread | None = None
        self.ticks = 0
        self.missed_commands = 0
        self.step_errors: list[str] = []

    # -------------------------------------------------------------- protocol
    def connect(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"sim-robot-{self.task}", daemon=True)
            self._thread.start()

    def start_episode(self, seed: int | None = None) -> None:
        with self._env_lock:
            obs, _ = self.env.reset(seed=seed)
            with self._lock:
                self._command = None
                self._last = None
                self._origin = now()
                self._tick = 0
                self._episode += 1
                self._publish(obs, success=False, done=False)
                self._running = True
                self._wake.notify_all()

    def get_observation(self) -> dict[str, Any]:
        with self._lock:
            if self._obs is None:
                raise RuntimeError("no observation yet: call start_episode() first")
            return dict(self._obs)

    def send_action(self, action: np.ndarray) -> None:
        a = np.asarray(action, np.float64)
        if a.shape != (self.action_dim,):
            raise ValueError(f"action must have shape ({self.action_dim},), got {a.shape}")
        with self._lock:
            self._command = a.copy()

    def hold_action(self, last: np.ndarray | None) -> np.ndarray:
        hold = np.zeros(self.action_dim)
        if last is not None:
            hold[self._gripper] = last[self._gripper]
        return hold

    def disconnect(self, keep_torque: bool = False) -> None:
        with self._lock:
            self._stopped = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self.env.close()

    # -------------------------------------------------------------- internals
    def _publish(self, obs: dict[str, np.ndarray], success: bool, done: bool) -> None:
        self._obs = {**obs, "timestamp": now(), "tick": self._tick, "success": success, "done": done}

    def _run(self) -> None:
        import time

        while True:
            with self._lock:
                while not self._running and not self._stopped:
                    self._wake.wait()
                if self._stopped:
                    return
                due = self._origin + (self._tick + 1) * self.dt
                episode = self._episode
            delay = due - now()
            if delay > 0:
                time.sleep(delay)
            with self._env_lock:
                self._step(episode)

    def _step(self, episode: int) -> None:
        with self._lock:
            if not self._running or self._stopped or episode != self._episode:
                return
            cmd = self._command
            self._command = None
            if cmd is None:
                self.missed_commands += 1
                cmd = self.hold_action(self._last)
            self._last = cmd
        try:
            obs, _, success, truncated, _ = self.env.step(cmd)
        except Exception as exc:  # surfaced to the loop through the done flag
            with self._lock:
                self.step_errors.append(f"{type(exc).__name__}: {exc}")
                self._running = False
                self._obs = {**self._obs, "done": True, "error": self.step_errors[-1]}
            return
        done = bool(success or truncated)
        with self._lock:
            self._tick += 1
            self.ticks += 1
            self._publish(obs, success=bool(success), done=done)
            if done:
                self._running = False
