"""Injected faults in the control loop: whatever breaks, the robot only ever receives finite,
in-bounds, rate-limited commands, and a fault ends with a hold."""

import math
import os
import signal
import threading
import time

import numpy as np
import pytest
import torch

from mixpolicy.deploy.local import LocalPolicy
from mixpolicy.deploy.clock import now, sleep_until
from mixpolicy.deploy.loop import ControlLoop, LoopConfig
from mixpolicy.deploy.rti import RTIConfig
from mixpolicy.deploy.safety import FAULTS, SafetyConfig
from mixpolicy.errors import UserError
from mixpolicy.policies.denoising_policy import DenoisingPolicy, ShapeMeta
from factories import tiny_policy_config
from test_deploy_loop import DIM, HZ, FakeRobot, ScriptedClient

LOW, HIGH, DELTA = -1.0, 1.0, 0.1
LIMITS = SafetyConfig(action_low=[LOW], action_high=[HIGH], max_delta=[DELTA], max_obs_age_ms=50)


class GuardedRobot(FakeRobot):
    """A real-arm stand-in: absolute targets, local limits only, and a send_action that
    asserts every command is finite, in bounds and within the delta limit of the last one."""

    needs_local_limits = True
    action_low = None
    action_high = None

    def __init__(self, pose=(0.5, -0.5), faults=None, **kw):
        super().__init__(**kw)
        self.pose = np.asarray(pose, float)
        self.faults = faults or {}  # name -> callable(tick) raising or returning a bad value, or None
        self.reads = 0

    def _tick(self):
        return int((now() - self.start) / self.dt)

    def get_observation(self):
        self.reads += 1
        fault = self.faults.get("get_observation")
        if fault is not None:
            fault(self._tick())
        obs = super().get_observation()
        ts = self.faults.get("timestamp")
        if ts is not None and obs["tick"] >= 3:
            obs["timestamp"] = ts(obs["timestamp"])
        return obs

    def send_action(self, action):
        a = np.asarray(action, float)
        assert a.shape == (DIM,) and np.all(np.isfinite(a)), a
        assert np.all(a >= LOW - 1e-9) and np.all(a <= HIGH + 1e-9), a
        ref = self.sent[-1] if self.sent else self.pose
        assert np.all(np.abs(a - ref) <= DELTA + 1e-9), (a, ref)
        fault = self.faults.get("send_action")
        if fault is not None:
            fault(len(self.sent))
        super().send_action(a)

    def hold_action(self, last):
        fault = self.faults.get("hold_action")
        if fault is not None:
            bad = fault(len(self.sent))
            if bad is not None:
                return bad
        return self.pose.copy() if last is None else np.array(last)


def run(client, robot, safety=LIMITS, ticks=40, **loop_kw):
    cfg = LoopConfig(control_hz=HZ, max_episode_ticks=ticks, initial_latency_ms=5.0, warmup_calls=0, **loop_kw)
    loop = ControlLoop(robot, client, cfg, safety)
    try:
        res = loop.run_episode("t", 0)
    finally:
        loop.close()
    if res.fault is not None:
        assert res.fault in FAULTS
    return res


def far_chunks(i, tick):
    return np.tile([-1.0, 1.0], (16, 1))  # the far corner from the pose (0.5, -0.5)


def raise_at(tick, exc):
    def fault(t):
        if t >= tick:
            raise exc

    return fault


@pytest.mark.slow
def test_the_first_action_is_rate_limited_from_the_current_pose():
    robot = GuardedRobot()
    res = run(ScriptedClient(make=far_chunks), robot, ticks=30)
    assert res.fault is None and res.calls >= 1 and res.holds >= 1  # no chunk at the first tick
    sent = np.array(robot.sent)
    np.testing.assert_allclose(sent[: res.holds], np.tile([0.5, -0.5], (res.holds, 1)))  # held at the pose
    np.testing.assert_allclose(sent[res.holds], [0.5 - DELTA, -0.5 + DELTA])  # then one delta toward the chunk
    assert np.abs(np.diff(sent, axis=0)).max() <= DELTA + 1e-9


@pytest.mark.slow
def test_a_remote_spec_marking_every_dim_discrete_does_not_switch_rate_limits_off():
    client = ScriptedClient(make=far_chunks)
    client.spec.discrete_action_dims = [0, 1]
    client.spec.action_low, client.spec.action_high = [-50.0] * DIM, [50.0] * DIM
    robot = GuardedRobot()
    res = run(client, robot, ticks=20)  # the robot's send_action asserts the local limits
    assert res.fault is None and len(robot.sent) == 20
    with pytest.raises(UserError, match="a real robot needs local limits"):
        run(client, GuardedRobot(), safety=SafetyConfig(max_obs_age_ms=50))


@pytest.mark.slow
def test_nan_hold_is_a_fault_and_the_last_safe_command_goes_out():
    robot = GuardedRobot(faults={"hold_action": lambda n: np.full(DIM, np.nan) if n >= 3 else None})
    res = run(ScriptedClient(make=far_chunks, delay=lambda i: 0.2), robot)
    assert res.fault == "bad_hold" and "finite" in res.fault_detail and res.hold_error is None
    assert len(robot.sent) == 4
    np.testing.assert_allclose(robot.sent[-1], robot.sent[-2])  # the last safe command, repeated


@pytest.mark.slow
def test_nan_hold_at_the_episode_start_sends_nothing():
    robot = GuardedRobot(faults={"hold_action": lambda n: np.full(DIM, np.nan)})
    res = run(ScriptedClient(), robot)
    assert res.fault == "bad_hold" and robot.sent == [] and "never read" in res.hold_error


