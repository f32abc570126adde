"""The control loop in real time: scheduling, RTI shifts, and one test per injected fault."""

import functools
import os
import signal
import threading
import time

import numpy as np
import pytest
import torch

from mixpolicy.deploy.backend import InferenceResult, PolicySpec
from mixpolicy.deploy.local import LocalPolicy
from mixpolicy.deploy.clock import RealtimeSettings, now
from mixpolicy.deploy.loop import ControlLoop, LoopConfig
from mixpolicy.deploy.rti import RTIConfig
from mixpolicy.deploy.safety import SafetyConfig
from mixpolicy.policies.denoising_policy import DenoisingPolicy, ShapeMeta
from factories import tiny_policy_config

HZ = 100.0
DIM = 2


class FakeRobot:
    """Publishes observation n at start + n * dt (computed on read) and records commands."""

    action_dim = DIM
    action_low = np.array([-1.0, -1.0])
    action_high = np.array([1.0, 1.0])

    def __init__(self, hz=HZ, freeze_after=None):
        self.dt = 1.0 / hz
        self.freeze_after = freeze_after
        self.sent: list[np.ndarray] = []

    def connect(self):
        pass

    def start_episode(self, seed=None):
        self.start = now()

    def get_observation(self):
        tick = int((now() - self.start) / self.dt)
        if self.freeze_after is not None:
            tick = min(tick, self.freeze_after)
        return {"state": np.full(3, float(tick), np.float32), "tick": tick, "timestamp": self.start + tick * self.dt}

    def send_action(self, action):
        self.sent.append(np.array(action))

    def hold_action(self, last):
        return np.zeros(DIM)

    def disconnect(self):
        pass


class ScriptedClient:
    """Returns chunk ``make(call_index, obs_tick)``; records shifts; optional delays/errors."""

    def __init__(self, make=None, delay=None, horizon=16, n_action_steps=4):
        self.spec = PolicySpec(["state"], 1, horizon, n_action_steps, DIM, [], [], [-1.0] * DIM, [1.0] * DIM, 4, 1)
        self.make = make or (lambda i, tick: np.zeros((horizon, DIM)))
        self.delay = delay or (lambda i: 0.001)
        self.calls = []
        self.resets = 0

    def infer(self, obs, task=0, shift=None):
        i = len(self.calls)
        tick = int(obs["state"][-1, 0])
        self.calls.append((tick, shift))
        time.sleep(self.delay(i))
        actions = self.make(i, tick)
        if isinstance(actions, Exception):
            raise actions
        return InferenceResult(np.asarray(actions, np.float32), 1 if shift else 4, bool(shift), 0.0)

    def reset(self):
        self.resets += 1

    def close(self):
        pass


_LOOPS: list[ControlLoop] = []  # the loops the running attempt of a test created


def _descheduled(loop: ControlLoop) -> bool:
    """The process lost whole periods (skipped ticks) or woke more than half a period late."""
    return any(row[10] > 0 or row[3] > 500.0 / HZ for row in loop.rows)


def realtime(test):
    """Reruns a timing-exact test (up to 3 attempts) only when its failed attempt's loop was
    descheduled by other load on the machine; a failure on an undisturbed run fails at once."""

    @functools.wraps(test)
    def wrapper(*args, **kwargs):
        for attempt in range(3):
            _LOOPS.clear()
            try:
                return test(*args, **kwargs)
            except AssertionError:
                if attempt == 2 or not any(_descheduled(loop) for loop in _LOOPS):
                    raise

    return wrapper


def run(client, robot=None, safety=None, ticks=30, **loop_kw):
    robot = robot or FakeRobot()
    loop_kw = {"warmup_calls": 0, **loop_kw}
    cfg = LoopConfig(control_hz=HZ, max_episode_ticks=ticks, initial_latency_ms=5.0, **loop_kw)
    loop = ControlLoop(robot, client, cfg, safety or SafetyConfig(max_obs_age_ms=50))
    _LOOPS.append(loop)
    try:
        with RealtimeSettings(gc_freeze=True):  # as the runner does: a full collection of the test heap costs ticks
            result = loop.run_episode("t", 0)
    finally:
        loop.close()
    return loop, robot, result


