"""The control loop's settings, its per-cycle log columns and its per-episode results."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from mixpolicy.config import check
from mixpolicy.deploy.action_queue import SEAM_MODES
from mixpolicy.deploy.safety import FAULTS

CYCLE_COLUMNS = (
    "episode",  # episode index of the run
    "tick",  # control tick within the episode
    "obs_tick",  # the robot tick of the observation read
    "jitter_ms",  # wake-up time - due time
    "work_ms",  # wake-up to action sent
    "obs_age_ms",  # end of the read - observation timestamp
    "queue_depth",  # queued actions for this tick and later, after merging
    "latency_ms",  # latency of the inference that finished this cycle (NaN: none)
    "steps",  # its denoising steps (0: none)
    "seam_jump",  # max |action - previous action| over continuous dims when the executed chunk changed (NaN: no seam)
    "missed",  # 1 when the action was sent after the deadline (or ticks were skipped)
    "hold",  # 1 when the hold action was sent (no queued action)
)

CLOCK_TOLERANCE_S = 1e-6  # float rounding of timestamps computed by the robot


@dataclass
class LoopConfig:
    control_hz: float = 50.0
    execute_steps: int = 0  # ticks between inference starts (0: the policy's n_action_steps)
    seam: str = "none"  # none | blend | ensemble
    blend_steps: int = 4
    ensemble_coeff: float = 0.01
    latency_margin_ticks: int = 1  # start inference this many ticks earlier than the estimate says
    initial_latency_ms: float = 50.0  # latency estimate before any warm call was measured
    # rti.delay=auto: the frozen prefix is this quantile of the last delay_window call latencies, in ticks (mixpolicy.deploy.delay)
    delay_window: int = 20
    delay_quantile: float = 0.9
    deadline_fraction: float = 0.5  # the action must be sent within this fraction of a period after its tick is due
    first_chunk_timeout_s: float = 5.0  # no chunk this long after the episode start is a fault
    max_episode_ticks: int = 0  # 0: until the robot reports done
    warmup_calls: int = 2  # untimed inference calls before the first episode (the first one is cold)
    spin_ms: float = 1.0  # busy-wait the last part of each sleep
    switch_interval_us: float = 500.0  # Python GIL switch interval during the run (0: leave)
    gc_freeze: bool = True  # collect and gc.freeze() before each episode: no full collection rescans the heap mid-episode
    fifo_priority: int = 0  # >0: SCHED_FIFO priority for the loop thread (needs privileges)

    def __post_init__(self):
        check(0 < self.control_hz <= 1000, "loop.control_hz", "must be in (0, 1000]")
        check(self.execute_steps >= 0, "loop.execute_steps", "must be >= 0 (0: the policy's n_action_steps)")
        check(self.seam in SEAM_MODES, "loop.seam", f"must be one of {SEAM_MODES}")
        check(self.blend_steps >= 1, "loop.blend_steps", "must be >= 1")
        check(self.ensemble_coeff >= 0, "loop.ensemble_coeff", "must be >= 0")
        check(self.latency_margin_ticks >= 0, "loop.latency_margin_ticks", "must be >= 0")
        check(self.initial_latency_ms > 0, "loop.initial_latency_ms", "must be > 0")
        check(self.delay_window >= 1, "loop.delay_window", "must be >= 1")
        check(0 < self.delay_quantile <= 1, "loop.delay_quantile", "must be in (0, 1]")
        check(0 < self.deadline_fraction <= 1, "loop.deadline_fraction", "must be in (0, 1]")
        check(0 < self.first_chunk_timeout_s < math.inf, "loop.first_chunk_timeout_s", "must be finite and > 0")
        check(self.max_episode_ticks >= 0, "loop.max_episode_ticks", "must be >= 0")
        check(self.warmup_calls >= 0, "loop.warmup_calls", "must be >= 0")
        check(self.spin_ms >= 0, "loop.spin_ms", "must be >= 0")
        check(self.switch_interval_us >= 0, "loop.switch_interval_us", "must be >= 0")
        check(0 <= self.fifo_priority <= 99, "loop.fifo_priority", "must be in [0, 99]")


@dataclass
class EpisodeResult:
    episode: int
    task: str
    seed: int | None
    success: bool
    ticks: int
    end: str  # done | max_ticks | fault
    fault: str | None  # one of safety.FAULTS
    fault_detail: str | None
    calls: int
    denoise_steps: int
    first_latency_ms: float | None  # the episode's first (full) call
    warm_latencies_ms: list[float]
    full_latencies_ms: list[float]
    steady_compute_ms: list[float]  # time inside the policy of the calls after the first (no transport)
    missed: int
    holds: int
    max_seam_jump: float
    clipped: int
    hold_error: str | None = None  # why no hold went out after a fault (None: it did, or no fault)
    delays: list[int] = field(default_factory=list)  # rti.delay=auto: the estimated delay (ticks) sent with each call after the first

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Fault(Exception):
    """Ends an episode: ``name`` is one of safety.FAULTS."""

    def __init__(self, name: str, detail: str):
        assert name in FAULTS, name
        super().__init__(detail)
        self.name, self.detail = name, detail
