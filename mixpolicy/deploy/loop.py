"""The fixed-rate control loop.

Tick ``n`` of an episode is due at ``origin + n * dt`` on the monotonic clock, with the
origin half a period after the robot's first observation so that the loop reads each
observation soon after the robot publishes it and its action reaches the robot before
the robot's next step. At the episode start the safety filter is seeded with the robot's
current pose (its hold action), so the first action is rate-limited too. Every tick the loop

1. waits precisely until the tick is due (jitter = wake-up time - due time);
2. checks the stop conditions (e-stop, SIGINT, SIGTERM) and reads the newest observation
   (a fault if it is older than ``safety.max_obs_age_ms`` or its timestamp is not
   finite or in the future);
3. merges a chunk the inference worker finished (a non-finite or wrong-shape chunk is a
   fault; so is no chunk ``loop.first_chunk_timeout_s`` after the episode start); the
   episode's first chunk starts at the tick it arrives (the robot held still meanwhile),
   every later one at its observation's tick, so its first ``latency`` actions are past;
4. starts the next inference when the worker is idle and either ``execute_steps`` ticks
   passed since the last request's observation (or the executable count the newest chunk
   came with, when the policy chooses it: mixture of horizons' adaptive execution) or the
   queue would run dry before a new chunk could arrive (from the latency estimate plus
   ``latency_margin_ticks``); with ``rti.delay: auto`` each call carries the estimated
   delay in ticks as its frozen prefix (:mod:`mixpolicy.deploy.delay`);
5. pops the action for this tick (past ones are dropped), or the hold action when none is
   queued, passes it through the safety filter, checks it once more and sends it; a queue
   that ran dry after the first chunk is an overrun.

The loop never waits for inference. A fault, or an exception from any robot or policy
call, sends a filtered hold action (best effort) and ends the run with the fault recorded.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from typing import Any, Callable

import numpy as np

from mixpolicy.deploy.action_queue import ActionQueue
from mixpolicy.deploy.backend import PolicyClient
from mixpolicy.deploy.clock import freeze_heap, now, sleep_until
from mixpolicy.deploy.delay import DelayEstimator, latency_ticks, wants_estimate
from mixpolicy.deploy.loop_config import CLOCK_TOLERANCE_S, CYCLE_COLUMNS, EpisodeResult, Fault, LoopConfig  # noqa: F401 (re-exported)
from mixpolicy.deploy.safety import SafetyConfig, SafetyFilter, StopSignals
from mixpolicy.deploy.worker import InferenceWorker, Request


class ControlLoop:
    def __init__(self, robot, client: PolicyClient, cfg: LoopConfig, safety: SafetyConfig, on_cycle: Callable[[tuple], None] | None = None):
        self.robot = robot
        self.client = client
        self.cfg = cfg
        self.spec = client.spec
        self.dt = 1.0 / cfg.control_hz
        self.execute_steps = cfg.execute_steps or self.spec.n_action_steps
        self.safety_cfg = safety
        self.rebind(robot)
        self.queue = ActionQueue(self.spec.action_dim, cfg.seam, cfg.blend_steps, cfg.ensemble_coeff, self.spec.discrete_action_dims)
        self.continuous = np.ones(self.spec.action_dim, bool)
        self.continuous[list(self.spec.discrete_action_dims)] = False
        # rti.delay=auto: the frozen prefix of each call is estimated from the latency of the calls that carry one.
        self.auto_delay = wants_estimate(self.spec.extra.get("rti"))
        self.prefix_calls_warm = self.spec.warm_steps < self.spec.full_steps
        delay = DelayEstimator(cfg.control_hz, cfg.delay_window, cfg.delay_quantile, cfg.initial_latency_ms / 1e3) if self.auto_delay else None
        self.worker = InferenceWorker(client, initial_latency_s=cfg.initial_latency_ms / 1e3, delay=delay)
        self.rows: list[tuple] = []
        self.on_cycle = on_cycle
        self._estop = threading.Event()
        self.signals = StopSignals()
        self.episode = -1
        self.warmed_up = False

    def rebind(self, robot) -> "ControlLoop":
        """Drive another robot (e.g. the next task's simulator) with the same worker."""
        self.robot = robot
        low = robot.action_low if getattr(robot, "action_low", None) is not None else self.spec.action_low
        high = robot.action_high if getattr(robot, "action_high", None) is not None else self.spec.action_high
        # A real robot takes its limits from the local config only, never from a (remote) policy spec.
        local = bool(getattr(robot, "needs_local_limits", False))
        self.safety = SafetyFilter.from_config(self.safety_cfg, self.spec.action_dim, low, high, self.spec.discrete_action_dims, local_limits=local)
        return self

    # ------------------------------------------------------------------ control
    def estop(self) -> None:
        """Stop as soon as possible (at the next tick, within one period): hold and end the run."""
        self._estop.set()

    def sigint_guard(self) -> StopSignals:
        """Context manager: SIGINT/SIGTERM stop the loop safely; a second one raises KeyboardInterrupt."""
        return self.signals

    def close(self) -> None:
        self.worker.close()

    def _hold(self, last: np.ndarray | None) -> np.ndarray:
        hold = np.asarray(self.robot.hold_action(last), np.float64)
        if hold.shape != (self.spec.action_dim,) or not np.all(np.isfinite(hold)):
            raise Fault("bad_hold", f"the robot's hold action {hold.tolist()} is not {self.spec.action_dim} finite values")
        return hold

    def _send(self, action: np.ndarray) -> None:
        try:
            self.safety.check_sendable(action)
        except ValueError as exc:
            raise Fault("unsafe_action", str(exc)) from None
        self.robot.send_action(action)

    def _final_hold(self) -> str | None:
        """Best effort after a fault: a filtered hold; returns why none went out."""
        last = self.safety.last_safe
        if last is None:  # the episode never started: nothing safe is known to send
            return "no hold sent: the robot's pose was never read"
        try:
            target = self._hold(last)
        except Exception:  # a broken hold: repeat the last safe command instead
            target = last
        try:
            self._send(self.safety.filter(target, stop=True))
        except Exception as exc:
            return f"hold not sent: {type(exc).__name__}: {exc}"
        return None

    def _request(self, history: deque, obs_tick: int, task: int, chunk_origin: int | None) -> Request:
        """RTI's shift counts the ticks since the newest chunk's action 0 was due (``chunk_origin``);
        an observation a tick older than a first chunk's arrival tick (the robot published late) gets 0."""
        obs = {k: np.stack([h[k] for h in history]) for k in self.spec.obs_keys}
        shift = None if chunk_origin is None else max(0, obs_tick - chunk_origin)
        delay = self.worker.delay.ticks(self.prefix_calls_warm) if self.worker.delay is not None and shift is not None else None
        return Request(obs=obs, task=task, obs_tick=obs_tick, shift=shift, episode=self.episode, delay=delay)

    def warmup(self, task: int) -> None:
        """Untimed calls before the first episode: the cold first call must not hit a real tick."""
        obs = self.robot.get_observation()
        history = {k: np.stack([obs[k]] * self.spec.n_obs_steps) for k in self.spec.obs_keys}
        self.client.reset()
        for i in range(self.cfg.warmup_calls):
            t0 = now()
            res = self.client.infer(history, task, None if i == 0 else 1)
            self.worker.record(now() - t0, res.warm)
        self.client.reset()
        self.warmed_up = True

    def _observe(self) -> tuple[dict[str, Any], float]:
        """The newest observation and its age; faults on errors, bad timestamps and staleness."""
        obs = self.robot.get_observation()
        if obs.get("error"):
            raise Fault("robot_error", str(obs["error"]))
        ts = float(obs["timestamp"])
        age = now() - ts
        if not math.isfinite(age) or age < -CLOCK_TOLERANCE_S:
            raise Fault("bad_timestamp", f"observation timestamp {ts!r} is not finite or lies in the future (age {age!r} s)")
        if age * 1e3 > self.safety_cfg.max_obs_age_ms:
            raise Fault("stale_observation", f"observation {1e3 * age:.1f} ms old")
        return obs, age

    # ------------------------------------------------------------------ episode
    def run_episode(self, task_name: str, task: int, seed: int | None = None) -> EpisodeResult:
        # A call of the previous episode may still be running: let it finish before resetting.
        if self.worker.busy:
            self.worker.wait(timeout=10.0)
        while self.worker.poll() is not None:
            pass
        self.episode += 1
        self.safety.reset()
        st = dict(n=0, first_tick=0, calls=0, denoise_steps=0, first=None, warm=[], full=[], compute=[], missed=0, holds=0, max_seam=0.0, delays=[])
        fault: str | None = None
        detail: str | None = None
        hold_error: str | None = None
        end, success = "max_ticks", False
        try:
            end, success = self._episode(task, seed, st)
        except Fault as f:
            fault, detail = f.name, f.detail
        except Exception as exc:
            fault = "inference_error" if st.get("stage") in ("warmup", "reset") else "robot_error"
            detail = f"{st.get('stage')}: {type(exc).__name__}: {exc}"
        except BaseException:  # KeyboardInterrupt (a second stop signal): hold, then let it end the run
            self._final_hold()
            raise
        if fault is not None:
            hold_error = self._final_hold()
            end = "fault"
        return EpisodeResult(
            episode=self.episode, task=task_name, seed=seed, success=success, ticks=st["n"] - st["first_tick"], end=end,
            fault=fault, fault_detail=detail, calls=st["calls"], denoise_steps=st["denoise_steps"], first_latency_ms=st["first"],
            warm_latencies_ms=st["warm"], full_latencies_ms=st["full"], steady_compute_ms=st["compute"], missed=st["missed"],
            holds=st["holds"], max_seam_jump=st["max_seam"], clipped=self.safety.clipped, hold_error=hold_error, delays=st["delays"],
        )  # fmt: skip

    def _episode(self, task: int, seed: int | None, st: dict) -> tuple[str, bool]:
        """One episode; returns (end, success) or raises (a Fault or the robot's/policy's error)."""
        cfg, dt = self.cfg, self.dt
        st["stage"] = "start_episode"
        if not self.warmed_up and cfg.warmup_calls:
            self.robot.start_episode(seed)
            st["stage"] = "warmup"
            self.warmup(task)
            st["stage"] = "start_episode"
        self.robot.start_episode(seed)
        st["stage"] = "reset"
        self.client.reset()
        self.queue.clear()
        if cfg.gc_freeze:  # what the reset and warm-up made is never rescanned by a collection mid-episode
            freeze_heap()
        st["stage"] = "get_observation"
        obs, _ = self._observe()
        st["stage"] = "hold_action"
        try:
            self.safety.reset(self._hold(None))  # the first action is rate-limited from where the robot is
        except ValueError as exc:
            raise Fault("start_out_of_bounds", str(exc)) from None
        # Ticks are numbered as the robot numbers its observations: tick n is due half a
        # period after the robot published observation n.
        first_tick = int(obs["tick"])
        st["n"] = st["first_tick"] = first_tick
        origin = float(obs["timestamp"]) + 0.5 * dt
        first_chunk_deadline = now() + cfg.first_chunk_timeout_s
        history: deque = deque([obs] * self.spec.n_obs_steps, maxlen=self.spec.n_obs_steps)
        last_obs_tick = int(obs["tick"])
        last_req_tick: int | None = None
        chunk_origin: int | None = None  # the tick the newest chunk's action 0 is for
        awaiting = False  # a request whose reply was not merged yet (the worker may be idle already)
        execute_steps = self.execute_steps  # the newest chunk's executable count, when it has one
        started = False
        last_action: np.ndarray | None = None
        last_source: int | None = None
        spin = cfg.spin_ms / 1e3
        deadline = cfg.deadline_fraction * dt
        n = first_tick
        while cfg.max_episode_ticks == 0 or n - first_tick < cfg.max_episode_ticks:
            st["n"] = n
            due = origin + (n - first_tick) * dt
            wake = sleep_until(due, spin)
            missed = 0
            if wake - due >= dt:  # whole periods were lost (the process was descheduled)
                skipped = int((wake - due) // dt)
                n += skipped
                due += skipped * dt
                missed += skipped
                st["n"] = n
                if cfg.max_episode_ticks and n - first_tick >= cfg.max_episode_ticks:
                    st["missed"] += missed
                    n = first_tick + cfg.max_episode_ticks
                    break  # the episode's last ticks were lost: none is run past its end
            jitter = wake - due
            if self._estop.is_set() or self.signals.fault:
                raise Fault("estop" if self._estop.is_set() else self.signals.fault, "stop requested")
            st["stage"] = "get_observation"
            obs, age = self._observe()
            obs_tick = int(obs["tick"])
            if obs_tick != last_obs_tick:
                history.append(obs)
                last_obs_tick = obs_tick
            if obs.get("done"):
                return "done", bool(obs.get("success"))
            latency_ms, steps = math.nan, 0
            reply = self.worker.poll()
            if reply is not None and reply.request.episode == self.episode:
                if reply.error is not None:
                    raise Fault("inference_error", reply.error)
                r = reply.result
                awaiting = False
                chunk = np.asarray(r.actions)
                if chunk.ndim != 2 or chunk.shape[0] == 0 or chunk.shape[1] != self.spec.action_dim:
                    raise Fault("bad_chunk", f"the policy returned a chunk of shape {chunk.shape}, expected (H, {self.spec.action_dim})")
                if not np.all(np.isfinite(chunk)):
                    raise Fault("nan_action", "the policy returned a non-finite action")
                # The robot held still while the first chunk was computed: it starts when it arrives.
                chunk_origin = reply.request.obs_tick if started else n
                self.queue.merge(chunk, chunk_origin, n)
                execute_steps = r.executable or self.execute_steps
                started = True
                latency_ms, steps = 1e3 * reply.latency_s, r.steps
                st["calls"] += 1
                st["denoise_steps"] += r.steps
                if st["first"] is None:
                    st["first"] = latency_ms
                else:
                    (st["warm"] if r.warm else st["full"]).append(latency_ms)
                    st["compute"].append(r.compute_ms)
            if not started and now() > first_chunk_deadline:
                raise Fault("first_chunk_timeout", f"no chunk {cfg.first_chunk_timeout_s:g} s after the episode start")
            if not self.worker.busy and not awaiting:
                end_tick = self.queue.end_tick()
                remaining = 0 if end_tick is None else end_tick - n + 1
                est = self.worker.latency.estimate(warm=started and self.spec.warm_steps < self.spec.full_steps)
                lead = latency_ticks(est, cfg.control_hz) + cfg.latency_margin_ticks
                due_replan = last_req_tick is None or obs_tick - last_req_tick >= execute_steps
                if due_replan or remaining <= lead:
                    if last_req_tick is None or obs_tick > last_req_tick:
                        request = self._request(history, obs_tick, task, chunk_origin)
                        awaiting = self.worker.submit(request)
                        last_req_tick = obs_tick
                        if request.delay is not None:
                            st["delays"].append(request.delay)
            item = self.queue.pop(n)
            seam_jump = math.nan
            hold = 0
            if item is None:
                if started and self.safety_cfg.stop_on_overrun:
                    raise Fault("inference_overrun", f"no action queued for tick {n}")
                st["stage"] = "hold_action"
                action = self.safety.filter(self._hold(self.safety.last_safe))
                hold = 1
                st["holds"] += 1
            else:
                action, source = item
                if last_source is not None and source != last_source and last_action is not None:
                    seam_jump = float(np.max(np.abs(action - last_action)[self.continuous], initial=0.0))
                    st["max_seam"] = max(st["max_seam"], seam_jump)
                last_source = source
                action = self.safety.filter(action)  # finite: chunks were checked on arrival
                last_action = action
            st["stage"] = "send_action"
            self._send(action)
            sent = now()
            if sent - due > deadline:
                missed += 1
            st["missed"] += missed
            row = (self.episode, n, obs_tick, 1e3 * jitter, 1e3 * (sent - wake), 1e3 * age, self.queue.depth(n), latency_ms, steps, seam_jump, missed, hold)
            self.rows.append(row)
            if self.on_cycle is not None:
                self.on_cycle(row)
            n += 1
        st["n"] = n
        return "max_ticks", False