@pytest.mark.slow
@realtime
def test_loop_replans_every_execute_steps_and_passes_the_tick_shift():
    client = ScriptedClient()
    loop, robot, res = run(client, ticks=30, execute_steps=4)
    assert res.fault is None and res.end == "max_ticks" and res.ticks == 30
    assert len(robot.sent) == 30
    ticks = [t for t, _ in client.calls]
    shifts = [s for _, s in client.calls]
    assert shifts[0] is None  # the first call of an episode denoises fully
    # RTI's shift = control steps since the previous chunk's action 0 was due: its observation's
    # tick, except for the episode's first chunk, which starts when it arrives (after the holds)
    assert shifts[1] == ticks[1] - ticks[0] - res.holds
    assert shifts[2:] == list(np.diff(ticks)[1:])
    assert all(s == 4 for s in shifts[2:-1])
    assert client.resets == 1
    rows = np.array(loop.rows, float)
    assert rows.shape == (30, 12)
    assert res.holds <= 2  # only until the first chunk arrived


@pytest.mark.slow
@realtime
def test_action_timestamps_select_the_chunk_entry_for_each_tick():
    # Each chunk entry encodes the tick it is meant for: tick / 100.
    client = ScriptedClient(make=lambda i, tick: np.stack([np.full(DIM, (tick + j) / 100) for j in range(16)]), delay=lambda i: 0.015)
    _, robot, res = run(client, ticks=25, execute_steps=4)
    assert res.fault is None
    executed = [a[0] for a in robot.sent if a[0] != 0.0]
    deltas = list(np.round(np.diff(executed) * 100).astype(int))
    # Consecutive ticks, none repeated or skipped; the first chunk started when it arrived
    # (after the holds), so the second one takes over `holds` entries further on.
    assert len(executed) > 15 and res.holds >= 1
    assert deltas.count(res.holds + 1) == 1 and set(deltas) == {1, res.holds + 1}


@pytest.mark.slow
@realtime
def test_nan_output_holds_and_stops():
    client = ScriptedClient(make=lambda i, tick: np.full((16, DIM), np.nan) if i == 2 else np.full((16, DIM), 0.5))
    loop, robot, res = run(client, ticks=40, execute_steps=2)
    assert res.fault == "nan_action" and res.end == "fault"
    np.testing.assert_array_equal(robot.sent[-1], np.zeros(DIM))  # the hold action went out last
    assert all(np.all(np.isfinite(a)) for a in robot.sent)


@pytest.mark.slow
@realtime
def test_stale_observation_holds_and_stops():
    client = ScriptedClient(make=lambda i, tick: np.full((16, DIM), 0.5))
    _, robot, res = run(client, robot=FakeRobot(freeze_after=5), ticks=40, safety=SafetyConfig(max_obs_age_ms=30))
    assert res.fault == "stale_observation" and "ms old" in res.fault_detail
    assert 5 <= res.ticks <= 10
    np.testing.assert_array_equal(robot.sent[-1], np.zeros(DIM))


@pytest.mark.slow
@realtime
def test_inference_overrun_beyond_the_queue_stops():
    # The third call takes 0.3 s while the queue holds at most 16 ticks = 160 ms.
    client = ScriptedClient(delay=lambda i: 0.3 if i == 2 else 0.001)
    _, robot, res = run(client, ticks=60, execute_steps=4)
    assert res.fault == "inference_overrun"
    np.testing.assert_array_equal(robot.sent[-1], np.zeros(DIM))


@pytest.mark.slow
@realtime
def test_overrun_can_hold_instead_of_stopping():
    client = ScriptedClient(delay=lambda i: 0.2 if i == 2 else 0.001)
    _, _, res = run(client, ticks=60, execute_steps=4, safety=SafetyConfig(max_obs_age_ms=50, stop_on_overrun=False))
    assert res.fault is None and res.holds > 5


@pytest.mark.slow
@realtime
def test_inference_error_stops():
    client = ScriptedClient(make=lambda i, tick: RuntimeError("GPU fell off") if i == 1 else np.zeros((16, DIM)))
    _, _, res = run(client, ticks=40)
    assert res.fault == "inference_error" and "GPU fell off" in res.fault_detail


