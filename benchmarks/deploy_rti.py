"""Closed-loop Meta-World through the real-time simulated robot: full denoising vs RTI.

Each variant runs every task of the checkpoint for --episodes episodes (seeds 100000+i)
at --hz with the given inference backend, logging every control cycle. The table gives
success (95% Wilson interval), denoising steps per decision, the inference latency seen
by the loop (submit to result, transport included; the first call of each episode
apart), the policy's own compute time, and the loop's timing: jitter and missed
deadlines over all cycles. Run it while holding the machine's benchmark lock:

    flock /tmp/mixpolicy-bench.lock .venv/bin/python benchmarks/deploy_rti.py \\
        --checkpoint runs/dit/checkpoints/last --out runs/deploy_rti
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")


def variants(ks: list[int], renoise: bool) -> dict[str, dict]:
    out = {"full": {"enabled": False}}
    for k in ks:
        out[f"rti_k{k}"] = {"enabled": True, "k": k, "renoise": renoise}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--out", required=True, help="folder for the logs and results.json")
    ap.add_argument("--tasks", nargs="*", default=[])
    ap.add_argument("--episodes", type=int, default=50)
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--only", nargs="*", default=[], help="run only these variants (names as in the table)")
    ap.add_argument("--reference-start", action="store_true", help="RTI without re-noising (the reference's start)")
    ap.add_argument("--hz", type=float, default=50.0)
    ap.add_argument("--execute-steps", type=int, default=4)
    ap.add_argument("--backend", default="process", choices=["process", "thread"])
    ap.add_argument("--seam", default="none")
    ap.add_argument("--seed", type=int, default=100_000)
    ap.add_argument("--fifo-priority", type=int, default=0, help="SCHED_FIFO priority of the loop thread (0: normal scheduling)")
    ap.add_argument("--max-obs-age-ms", type=float, default=100.0, help="stale-observation fault threshold")
    ap.add_argument("--stop-on-overrun", action="store_true", help="stop the run when the queue runs dry (default: hold, count hold cycles)")
    args = ap.parse_args()

    from mixpolicy.config import from_dict
    from mixpolicy.deploy.runner import DeployConfig, deploy

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    for name, rti in variants(args.ks, not args.reference_start).items():
        if args.only and name not in args.only:
            continue
        cfg = from_dict(
            DeployConfig,
            {
                "checkpoint": args.checkpoint,
                "log": str(out / f"{name}.jsonl"),
                "overwrite": True,
                "progress": False,
                "robot": {"tasks": args.tasks, "episodes_per_task": args.episodes, "seed": args.seed},
                "inference": {"backend": args.backend, "rti": rti},
                "loop": {"control_hz": args.hz, "execute_steps": args.execute_steps, "seam": args.seam, "fifo_priority": args.fifo_priority},
                "safety": {"stop_on_overrun": args.stop_on_overrun, "max_obs_age_ms": args.max_obs_age_ms},
            },
        )
        print(f"== {name}", flush=True)
        load_before = os.getloadavg()
        s = deploy(cfg)
        # The 1-minute load average before and after: context for the timing figures.
        results[name] = {"summary": s, "args": vars(args), "loadavg_before_after": [load_before[0], os.getloadavg()[0]]}
        results_file.write_text(json.dumps(results, indent=2))
        print(row(name, results[name]), flush=True)
    print()
    print(table(results))
    return 0


def row(name: str, r: dict) -> str:
    s = r["summary"]
    lat = s["latency_steady_ms"] or {}
    comp = s["compute_steady_ms"] or {}
    first = s["latency_first_call_ms"] or {}
    lo, hi = s["overall_wilson95"]
    per_task = " / ".join(f"{100 * t['success_rate']:.0f}" for t in s["tasks"].values())
    jit = s["jitter_ms"]
    return (
        f"| {name} | {100 * s['average_success']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}] | {per_task} | "
        f"{s['denoise_steps_per_call']:.2f} | {lat.get('median', float('nan')):.2f} / {lat.get('p99', float('nan')):.2f} | "
        f"{comp.get('median', float('nan')):.2f} | {first.get('median', float('nan')):.2f} | {s['policy_calls']} | {s['cycles']} | {jit['p99']:.3f} / {jit['max']:.2f} | "
        f"{s['missed_deadlines']} | {s['hold_cycles']} |"
    )


def table(results: dict) -> str:
    head = (
        "| variant | success % [95% CI] | per task % | denoising steps / decision | latency median / p99 (ms) | "
        "in-policy median (ms) | first call median (ms) | decisions | cycles | jitter p99 / max (ms) | missed deadlines | hold cycles |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head] + [row(n, r) for n, r in results.items()]
    full = results.get("full")
    if full and full["summary"]["latency_steady_ms"]:
        base = full["summary"]["latency_steady_ms"]["median"]
        for n, r in results.items():
            if n != "full" and r["summary"]["latency_steady_ms"]:
                ratio = base / r["summary"]["latency_steady_ms"]["median"]
                d = 100 * (r["summary"]["average_success"] - full["summary"]["average_success"])
                lines.append(f"\n{n}: median latency {ratio:.2f}x lower than full denoising; success {d:+.1f} points")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
