"""Real-time inference modes under a simulated inference delay, with and without a perturbation.

For every delay d (--delays) and mode (--modes: naive, rti, rtc, rti+rtc) this runs the
simulated-delay evaluation (``mixpolicy eval delay=d mode=...``, envs/evaluate.py) on every
task, plus misestimated delays for the prefix modes: rtc and rti+rtc assuming d-2 and d+2 at
each delay of --misestimate-at. The evaluation has no seam blending (blend/ensemble are
real-time-loop options), so there is no blend row. A delay must be at most the actions
executed per chunk and fit the chunk with them (d + n_action_steps <= horizon): a row that
does not fit is reported as skipped with the reason (raise --n-action-steps, or use a policy
with a longer horizon). With --perturb goal|object the goal jumps (or the object is pushed)
at --perturb-step (envs/perturb.py).

Reported per row: success (95% Wilson interval), per-task success, mean and max seam jump
(L2 between the last action of a chunk and the first of the next), policy calls per
episode, and the policy's wall time per batched call (one call plans for up to --num-envs
environments). Results go to --out as JSON; the table is printed.

    python benchmarks/delay_modes.py --checkpoint runs/mt10/checkpoints/last --out runs/delay_modes.json
    python benchmarks/delay_modes.py --checkpoint runs/mt10/checkpoints/last --perturb goal \\
        --tasks reach-v3 push-v3 pick-place-v3 --out runs/delay_modes_goal.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

PREFIX_MODES = ("rtc", "rti+rtc")


def runs(delays: list[int], modes: list[str], misestimate_at: list[int]) -> list[dict]:
    """(delay, mode, assumed delay) rows: every mode at every delay, then the misestimates."""
    out = [{"delay": d, "mode": m, "assumed": -1} for d in delays for m in modes]
    for d in misestimate_at:
        for m in (m for m in modes if m in PREFIX_MODES):
            out += [{"delay": d, "mode": m, "assumed": a} for a in (d - 2, d + 2) if a >= 0]
    return out


def name(r: dict) -> str:
    return f"d={r['delay']} {r['mode']}" + (f" assumed={r['assumed']}" if r["assumed"] >= 0 else "")


def summarize(res: dict) -> dict:
    tasks = res["tasks"]
    return {
        "success": res["average_success"],
        "wilson95": res["overall_wilson95"],
        "per_task": {t: r["success_rate"] for t, r in tasks.items()},
        "seam_jump_mean": sum(r["seam_jump_mean"] for r in tasks.values()) / len(tasks),
        "seam_jump_max": max(r["seam_jump_max"] for r in tasks.values()),
        "policy_calls_per_episode": res["mean_policy_calls"],
        "ms_per_batched_call": 1e3 * res["policy_seconds"] / max(1, res["batched_policy_calls"]),
        "batched_calls": res["batched_policy_calls"],
        "n_action_steps": res["n_action_steps"],
        "realtime": res["realtime"],
        "perturbation": res["perturbation"],
    }


def table(rows: dict) -> str:
    lines = [
        "| run | success % [95% CI] | per task % | seam jump mean / max | calls / episode | ms / batched call |",
        "|---|---|---|---|---|---|",
    ]
    for n, s in rows.items():
        if "skipped" in s:
            lines.append(f"| {n} | skipped: {s['skipped']} | | | | |")
            continue
        lo, hi = s["wilson95"]
        per = " / ".join(f"{100 * v:.0f}" for v in s["per_task"].values())
        lines.append(
            f"| {n} | {100 * s['success']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}] | {per} | {s['seam_jump_mean']:.4f} / {s['seam_jump_max']:.4f} | "
            f"{s['policy_calls_per_episode']:.1f} | {s['ms_per_batched_call']:.2f} |"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--out", required=True, help="results JSON")
    ap.add_argument("--tasks", nargs="*", default=[], help="default: the checkpoint's tasks")
    ap.add_argument("--episodes", type=int, default=50, help="per task")
    ap.add_argument("--seed", type=int, default=100_000)
    ap.add_argument("--delays", type=int, nargs="+", default=[0, 2, 4, 8])
    ap.add_argument("--modes", nargs="+", default=["naive", "rti", "rtc", "rti+rtc"])
    ap.add_argument("--misestimate-at", type=int, nargs="*", default=[4, 8], help="delays at which rtc modes also assume d-2 and d+2")
    ap.add_argument("--prefix", default="guidance", help="rtc: guidance | hard | conditioned")
    ap.add_argument("--rti-k", type=int, default=2)
    ap.add_argument("--rti-start-noise", default="auto", help="where warm starts begin: auto | tail | a noise std")
    ap.add_argument("--n-action-steps", type=int, default=0, help="0: the policy's")
    ap.add_argument("--num-envs", type=int, default=25)
    ap.add_argument("--perturb", default="none", help="none | goal | object")
    ap.add_argument("--perturb-step", type=int, default=30)
    ap.add_argument("--perturb-distance", type=float, default=0.1)
    ap.add_argument("--max-episode-steps", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--num-threads", type=int, default=0)
    args = ap.parse_args()
    if args.rti_start_noise not in ("auto", "tail"):
        args.rti_start_noise = float(args.rti_start_noise)

    from mixpolicy.envs.evaluate import evaluate_policy
    from mixpolicy.envs.registry import environment
    from mixpolicy.errors import UserError
    from mixpolicy.policies.inference import load_for_inference

    policy, _ = load_for_inference(args.checkpoint, args.device, args.num_threads)
    tasks = environment("metaworld").tasks(policy, args.tasks)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict] = {}
    for r in runs(args.delays, args.modes, args.misestimate_at):
        t0 = time.perf_counter()
        try:
            res = evaluate_policy(
                policy, tasks, episodes_per_task=args.episodes, seed=args.seed, num_envs=args.num_envs,
                max_episode_steps=args.max_episode_steps, n_action_steps=args.n_action_steps or None, progress=False,
                delay=r["delay"], mode=r["mode"], assumed_delay=r["assumed"], rti_k=args.rti_k, prefix=args.prefix,
                rti_start_noise=args.rti_start_noise, perturb=args.perturb, perturb_step=args.perturb_step, perturb_distance=args.perturb_distance,
            )  # fmt: skip
        except UserError as exc:
            rows[name(r)] = {"skipped": str(exc), **r}
            print(f"== {name(r)}: skipped ({exc})", flush=True)
            continue
        rows[name(r)] = {**summarize(res), "seconds": time.perf_counter() - t0}
        print(f"== {name(r)}: success {100 * rows[name(r)]['success']:.1f}%", flush=True)
        out.write_text(json.dumps({"args": vars(args), "tasks": tasks, "runs": rows}, indent=2))
    out.write_text(json.dumps({"args": vars(args), "tasks": tasks, "runs": rows}, indent=2))
    print()
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
