"""The delay estimate of the real-time loop, its agreement with the simulated-delay evaluation,
and the mid-episode perturbation."""

from __future__ import annotations

from collections import deque
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mixpolicy.config import ConfigError, from_dict
from mixpolicy.deploy import loop as loop_module
from mixpolicy.deploy.backend import InferenceResult, PolicySpec
from mixpolicy.deploy.delay import DelayEstimator, latency_ticks, wants_estimate
from mixpolicy.deploy.loop import ControlLoop, LoopConfig
from mixpolicy.deploy.rti import RTIConfig, RTISampler
from mixpolicy.deploy.safety import SafetyConfig
from mixpolicy.deploy.worker import InferenceWorker, LatencyEstimator, Reply
from mixpolicy.envs.chunking import ChunkPlanner, SlotChunks
from mixpolicy.policies.denoising_policy import ActionPlan

HZ = 50.0
DT = 1.0 / HZ
H, A, N_EXEC, STEPS = 12, 2, 4, 4
GOAL = np.array([1.0, -0.5])


# ---------------------------------------------------------------- the estimate
def test_latency_converts_to_ticks_rounding_up():
    assert latency_ticks(0.0, HZ) == 0
    assert latency_ticks(2 * DT, HZ) == 2  # exactly two periods: not 3 after float rounding
    assert latency_ticks(3 * 0.02, HZ) == 3
    assert latency_ticks(0.0201, HZ) == 2
    assert latency_ticks(0.001, 200.0) == 1


def test_estimate_excludes_the_cold_call_and_follows_latency_changes():
    est = DelayEstimator(HZ, window=4, quantile=0.9, initial_s=0.03)
    assert est.ticks(warm=True) == 2  # nothing measured: the initial estimate
    est.add(1.0, warm=False)  # the process's first call (cold): ignored
    assert est.ticks(warm=True) == 2
    for _ in range(4):
        est.add(0.05, warm=True)  # 2.5 periods
    assert est.ticks(warm=True) == 3
    ticks = []
    for _ in range(4):
        est.add(0.11, warm=True)
        ticks.append(est.ticks(warm=True))
    assert ticks[0] >= 3 and ticks[-1] == 6 and ticks == sorted(ticks)  # the rolling window follows the slower calls
    est.add(0.5, warm=False)  # full calls do not move a warm estimate ...
    assert est.ticks(warm=True) == 6
    assert DelayEstimator(HZ).ticks(warm=False) == 3  # ... and with no call of a kind measured, the other kind or the initial one


def test_auto_delay_config_and_when_the_loop_estimates():
    assert from_dict(RTIConfig, {"delay": "auto", "prefix": "hard"}).delay == "auto"
    assert from_dict(RTIConfig, {"delay": 3}).delay == 3
    for bad in ("fast", -1):
        with pytest.raises(ConfigError, match="rti.delay"):
            from_dict(RTIConfig, {"delay": bad})
    with pytest.raises(ConfigError, match="loop.delay_quantile"):
        LoopConfig(delay_quantile=0.0)
    assert wants_estimate({"prefix": "hard", "delay": "auto"})
    assert not wants_estimate({"prefix": "none", "delay": "auto"})
    assert not wants_estimate({"prefix": "hard", "delay": 2})
    assert not wants_estimate(None)


# ---------------------------------------------------------------- a fake clock, worker, robot and policy
class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def now(self):
        return self.t

    def sleep_until(self, t, spin=0.0):
        self.t = max(self.t, t)
        return self.t


class TickWorker:
    """Runs each call when it is submitted; the reply appears ``latency_ticks(i)`` periods later on the fake clock."""

    record = InferenceWorker.record

    def __init__(self, client, clock, latency_ticks_of_call, initial_s, delay):
        self.client, self.clock, self.ticks_of = client, clock, latency_ticks_of_call
        self.latency = LatencyEstimator(initial_s=initial_s)
        self.delay = delay
        self.pending: tuple[float, Reply] | None = None
        self.calls = 0

    @property
    def busy(self):
        return self.pending is not None and self.clock.now() < self.pending[0] - 1e-9

    def submit(self, req):
        if self.pending is not None:
            return False
        extra = {} if req.delay is None else {"delay": req.delay}
        result = self.client.infer(req.obs, req.task, req.shift, **extra)
        latency = self.ticks_of(self.calls) * DT
        self.calls += 1
        self.pending = (self.clock.now() + latency, Reply(req, result, None, latency))
        return True

    def poll(self):
        if self.pending is None or self.busy:
            return None
        reply = self.pending[1]
        self.pending = None
        self.record(reply.latency_s, reply.result.warm)
        return reply

    def wait(self, timeout=None):
        return None

    def close(self):
        pass