@pytest.mark.slow
def test_a_pose_outside_the_bounds_sends_nothing():
    robot = GuardedRobot(pose=(0.0, 1.5))
    res = run(ScriptedClient(), robot)
    assert res.fault == "start_out_of_bounds" and "dims [1]" in res.fault_detail and robot.sent == []


@pytest.mark.slow
@pytest.mark.parametrize(
    "where, exc",
    [("get_observation", TimeoutError("camera read timed out")), ("send_action", OSError("serial write failed"))],
)
def test_a_raising_robot_call_is_a_robot_error_with_a_hold(where, exc):
    calls = {"n": 0}

    def fault(t):
        if t >= 10 and calls["n"] == 0:  # once: the hold that follows goes through
            calls["n"] += 1
            raise exc

    robot = GuardedRobot(faults={where: fault})
    res = run(ScriptedClient(make=far_chunks), robot)
    assert res.fault == "robot_error" and res.end == "fault"
    assert res.fault_detail == f"{where}: {type(exc).__name__}: {exc}"
    assert res.hold_error is None
    if where == "get_observation":
        np.testing.assert_allclose(robot.sent[-1], robot.sent[-2])  # hold: stay at the last target
    # else the hold repeats the command whose send failed (within the delta limit: the guard checked)


@pytest.mark.slow
def test_a_hold_that_cannot_be_sent_is_logged():
    robot = GuardedRobot(faults={"send_action": raise_at(5, OSError("port closed"))})
    res = run(ScriptedClient(make=far_chunks), robot)
    assert res.fault == "robot_error" and res.hold_error == "hold not sent: OSError: port closed"


@pytest.mark.slow
def test_wrong_shape_chunk_is_a_fault():
    res = run(ScriptedClient(make=lambda i, t: np.zeros((16, DIM + 1))), GuardedRobot())
    assert res.fault == "bad_chunk" and "(16, 3)" in res.fault_detail


@pytest.mark.slow
def test_nan_normalizer_refused_at_construction_or_caught_as_nan_action():
    torch.manual_seed(0)
    cfg = tiny_policy_config(horizon=8, n_action_steps=4, task_conditioning="none")
    cfg.objective.num_inference_steps = 2
    policy = DenoisingPolicy(cfg, ShapeMeta(obs={"state": [3]}, action_dim=DIM, discrete_action_dims=[]))
    policy.normalizer.params[cfg.action_key].scale.fill_(float("nan"))
    client = LocalPolicy(policy, RTIConfig(k=1))
    robot = FakeRobot()
    robot.action_low = robot.action_high = None  # bounds from the (broken) training range
    with pytest.raises(UserError, match="not finite"):
        ControlLoop(robot, client, LoopConfig(control_hz=HZ), SafetyConfig())
    guarded = GuardedRobot()
    res = run(client, guarded)  # local bounds: the NaN reaches the loop as a chunk, never the robot
    assert res.fault == "nan_action" and all(np.all(np.isfinite(a)) for a in guarded.sent)


@pytest.mark.slow
def test_no_first_chunk_within_the_deadline_is_a_fault():
    robot = GuardedRobot()
    res = run(ScriptedClient(delay=lambda i: 1.0), robot, ticks=200, first_chunk_timeout_s=0.1)
    assert res.fault == "first_chunk_timeout" and 5 <= res.ticks <= 40
    assert res.holds == len(robot.sent) - 1  # holds only, then the final hold


@pytest.mark.slow
@pytest.mark.parametrize("bad", [lambda ts: math.nan, lambda ts: ts + 10.0, lambda ts: math.inf])
def test_nan_or_future_timestamps_are_faults(bad):
    robot = GuardedRobot(faults={"timestamp": bad})
    res = run(ScriptedClient(make=far_chunks), robot)
    assert res.fault == "bad_timestamp" and 2 <= res.ticks <= 10


def test_sleep_until_refuses_a_deadline_that_is_never_reached():
    with pytest.raises(ValueError, match="not finite"):
        sleep_until(math.nan)


@pytest.mark.slow
def test_sigterm_stops_like_sigint():
    robot = GuardedRobot()
    loop = ControlLoop(robot, ScriptedClient(make=far_chunks), LoopConfig(control_hz=HZ, max_episode_ticks=500, warmup_calls=0), LIMITS)
    before = signal.getsignal(signal.SIGTERM)
    threading.Timer(0.1, lambda: os.kill(os.getpid(), signal.SIGTERM)).start()
    with loop.sigint_guard():
        res = loop.run_episode("t", 0)
    loop.close()
    assert res.fault == "sigterm" and res.ticks < 40 and res.hold_error is None
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.slow
def test_a_second_sigint_interrupts_a_blocking_read_after_a_hold():
    def block(t):
        if t >= 5:
            time.sleep(10)  # a serial read that never returns

    robot = GuardedRobot(faults={"get_observation": block})
    loop = ControlLoop(robot, ScriptedClient(make=far_chunks), LoopConfig(control_hz=HZ, max_episode_ticks=500, warmup_calls=0), LIMITS)
    for delay in (0.15, 0.25):
        threading.Timer(delay, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
    t0 = time.perf_counter()
    with pytest.raises(KeyboardInterrupt, match="second stop signal"):
        with loop.sigint_guard():
            loop.run_episode("t", 0)
    loop.close()
    assert time.perf_counter() - t0 < 2.0
    sent = len(robot.sent)
    assert sent >= 2 and np.allclose(robot.sent[-1], robot.sent[-2])  # the hold went out before the interrupt