@pytest.mark.slow
@realtime
def test_estop_from_another_thread_stops_within_a_period():
    client = ScriptedClient(make=lambda i, tick: np.full((16, DIM), 0.5))
    robot = FakeRobot()
    loop = ControlLoop(robot, client, LoopConfig(control_hz=HZ, max_episode_ticks=500, warmup_calls=0), SafetyConfig())
    _LOOPS.append(loop)
    stamp = {}

    def press():
        stamp["t"] = now()
        loop.estop()

    threading.Timer(0.15, press).start()
    res = loop.run_episode("t", 0)
    stopped = now()
    loop.close()
    assert res.fault == "estop" and res.ticks < 30
    assert stopped - stamp["t"] < 2.0 / HZ
    np.testing.assert_array_equal(robot.sent[-1], np.zeros(DIM))


@pytest.mark.slow
@realtime
def test_sigint_stops_safely_and_restores_the_handler():
    client = ScriptedClient(make=lambda i, tick: np.full((16, DIM), 0.5))
    robot = FakeRobot()
    loop = ControlLoop(robot, client, LoopConfig(control_hz=HZ, max_episode_ticks=500, warmup_calls=0), SafetyConfig())
    _LOOPS.append(loop)
    before = signal.getsignal(signal.SIGINT)
    threading.Timer(0.15, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
    with loop.sigint_guard():
        res = loop.run_episode("t", 0)
    loop.close()
    assert res.fault == "sigint" and res.ticks < 30
    assert signal.getsignal(signal.SIGINT) is before
    np.testing.assert_array_equal(robot.sent[-1], np.zeros(DIM))


@pytest.mark.slow
@realtime
def test_bounds_delta_and_jerk_hold_across_chunk_seams():
    # Chunks alternate between -2 and +2: every seam is a jump of 4, beyond the bounds.
    client = ScriptedClient(make=lambda i, tick: np.full((16, DIM), 2.0 if i % 2 else -2.0))
    safety = SafetyConfig(max_obs_age_ms=50, max_delta=[0.2], max_jerk=[0.05])
    loop, robot, res = run(client, safety=safety, ticks=50, execute_steps=3)
    # seam jump: the new chunk's action (2) against the last executed, bounded one (-1)
    assert res.fault is None and res.max_seam_jump == pytest.approx(3.0)
    sent = np.array(robot.sent[res.holds :])
    assert np.all(np.abs(sent) <= 1.0 + 1e-9)
    d = np.diff(sent, axis=0)
    assert np.all(np.abs(d) <= 0.2 + 1e-9)
    assert np.all(np.abs(np.diff(d, axis=0)) <= 0.05 + 1e-9)
    assert res.clipped > 10


@pytest.mark.slow
@realtime
def test_real_policy_in_the_loop_with_rti(monkeypatch):
    torch.manual_seed(0)
    cfg = tiny_policy_config(horizon=8, n_action_steps=4, task_conditioning="none")
    cfg.objective.num_inference_steps = 4
    policy = DenoisingPolicy(cfg, ShapeMeta(obs={"state": [3]}, action_dim=DIM, discrete_action_dims=[]))
    client = LocalPolicy(policy, RTIConfig(k=1))
    loop, robot, res = run(client, ticks=40, execute_steps=4, warmup_calls=2)
    assert res.fault is None and res.calls >= 5
    assert res.denoise_steps == 4 + (res.calls - 1) * 1  # full first call, then k=1
    assert res.ticks == 40 and len(robot.sent) == len(loop.rows) == 40


class FakeLeRobot:
    """Duck-typed stand-in for a lerobot.robots.Robot (lerobot itself is an optional extra)."""

    observation_features = {"shoulder.pos": float, "elbow.pos": float, "front": (4, 4, 3)}
    action_features = {"shoulder.pos": float, "elbow.pos": float}

    def __init__(self):
        self.is_connected = False
        self.sent = []

    def connect(self):
        self.is_connected = True

    def get_observation(self):
        return {"shoulder.pos": 0.5, "elbow.pos": -0.25, "front": np.zeros((4, 4, 3), np.uint8)}

    def send_action(self, action):
        self.sent.append(action)
        return action

    def disconnect(self):
        self.is_connected = False


def test_lerobot_adapter_maps_features_and_holds_the_joints():
    from mixpolicy.deploy.lerobot_robot import LeRobotRobot
    from mixpolicy.errors import UserError

    inner = FakeLeRobot()
    robot = LeRobotRobot(inner, control_hz=HZ)
    robot.connect()
    robot.start_episode()
    obs = robot.get_observation()
    np.testing.assert_array_equal(obs["state"], [0.5, -0.25])
    assert obs["image_front"].shape == (4, 4, 3) and obs["tick"] == 0
    robot.send_action(np.array([0.1, 0.2]))
    assert inner.sent[-1] == {"shoulder.pos": 0.1, "elbow.pos": 0.2}
    np.testing.assert_array_equal(robot.hold_action(None), [0.1, 0.2])  # absolute targets: repeat the last
    np.testing.assert_array_equal(LeRobotRobot(FakeLeRobot(), HZ).hold_action(None), [0.5, -0.25])  # or stay put
    robot.disconnect()
    assert not inner.is_connected
    with pytest.raises(UserError, match="not scalar observation features"):
        LeRobotRobot(FakeLeRobot(), HZ, state_features=["wrist.pos"])


def test_latency_estimate_ignores_the_cold_call():
    from mixpolicy.deploy.worker import LatencyEstimator

    est = LatencyEstimator(initial_s=0.05)
    assert est.estimate(warm=True) == 0.05
    est.add(2.0, warm=False)  # cold first call
    assert est.cold_s == 2.0 and est.estimate(warm=False) == 0.05
    for x in (0.010, 0.011, 0.012):
        est.add(x, warm=True)
    est.add(0.030, warm=False)
    assert est.estimate(warm=True) == pytest.approx(np.quantile([0.010, 0.011, 0.012], 0.9))
    assert est.estimate(warm=False) == pytest.approx(0.030)


@pytest.mark.slow
@realtime
def test_next_call_starts_early_enough_when_the_queue_would_run_dry():
    # execute_steps equals the horizon: only the latency-based trigger can prevent an
    # overrun. Calls take 35 ms = 3.5 ticks; the estimate is learned from warm calls.
    client = ScriptedClient(delay=lambda i: 0.035, horizon=16, make=lambda i, tick: np.zeros((16, DIM)))
    _, _, res = run(client, ticks=60, execute_steps=16, warmup_calls=2)
    assert res.fault is None and res.holds <= 8  # holds only before the first chunk
    shifts = [s for _, s in client.calls[3:]]
    assert max(shifts) <= 16 - 4  # started at least ceil(3.5) ticks before the queue's end


def test_objects_made_by_an_episode_reset_are_frozen_before_its_first_tick():
    """A full collection inside an episode would rescan whatever the reset made (an
    environment, lazy imports): the loop moves it to the permanent generation first."""
    import gc

    class AllocatingRobot(FakeRobot):
        def start_episode(self, seed=None):
            self.garbage = [[i] for i in range(20_000)]  # lists: containers a collection scans
            self.frozen_at_reset = gc.get_freeze_count()
            super().start_episode(seed)

        def get_observation(self):
            if not hasattr(self, "frozen_at_first_obs"):
                self.frozen_at_first_obs = gc.get_freeze_count()
            return super().get_observation()

    for freeze in (True, False):
        robot = AllocatingRobot()
        run(ScriptedClient(), robot=robot, ticks=3, gc_freeze=freeze)
        frozen = robot.frozen_at_first_obs - robot.frozen_at_reset  # frozen between the reset and the first observation
        assert (frozen >= 20_000) if freeze else (frozen == 0), (freeze, frozen)


def test_periods_lost_at_the_end_of_an_episode_are_not_run_past_it(monkeypatch):
    import mixpolicy.deploy.loop as loop_module

    real, calls = loop_module.sleep_until, []

    def late_near_the_end(due, spin):
        calls.append(due)
        wake = real(due, spin)
        return wake + 5.0 / HZ if len(calls) == 28 else wake  # tick 27 wakes 5 periods late

    monkeypatch.setattr(loop_module, "sleep_until", late_near_the_end)
    loop, robot, res = run(ScriptedClient(), ticks=30, execute_steps=4)
    first = loop.rows[0][1]
    assert res.end == "max_ticks" and res.ticks == 30 and res.missed >= 5
    assert max(row[1] for row in loop.rows) - first < 30  # no tick beyond the episode's 30
    assert len(robot.sent) == len(loop.rows) == 27
