"""Precise waiting on the monotonic clock, and process settings for steady timing.

``time.sleep`` alone wakes up to a scheduler tick late; sleeping until shortly before the
deadline and spinning the rest trades a little CPU for sub-millisecond wake-ups.
"""

from __future__ import annotations

import gc
import math
import os
import sys
import time

now = time.perf_counter  # CLOCK_MONOTONIC on Linux


def sleep_until(deadline: float, spin_s: float = 0.001) -> float:
    """Wait until ``deadline`` (a ``now()`` value); returns the wake-up time."""
    if not math.isfinite(deadline):  # a NaN deadline would never compare as reached: spin forever
        raise ValueError(f"deadline {deadline!r} is not finite")
    while True:
        t = now()
        remaining = deadline - t
        if remaining <= 0:
            return t
        if remaining > spin_s:
            time.sleep(remaining - spin_s)
        # else: spin; the loop re-reads the clock


def freeze_heap() -> None:
    """Collect, then move every object alive now to the permanent generation, so that later
    full collections scan only what is created after. The loop calls it before each episode's
    first tick: objects made since the run started (the environment's reset, lazy imports of a
    first call) would otherwise make one full collection inside an episode cost tens to
    hundreds of milliseconds, several control periods."""
    gc.collect()
    gc.freeze()


class RealtimeSettings:
    """Applied for the duration of a run, restored afterwards.

    * a short GIL switch interval, so the loop thread gets the interpreter back within
      ``switch_interval_s`` of waking while other threads run Python code;
    * ``gc.freeze()`` after setup, so collections never rescan the large heap of loaded
      modules (a full collection of it takes tens of milliseconds);
    * optionally SCHED_FIFO priority for the loop thread (needs privileges).
    """

    def __init__(self, switch_interval_s: float = 0.0005, gc_freeze: bool = True, fifo_priority: int = 0):
        self.switch_interval_s = switch_interval_s
        self.gc_freeze = gc_freeze
        self.fifo_priority = fifo_priority
        self.notes: list[str] = []

    def __enter__(self) -> "RealtimeSettings":
        self._old_interval = sys.getswitchinterval()
        if self.switch_interval_s > 0:
            sys.setswitchinterval(self.switch_interval_s)
        if self.gc_freeze:
            freeze_heap()
        self._old_sched = None
        if self.fifo_priority > 0 and hasattr(os, "sched_setscheduler"):
            try:
                self._old_sched = (os.sched_getscheduler(0), os.sched_getparam(0))
                os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(self.fifo_priority))
            except (PermissionError, OSError) as exc:
                self._old_sched = None
                self.notes.append(f"SCHED_FIFO not available ({exc}); running with normal priority")
        return self

    def __exit__(self, *exc) -> None:
        sys.setswitchinterval(self._old_interval)
        if self.gc_freeze:
            gc.unfreeze()
        if self._old_sched is not None:
            try:
                os.sched_setscheduler(0, self._old_sched[0], self._old_sched[1])
            except OSError:
                pass
