"""Few-step sampling: success and chunk latency of a many-step baseline and few-step policies.

The few-step policies: a shortcut model (``--shortcut``, ``policy=dit_shortcut``) and/or a
student distilled from the baseline (``--distilled``, ``mixpolicy train distill_from=...``).

For each checkpoint and each step count (default: 1, 2 and the baseline's own), closed-loop
success on the given Meta-World tasks (``evaluate_policy``, the seeds of ``mixpolicy eval``)
and the latency of one action chunk at batch 1 (the full ``policy.plan`` call: observation
encoding and every network evaluation), median and 90th percentile over ``--repeats``,
timed side by side: every repeat calls each (checkpoint, steps) variant once in turn
(ABAB...), so load changes hit all variants alike; ``--threads`` fixes torch's threads.
A step count a policy cannot sample (a shortcut model takes powers of two) is reported
as n/a. Prints a markdown table and writes JSON.

    flock /tmp/mixpolicy-bench.lock python benchmarks/few_step.py \\
        --baseline runs/flow/checkpoints/last --shortcut runs/shortcut/checkpoints/last \\
        --tasks reach-v3 push-v3 --episodes 50 --threads 1 --out benchmarks/results/few_step.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from mixpolicy.envs.evaluate import evaluate_policy
from mixpolicy.policies.checkpoint import load_policy
from mixpolicy.policies.denoising_policy import example_observation
from mixpolicy.policies.solvers import function_evaluations


def can_sample(policy, steps: int) -> bool:
    try:
        policy.objective.schedule(steps)
    except ValueError:
        return False
    return True


def time_side_by_side(variants: dict[str, tuple], repeats: int, warmup: int = 3) -> dict[str, dict[str, float]]:
    """Milliseconds per batch-1 chunk for each variant (policy, steps), variants interleaved."""
    obs = {name: example_observation(policy, 1) for name, (policy, _) in variants.items()}
    times: dict[str, list[float]] = {name: [] for name in variants}
    with torch.inference_mode():
        for _ in range(warmup):  # also builds the expert cache of each schedule once
            for name, (policy, steps) in variants.items():
                policy.plan(obs[name], torch.Generator().manual_seed(0), num_steps=steps)
        for r in range(repeats):
            for name, (policy, steps) in variants.items():
                g = torch.Generator().manual_seed(r)
                t = time.perf_counter()
                policy.plan(obs[name], g, num_steps=steps)
                times[name].append(1000 * (time.perf_counter() - t))
    return {k: {"median_ms": statistics.median(v), "p90_ms": float(np.percentile(v, 90))} for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", required=True, help="checkpoint of the many-step policy (e.g. dit_flow, 10 steps)")
    ap.add_argument("--shortcut", default="", help="checkpoint of a shortcut policy (policy=dit_shortcut)")
    ap.add_argument("--distilled", default="", help="checkpoint of a student distilled from a policy (distill_from=...)")
    ap.add_argument("--tasks", nargs="+", default=["reach-v3"])
    ap.add_argument("--steps", nargs="+", type=int, default=[], help="step counts (default: 1, 2 and the baseline's own)")
    ap.add_argument("--episodes", type=int, default=50, help="episodes per task (0: latency only)")
    ap.add_argument("--num-envs", type=int, default=25)
    ap.add_argument("--max-episode-steps", type=int, default=0, help="0: the environment's own")
    ap.add_argument("--seed", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="benchmarks/results/few_step.json")
    args = ap.parse_args()
    if not (args.shortcut or args.distilled):
        ap.error("give a few-step policy: --shortcut and/or --distilled")
    torch.set_num_threads(args.threads)
    policies = {}
    for role in ("baseline", *(r for r in ("shortcut", "distilled") if getattr(args, r))):
        policy, _ = load_policy(getattr(args, role), device=args.device)
        policies[role] = policy.eval()
    steps = args.steps or sorted({1, 2, policies["baseline"].cfg.objective.num_inference_steps})
    variants = {f"{role}@{n}": (p, n) for n in steps for role, p in policies.items() if can_sample(p, n)}

    rows = []
    for n in steps:
        for role, policy in policies.items():
            row = {"policy": role, "objective": policy.cfg.objective.type, "steps": n, "checkpoint": getattr(args, role)}
            if f"{role}@{n}" not in variants:
                rows.append({**row, "note": f"{policy.cfg.objective.type} cannot sample {n} steps"})
                continue
            row["network_evaluations"] = function_evaluations(policy.objective, n)
            if args.episodes:
                res = evaluate_policy(policy, args.tasks, episodes_per_task=args.episodes, seed=args.seed, num_envs=args.num_envs,
                                      max_episode_steps=args.max_episode_steps, num_inference_steps=n, progress=False)  # fmt: skip
                row["success"] = res["average_success"]
                row["wilson95"] = res["overall_wilson95"]
                row["per_task"] = {t: r["success_rate"] for t, r in res["tasks"].items()}
            rows.append(row)
    latency = time_side_by_side(variants, args.repeats)
    for row in rows:
        row.update(latency.get(f"{row['policy']}@{row['steps']}", {}))

    print(f"tasks {' '.join(args.tasks)}, {args.episodes} episodes each; latency at batch 1, {args.threads} thread(s), "
          f"median / p90 of {args.repeats}, side by side")  # fmt: skip
    print("| policy | objective | steps | NFE | success | 95% interval | chunk ms (median) | p90 ms |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if "note" in r:
            print(f"| {r['policy']} | {r['objective']} | {r['steps']} | n/a | n/a | | | |")
            continue
        succ = f"{r['success']:.3f}" if "success" in r else "-"
        ci = "[{:.2f}, {:.2f}]".format(*r["wilson95"]) if "wilson95" in r else ""
        print(f"| {r['policy']} | {r['objective']} | {r['steps']} | {r['network_evaluations']} | {succ} | {ci} | {r['median_ms']:.2f} | {r['p90_ms']:.2f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"tasks": args.tasks, "episodes_per_task": args.episodes, "seed": args.seed, "threads": args.threads, "repeats": args.repeats,
            "device": args.device, "torch": torch.__version__}  # fmt: skip
    out.write_text(json.dumps({"config": meta, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
