"""Loading a checkpoint for inference: the one way every command (eval, select-k, serve,
deploy) gets a ready policy."""

from __future__ import annotations

from typing import Any

from mixpolicy.policies.checkpoint import load_policy
from mixpolicy.utils import resolve_device, set_threads


def load_for_inference(
    checkpoint: str,
    device: str = "auto",
    num_threads: int = 0,
    execution: str = "",
    adaptive_ratio: float = 0.0,
) -> tuple[Any, dict[str, Any]]:
    """(policy in eval mode on ``device``, checkpoint meta). ``num_threads`` sets torch's
    CPU threads (0: one per available core); ``execution`` / ``adaptive_ratio`` override a mixture of
    horizons' own execution (empty / 0: keep it)."""
    set_threads(num_threads)
    policy, meta = load_policy(checkpoint, device=resolve_device(device))
    policy.set_execution(execution or None, adaptive_ratio or None)
    return policy.eval(), meta


def load_composition(checkpoints: list[str], weights: list[float], device: str = "auto", num_threads: int = 0):
    """(a :class:`~mixpolicy.policies.compose.ComposedPolicy` of the checkpoints, the first one's meta)."""
    from mixpolicy.policies.compose import ComposedPolicy

    set_threads(num_threads)
    loaded = [load_policy(c, device=resolve_device(device)) for c in checkpoints]
    return ComposedPolicy([p.eval() for p, _ in loaded], weights).eval(), loaded[0][1]
