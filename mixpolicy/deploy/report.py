"""``mixpolicy deploy --report LOG``: a run log -> summary table, JSON and PNG histograms."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from mixpolicy.errors import UserError
from mixpolicy.utils import wilson_interval

# Columns drawn as histograms, with their axis labels.
HISTOGRAMS = {
    "jitter_ms": "wake-up jitter (ms)",
    "work_ms": "cycle work: wake-up to action sent (ms)",
    "obs_age_ms": "observation age (ms)",
    "latency_ms": "inference latency (ms)",
    "queue_depth": "queue depth (actions)",
    "seam_jump": "action jump at chunk seams",
}


def read_log(path: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray], list[dict[str, Any]], list[dict[str, Any]]]:
    """(header, columns, episodes, events) of a run log."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"log file not found: {path}")
    header: dict[str, Any] | None = None
    rows: list[list] = []
    episodes: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"{path}:{i} is not a JSON line (is this a mixpolicy deploy log?)") from None
            kind = rec.get("type") if isinstance(rec, dict) else None
            if kind == "header":
                header = rec
            elif kind == "cycle":
                rows.append(rec["v"])
            elif kind == "episode":
                episodes.append(rec)
            elif kind == "event":
                events.append(rec)
    if header is None:
        raise UserError(f"{path} has no header line: not a mixpolicy deploy log")
    names = header["columns"]
    table = np.array([[math.nan if v is None else v for v in r] for r in rows], dtype=np.float64).reshape(-1, len(names))
    return header, {n: table[:, i] for i, n in enumerate(names)}, episodes, events


def _stats(x: np.ndarray) -> dict[str, float] | None:
    x = x[np.isfinite(x)]
    if x.size == 0:
        return None
    q = np.quantile(x, [0.5, 0.9, 0.99])
    return {"n": int(x.size), "mean": float(x.mean()), "median": float(q[0]), "p90": float(q[1]), "p99": float(q[2]), "max": float(x.max())}


def summarize(path: str | Path) -> dict[str, Any]:
    header, cols, episodes, events = read_log(path)
    n = cols["tick"].size
    out: dict[str, Any] = {"log": str(path), "cycles": int(n), "episodes": len(episodes)}
    out["control_hz"] = 1.0 / header["dt"]
    out["missed_deadlines"] = int(np.nansum(cols["missed"])) if n else 0
    out["hold_cycles"] = int(np.nansum(cols["hold"])) if n else 0
    for c in ("jitter_ms", "work_ms", "obs_age_ms", "queue_depth", "seam_jump"):
        out[c] = _stats(cols[c])
    # Inference latency: each episode's first (full) call apart from the steady state.
    first = [e["first_latency_ms"] for e in episodes if e.get("first_latency_ms") is not None]
    warm = [x for e in episodes for x in e.get("warm_latencies_ms", [])]
    full = [x for e in episodes for x in e.get("full_latencies_ms", [])]
    out["latency_first_call_ms"] = _stats(np.asarray(first, float))
    out["latency_steady_ms"] = _stats(np.asarray(warm + full, float))
    out["latency_warm_ms"] = _stats(np.asarray(warm, float))
    out["latency_full_ms"] = _stats(np.asarray(full, float))
    out["compute_steady_ms"] = _stats(np.asarray([x for e in episodes for x in e.get("steady_compute_ms", [])], float))
    # rti.delay=auto: the frozen prefix the loop estimated and sent with each call (ticks).
    out["estimated_delay_ticks"] = _stats(np.asarray([x for e in episodes for x in e.get("delays", [])], float))
    calls = sum(e["calls"] for e in episodes)
    out["policy_calls"] = calls
    out["denoise_steps_per_call"] = sum(e["denoise_steps"] for e in episodes) / calls if calls else None
    tasks: dict[str, dict[str, Any]] = {}
    for e in episodes:
        t = tasks.setdefault(e["task"], {"successes": 0, "episodes": 0})
        t["successes"] += int(e["success"])
        t["episodes"] += 1
    for t in tasks.values():
        t["success_rate"] = t["successes"] / t["episodes"]
        t["wilson95"] = list(wilson_interval(t["successes"], t["episodes"]))
    out["tasks"] = tasks
    if tasks:
        s = sum(t["successes"] for t in tasks.values())
        m = sum(t["episodes"] for t in tasks.values())
        out["average_success"] = float(np.mean([t["success_rate"] for t in tasks.values()]))
        out["overall_wilson95"] = list(wilson_interval(s, m))
    out["faults"] = [
        {"fault": e["fault"], "detail": e.get("detail"), "episode": e.get("episode"), "hold_error": e.get("hold_error")}
        for e in events
        if e.get("kind") == "fault"
    ]
    out["torque_kept"] = any(e.get("keep_torque") for e in events if e.get("kind") == "disconnect")
    return out


