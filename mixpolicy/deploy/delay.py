"""The frozen prefix of real-time chunking, estimated from measured inference latency.

Real-time chunking ties the first ``d`` actions of a new chunk to the chunk being executed:
the ticks that run while the new one is computed. With ``rti.delay: auto`` the control loop
measures ``d`` instead of taking it from the config: the latency of recent calls of the kind
that carries a prefix (warm-started calls; with RTI off, the full calls after an episode's
first), the process's first call excluded (it is cold: allocations, lazy initialization),
summarized by a high quantile of the last ``window`` calls, and converted to ticks at the
control rate, rounded up. Until such a call was measured, the loop's initial latency
estimate stands in. The estimate sent with each call is kept in the episode results and the
deploy report.
"""

from __future__ import annotations

import math
from typing import Any

from mixpolicy.deploy.worker import LatencyEstimator

AUTO = "auto"
# A latency of exactly d periods is d ticks: float rounding must not make it d + 1.
TICK_TOLERANCE = 1e-6


def latency_ticks(latency_s: float, control_hz: float) -> int:
    """Control ticks that pass while a call of ``latency_s`` seconds runs (rounded up)."""
    return max(0, math.ceil(latency_s * control_hz - TICK_TOLERANCE))


def is_auto(delay: Any) -> bool:
    return isinstance(delay, str) and delay == AUTO


def check_delay(delay: Any) -> bool:
    """A valid delay setting: ``auto`` or an integer >= 0."""
    return is_auto(delay) or (isinstance(delay, int) and not isinstance(delay, bool) and delay >= 0)


def fixed_delay(delay: Any) -> int:
    """The frozen prefix a call gets when it brings none of its own (``auto`` without an estimate: 0)."""
    return 0 if is_auto(delay) else int(delay)


def wants_estimate(rti: dict[str, Any] | None) -> bool:
    """Whether a policy's RTI settings (its spec's ``extra["rti"]``) ask the loop for its delay estimate."""
    return bool(rti) and rti.get("prefix", "none") != "none" and is_auto(rti.get("delay"))


class DelayEstimator(LatencyEstimator):
    """Recent call latencies (first call ignored) as a delay in control ticks."""

    def __init__(self, control_hz: float, window: int = 20, quantile: float = 0.9, initial_s: float = 0.05):
        super().__init__(window=window, initial_s=initial_s, quantile=quantile)
        self.control_hz = float(control_hz)

    def ticks(self, warm: bool) -> int:
        """The delay of the next call of kind ``warm`` (falling back to the other kind, then the initial estimate)."""
        return latency_ticks(self.estimate(warm), self.control_hz)