class IntegratorRobot:
    """x <- x + action at every tick; observation n is published at t0 + n * dt."""

    action_low = np.full(A, -10.0)
    action_high = np.full(A, 10.0)

    def __init__(self, clock):
        self.clock = clock
        self.sent: list[np.ndarray] = []

    def connect(self):
        pass

    def start_episode(self, seed=None):
        self.x, self.tick, self.t0 = np.zeros(A), 0, self.clock.now()

    def get_observation(self):
        return {"state": self.x.astype(np.float32), "tick": self.tick, "timestamp": self.t0 + self.tick * DT}

    def send_action(self, action):
        self.sent.append(np.array(action))
        self.x = self.x + action
        self.tick += 1

    def hold_action(self, last):
        return np.zeros(A)

    def disconnect(self, keep_torque=False):
        pass


class GoalPolicy(torch.nn.Module):
    """A deterministic planner towards GOAL that uses the warm start and a hard prefix, logging every call."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.cfg = SimpleNamespace(objective=SimpleNamespace(num_inference_steps=STEPS), horizon=H, discrete_action_scale=1.0, action_key="action")
        self.shape_meta = SimpleNamespace(discrete_action_dims=[], action_dim=A)
        self.objective = SimpleNamespace(schedule=lambda n: torch.linspace(1.0, 0.0, n), warm_start_noise=None)
        self.prefix_conditioned = False
        self.adaptive_execution = False
        self.calls: list[tuple] = []

    def plan(self, obs, generator=None, num_steps=None, warm_start=None, prefix=None):
        x = obs["state"][:, -1].float()
        ramp = torch.linspace(0.2, 0.05, H)[None, :, None]
        chunk = ramp * (torch.as_tensor(GOAL, dtype=torch.float32) - x)[:, None, :]
        if warm_start is not None:
            chunk = 0.5 * chunk + 0.5 * warm_start.guess
        if prefix is not None:
            chunk[:, : prefix.frozen] = prefix.target[:, : prefix.frozen]
        self.calls.append((None if warm_start is None else warm_start.start, None if prefix is None else prefix.frozen, round(float(x.sum()), 5)))
        return ActionPlan(chunk, torch.full((len(x),), N_EXEC), normalized=chunk.clone(), steps=STEPS, warm=warm_start is not None)


class SamplerClient:
    """The deploy sampler (RTISampler) around a policy, as the local backend serves it."""

    def __init__(self, policy, rti):
        self.sampler = RTISampler(policy, rti)
        extra = {"rti": {"prefix": rti.prefix, "delay": rti.delay}}
        self.spec = PolicySpec(["state"], 1, H, N_EXEC, A, [], [], [-10.0] * A, [10.0] * A, self.sampler.full_steps, self.sampler.warm_steps, extra=extra)

    def infer(self, obs, task=0, shift=None, delay=None):
        res = self.sampler({"state": torch.as_tensor(obs["state"])[None]}, shift=shift, delay=delay)
        return InferenceResult(res.actions[0].numpy(), res.steps, res.warm, 0.0)

    def reset(self):
        self.sampler.reset()

    def close(self):
        pass


def run_loop(monkeypatch, client, ticks, latency_ticks_of_call, initial_ticks, **loop_kw):
    clock = FakeClock()
    monkeypatch.setattr(loop_module, "now", clock.now)
    monkeypatch.setattr(loop_module, "sleep_until", clock.sleep_until)
    robot = IntegratorRobot(clock)
    cfg = LoopConfig(control_hz=HZ, max_episode_ticks=ticks, warmup_calls=0, initial_latency_ms=1e3 * initial_ticks * DT, execute_steps=N_EXEC, **loop_kw)
    loop = ControlLoop(robot, client, cfg, SafetyConfig())
    delay = loop.worker.delay
    loop.worker.close()
    loop.worker = TickWorker(client, clock, latency_ticks_of_call, cfg.initial_latency_ms / 1e3, delay)
    result = loop.run_episode("t", 0)
    return robot, result


def simulate(planner, steps):
    """The simulated-delay evaluation's rollout (envs/evaluate.py) for one environment on the integrator."""
    slot = SimpleNamespace(queue=deque(), steps=0, chunks=SlotChunks())
    x, executed = np.zeros(A), []
    while slot.steps < steps:
        if planner.wants_chunk(slot):
            ((chunk, n, norm),) = planner.plan([slot], {"state": torch.as_tensor(x.astype(np.float32))[None, None]}, None)
            planner.accept(slot, chunk, n, norm)
        action = planner.next_action(slot)
        x = x + action
        executed.append(np.asarray(action, np.float64))
        slot.steps += 1
    return np.array(executed)