def format_summary(s: dict[str, Any]) -> str:
    lines = [f"{s['cycles']} cycles at {s['control_hz']:.0f} Hz over {s['episodes']} episodes; missed deadlines {s['missed_deadlines']}, hold cycles {s['hold_cycles']}"]

    def row(name, st, unit="ms"):
        if st is None:
            return f"  {name:28s} -"
        return f"  {name:28s} median {st['median']:8.3f}  p99 {st['p99']:8.3f}  max {st['max']:8.3f} {unit}  (n={st['n']})"

    lines.append(row("jitter", s["jitter_ms"]))
    lines.append(row("cycle work", s["work_ms"]))
    lines.append(row("observation age", s["obs_age_ms"]))
    lines.append(row("inference, first call", s["latency_first_call_ms"]))
    lines.append(row("inference, steady state", s["latency_steady_ms"]))
    lines.append(row("  of which in the policy", s["compute_steady_ms"]))
    lines.append(row("queue depth", s["queue_depth"], "actions"))
    if s.get("estimated_delay_ticks") is not None:
        lines.append(row("estimated delay (auto)", s["estimated_delay_ticks"], "ticks"))
    lines.append(row("seam jump", s["seam_jump"], ""))
    if s["denoise_steps_per_call"] is not None:
        lines.append(f"  policy calls {s['policy_calls']}, denoising steps per call {s['denoise_steps_per_call']:.2f}")
    for task, t in s["tasks"].items():
        lo, hi = t["wilson95"]
        lines.append(f"  {task:28s} success {t['successes']}/{t['episodes']} ({100 * t['success_rate']:.1f}%) [{100 * lo:.1f}, {100 * hi:.1f}]")
    if "average_success" in s:
        lo, hi = s["overall_wilson95"]
        lines.append(f"  {'average':28s} success {100 * s['average_success']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]")
    for f in s["faults"]:
        lines.append(f"  FAULT {f['fault']} in episode {f['episode']}: {f['detail']}")
        if f.get("hold_error"):
            lines.append(f"  no final hold: {f['hold_error']}")
    if s.get("torque_kept"):
        lines.append("  the motors were left holding their last target (robot.torque_off_on_fault=false)")
    return "\n".join(lines)


def write_histograms(path: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """One PNG histogram per column of ``HISTOGRAMS``; returns the files written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("PNG histograms need matplotlib: pip install 'mixpolicy[deploy]'") from None
    header, cols, _, _ = read_log(path)
    path = Path(path)
    out = Path(out_dir) if out_dir else path.parent / f"{path.stem}_report"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for col, label in HISTOGRAMS.items():
        x = cols[col][np.isfinite(cols[col])]
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        if x.size:
            ax.hist(x, bins=60, color="#3b6ea8")
            ax.set_yscale("log")
            p99 = float(np.quantile(x, 0.99))
            ax.axvline(p99, color="#c0392b", linestyle="--", label=f"p99 {p99:.3g}")
            ax.legend()
        else:
            ax.text(0.5, 0.5, "no samples", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel(label)
        ax.set_ylabel("cycles" if col != "latency_ms" else "calls")
        ax.set_title(f"{path.name}: {x.size} samples")
        fig.tight_layout()
        f = out / f"{col}.png"
        fig.savefig(f)
        plt.close(fig)
        written.append(f)
    return written
