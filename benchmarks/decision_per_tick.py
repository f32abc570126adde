"""A new decision every control tick: RTI with one executed action per call, at 50 Hz.

Timing (default): the real-time runner (``mixpolicy deploy``) drives the simulated Meta-World
robot at --hz with the policy in its own process (the subprocess backend). RTI runs the last
--k solver steps from the previous chunk shifted by one tick, and a call starts every tick
(``loop.execute_steps=1``; when a call takes longer than a period the next starts as soon as
the worker is free). It runs whole episodes until --cycles control cycles were logged and
reports missed deadlines, jitter p50/p99, the latency per call (submit to result, transport
included) and the policy's own compute time. The run log is kept in --out.

Success (--success-tasks): closed-loop success of one decision per tick with RTI against
full denoising that executes --full-execute-steps (8) actions per chunk. ``--success-via
eval`` (default) runs it in the simulated-delay evaluation (``mixpolicy eval``: batched,
time counted in control steps, no delay); ``--success-via deploy`` runs both through the
real-time loop as benchmarks/deploy_rti.py does (real time: 10 s per 500-step episode).

    python benchmarks/decision_per_tick.py --checkpoint runs/mt10/checkpoints/last --out runs/decision_per_tick
    python benchmarks/decision_per_tick.py --checkpoint runs/mt10/checkpoints/last --out runs/decision_per_tick \\
        --skip-timing --success-tasks reach-v3 push-v3 drawer-open-v3 --episodes 50
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")


def deploy_config(args, name: str, task: list[str], episodes: int, rti: dict, execute_steps: int) -> dict:
    return {
        "checkpoint": args.checkpoint,
        "log": str(Path(args.out) / f"{name}.jsonl"),
        "overwrite": True,
        "progress": False,
        "robot": {"tasks": task, "episodes_per_task": episodes, "seed": args.seed, "max_episode_steps": args.max_episode_steps},
        "inference": {"backend": args.backend, "rti": rti},
        "loop": {"control_hz": args.hz, "execute_steps": execute_steps, "fifo_priority": args.fifo_priority},
        "safety": {"stop_on_overrun": False, "max_obs_age_ms": args.max_obs_age_ms},
    }


def timing(args) -> dict:
    from mixpolicy.config import from_dict
    from mixpolicy.deploy.runner import DeployConfig, deploy

    from mixpolicy.policies.checkpoint import read_checkpoint_meta

    tasks = [args.task] if args.task else list(read_checkpoint_meta(args.checkpoint)["shape_meta"]["tasks"])
    # Episodes per task for --cycles at a third of the longest episode on average (successes end early),
    # plus one spare; a run that falls short is rerun with more.
    episodes = math.ceil(3 * args.cycles / (args.max_episode_steps * len(tasks))) + 1
    total: dict = {}
    while True:
        cfg = from_dict(DeployConfig, deploy_config(args, "timing", tasks, episodes, {"enabled": True, "k": args.k}, 1))
        s = deploy(cfg)
        total = s
        if s["cycles"] >= args.cycles or episodes >= 20 * math.ceil(args.cycles / args.max_episode_steps):
            break
        episodes = math.ceil(episodes * args.cycles / max(1, s["cycles"])) + 1
    jit, lat, comp = total["jitter_ms"] or {}, total["latency_steady_ms"] or {}, total["compute_steady_ms"] or {}
    return {
        "cycles": total["cycles"],
        "missed_deadlines": total["missed_deadlines"],
        "hold_cycles": total["hold_cycles"],
        "jitter_ms": {"p50": jit.get("median"), "p99": jit.get("p99"), "max": jit.get("max")},
        "latency_per_call_ms": {"p50": lat.get("median"), "p99": lat.get("p99")},
        "compute_per_call_ms": {"p50": comp.get("median"), "p99": comp.get("p99")},
        "policy_calls": total["policy_calls"],
        "decisions_per_tick": total["policy_calls"] / max(1, total["cycles"]),
        "denoise_steps_per_call": total["denoise_steps_per_call"],
        "log": total["log"],
    }


def success_eval(args) -> dict:
    from mixpolicy.envs.evaluate import evaluate_policy
    from mixpolicy.policies.inference import load_for_inference

    policy, _ = load_for_inference(args.checkpoint, args.device, args.num_threads)
    common = dict(episodes_per_task=args.episodes, seed=args.seed, num_envs=args.num_envs, max_episode_steps=args.max_episode_steps, progress=False)
    out = {}
    for name, kw in (
        (f"rti_k{args.k}_every_tick", dict(mode="rti", rti_k=args.k, n_action_steps=1)),
        (f"full_{args.full_execute_steps}_actions", dict(mode="naive", n_action_steps=args.full_execute_steps)),
    ):
        r = evaluate_policy(policy, args.success_tasks, **common, **kw)
        out[name] = {
            "success": r["average_success"], "wilson95": r["overall_wilson95"],
            "per_task": {t: v["success_rate"] for t, v in r["tasks"].items()},
            "policy_calls_per_episode": r["mean_policy_calls"], "via": "eval",
        }  # fmt: skip
    return out


def success_deploy(args) -> dict:
    from mixpolicy.config import from_dict
    from mixpolicy.deploy.runner import DeployConfig, deploy

    out = {}
    for name, rti, steps in (
        (f"rti_k{args.k}_every_tick", {"enabled": True, "k": args.k}, 1),
        (f"full_{args.full_execute_steps}_actions", {"enabled": False}, args.full_execute_steps),
    ):
        s = deploy(from_dict(DeployConfig, deploy_config(args, name, args.success_tasks, args.episodes, rti, steps)))
        out[name] = {
            "success": s["average_success"], "wilson95": s["overall_wilson95"],
            "per_task": {t: v["success_rate"] for t, v in s["tasks"].items()},
            "policy_calls_per_episode": s["policy_calls"] / max(1, s["episodes"]), "via": "deploy", "missed_deadlines": s["missed_deadlines"],
        }  # fmt: skip
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--out", required=True, help="folder for the run logs and results.json")
    ap.add_argument("--task", default="", help="timing: one Meta-World task (default: every task of the checkpoint, in turn)")
    ap.add_argument("--cycles", type=int, default=10_000)
    ap.add_argument("--hz", type=float, default=50.0)
    ap.add_argument("--k", type=int, default=2, help="RTI: warm-started solver steps per decision")
    ap.add_argument("--backend", default="process", choices=["process", "thread"])
    ap.add_argument("--fifo-priority", type=int, default=0)
    ap.add_argument("--max-obs-age-ms", type=float, default=100.0)
    ap.add_argument("--max-episode-steps", type=int, default=500)
    ap.add_argument("--seed", type=int, default=100_000)
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--success-tasks", nargs="*", default=[])
    ap.add_argument("--success-via", default="eval", choices=["eval", "deploy"])
    ap.add_argument("--episodes", type=int, default=50, help="success: episodes per task")
    ap.add_argument("--full-execute-steps", type=int, default=8)
    ap.add_argument("--num-envs", type=int, default=25, help="success via eval: environments per batched call")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--num-threads", type=int, default=1)
    args = ap.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"args": vars(args)}
    if not args.skip_timing:
        results["timing"] = timing(args)
        t = results["timing"]
        print(
            f"{t['cycles']} cycles at {args.hz:g} Hz: missed deadlines {t['missed_deadlines']}, holds {t['hold_cycles']}, "
            f"jitter p50/p99 {t['jitter_ms']['p50']:.3f}/{t['jitter_ms']['p99']:.3f} ms, "
            f"latency per call p50/p99 {t['latency_per_call_ms']['p50']:.2f}/{t['latency_per_call_ms']['p99']:.2f} ms, "
            f"decisions per tick {t['decisions_per_tick']:.2f}, denoising steps per call {t['denoise_steps_per_call']:.2f}",
            flush=True,
        )
    if args.success_tasks:
        results["success"] = (success_eval if args.success_via == "eval" else success_deploy)(args)
        print("| variant | success % [95% CI] | per task % | calls / episode | via |\n|---|---|---|---|---|")
        for n, s in results["success"].items():
            lo, hi = s["wilson95"]
            per = " / ".join(f"{100 * v:.0f}" for v in s["per_task"].values())
            print(f"| {n} | {100 * s['success']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}] | {per} | {s['policy_calls_per_episode']:.1f} | {s['via']} |")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