# ---------------------------------------------------------------- the loop with the estimate
def test_the_loop_sends_its_delay_estimate_and_follows_a_latency_change(monkeypatch):
    client = SamplerClient(GoalPolicy(), RTIConfig(k=2, prefix="hard", delay="auto"))
    # call 0 is the process's first (cold, 6 ticks), calls 1-5 take 2 ticks, later ones 3
    lat = lambda i: 6 if i == 0 else (2 if i < 6 else 3)  # noqa: E731
    _, res = run_loop(monkeypatch, client, 80, lat, initial_ticks=2, delay_window=3, latency_margin_ticks=0)
    assert res.fault is None, res.fault_detail
    assert res.delays[:5] == [2] * 5  # the cold call never entered the estimate
    assert res.delays[-1] == 3 and res.delays == sorted(res.delays)
    frozen = [f for _, f, _ in client.sampler.policy.calls[1:]]
    assert frozen == res.delays  # each call's frozen prefix is the estimate it was sent


def test_a_fixed_delay_is_not_estimated(monkeypatch):
    client = SamplerClient(GoalPolicy(), RTIConfig(k=2, prefix="hard", delay=1))
    _, res = run_loop(monkeypatch, client, 30, lambda i: 2, initial_ticks=2)
    assert res.fault is None and res.delays == []
    assert {f for _, f, _ in client.sampler.policy.calls[1:]} == {1}


# ---------------------------------------------------------------- real-time loop == simulated-delay evaluation
@pytest.mark.parametrize("mode", ["naive", "rti", "rtc", "rti+rtc"])
@pytest.mark.parametrize("d", [1, 2, 3])
def test_the_real_time_loop_at_a_measured_delay_executes_what_the_simulation_does(monkeypatch, mode, d):
    ticks = 40
    rti = RTIConfig(enabled="rti" in mode, k=2, renoise=True, prefix="hard" if "rtc" in mode else "none", delay="auto")
    client = SamplerClient(GoalPolicy(), rti)
    robot, res = run_loop(monkeypatch, client, ticks + d, lambda i: d, initial_ticks=d)
    assert res.fault is None, res.fault_detail
    sent = np.array(robot.sent)
    assert np.all(sent[:d] == 0) and res.holds == d  # the robot holds until the first chunk arrives

    sim_policy = GoalPolicy()
    planner = ChunkPlanner(sim_policy, mode, delay=d, rti_k=2, prefix="hard")
    executed = simulate(planner, ticks)
    np.testing.assert_allclose(sent[d : d + ticks], executed, atol=1e-6)
    # The same calls: warm start index, frozen prefix, and the observation each was planned from.
    loop_calls = client.sampler.policy.calls
    assert loop_calls == sim_policy.calls[: len(loop_calls)] and len(loop_calls) >= ticks // N_EXEC
    if "rtc" in mode:
        assert res.delays and set(res.delays) == {d}


# ---------------------------------------------------------------- the perturbation
def _goal_track(task, kind, seed, step=3):
    from mixpolicy.envs.metaworld_env import MetaWorldEnv
    from mixpolicy.envs.perturb import Perturbation, PerturbedEnv

    env = PerturbedEnv(MetaWorldEnv(task), Perturbation(kind, step, 0.1))
    obs, _ = env.reset(seed=seed)
    track = [obs["state"].copy()]
    for _ in range(step + 2):
        obs, *_ = env.step(np.zeros(4))
        track.append(obs["state"].copy())
    env.close()
    return np.array(track), env.applied


@pytest.mark.parametrize("task", ["reach-v3", "push-v3"])
def test_the_goal_moves_at_the_step_and_is_the_same_for_a_seed(task):
    pytest.importorskip("metaworld")
    track, applied = _goal_track(task, "goal", 100_000)
    goal = track[:, -3:]
    assert np.allclose(goal[:4], goal[0])  # unchanged before the step (obs after steps 0, 1, 2)
    moved = np.linalg.norm(goal[4] - goal[0])
    assert 0.05 < moved <= 0.1 + 1e-6 and np.allclose(goal[4:], goal[4]) and np.allclose(goal[4], applied, atol=1e-6)
    again, _ = _goal_track(task, "goal", 100_000)
    other, _ = _goal_track(task, "goal", 100_001)
    assert np.array_equal(again, track)  # deterministic per seed
    assert not np.allclose(other[4, -3:] - other[0, -3:], goal[4] - goal[0])  # another seed, another direction


def test_the_object_is_pushed_at_the_step():
    pytest.importorskip("metaworld")
    track, _ = _goal_track("push-v3", "object", 100_000)
    obj = track[:, 4:7]
    assert np.linalg.norm(obj[3] - obj[0]) < 1e-3 and 0.09 < np.linalg.norm(obj[4] - obj[3]) < 0.11
    assert np.allclose(track[:, -3:], track[0, -3:])  # the goal stays


def test_unsupported_perturbations_are_refused_in_one_line():
    from mixpolicy.envs.eval_config import EvalConfig
    from mixpolicy.errors import UserError

    with pytest.raises(UserError, match=r"perturb=object does not apply to reach-v3; it supports push-v3"):
        EvalConfig(checkpoint="c", tasks=["reach-v3"], perturb="object")
    with pytest.raises(UserError, match="perturb=goal does not apply to door-open-v3"):
        EvalConfig(checkpoint="c", tasks=["reach-v3", "door-open-v3"], perturb="goal")
    with pytest.raises(ConfigError, match="'perturb'"):
        EvalConfig(checkpoint="c", perturb="wind")
    with pytest.raises(UserError, match="env=metaworld only"):
        EvalConfig(checkpoint="c", env="pusht", perturb="goal")
    assert EvalConfig(checkpoint="c", tasks=["push-v3"], perturb="object").perturb_step == 30


def test_the_deploy_report_shows_the_estimated_delay(monkeypatch, tmp_path):
    from mixpolicy.deploy.loop import CYCLE_COLUMNS
    from mixpolicy.deploy.report import format_summary, summarize
    from mixpolicy.deploy.runner import CycleLog

    client = SamplerClient(GoalPolicy(), RTIConfig(k=2, prefix="hard", delay="auto"))
    _, res = run_loop(monkeypatch, client, 30, lambda i: 3, initial_ticks=3)
    log = CycleLog(tmp_path / "log.jsonl", {"dt": DT})
    log.cycles([tuple(0.0 for _ in CYCLE_COLUMNS)])
    log.episode(res)
    log.close()
    s = summarize(tmp_path / "log.jsonl")
    assert s["estimated_delay_ticks"]["median"] == 3 and s["estimated_delay_ticks"]["n"] == len(res.delays) > 3
    assert "estimated delay (auto)" in format_summary(s)


class LateRobot(IntegratorRobot):
    """Publishes every observation one tick late."""

    def start_episode(self, seed=None):
        super().start_episode(seed)
        self.published = [self.x.copy()]

    def get_observation(self):
        tick = max(0, self.tick - 1)
        return {"state": self.published[tick].astype(np.float32), "tick": tick, "timestamp": self.t0 + tick * DT}

    def send_action(self, action):
        super().send_action(action)
        self.published.append(self.x.copy())


def test_an_observation_older_than_the_first_chunk_gets_shift_zero(monkeypatch):
    """The first chunk starts on its arrival tick; a late observation read then is no negative shift."""
    clock = FakeClock()
    monkeypatch.setattr(loop_module, "now", clock.now)
    monkeypatch.setattr(loop_module, "sleep_until", clock.sleep_until)
    shifts = []
    client = SamplerClient(GoalPolicy(), RTIConfig(k=2))
    infer = client.infer
    client.infer = lambda obs, task=0, shift=None, **kw: (shifts.append(shift), infer(obs, task, shift, **kw))[1]
    robot = LateRobot(clock)
    cfg = LoopConfig(control_hz=HZ, max_episode_ticks=30, warmup_calls=0, initial_latency_ms=1e3 * 5 * DT, execute_steps=N_EXEC)
    loop = ControlLoop(robot, client, cfg, SafetyConfig())
    loop.worker.close()
    loop.worker = TickWorker(client, clock, lambda i: 5, cfg.initial_latency_ms / 1e3, None)
    res = loop.run_episode("t", 0)
    assert res.fault is None, res.fault_detail
    assert shifts[0] is None and shifts[1] == 0 and all(s >= 0 for s in shifts[1:])
