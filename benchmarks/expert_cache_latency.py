"""Action-chunk latency: MoDE with expert caching vs uncached routing vs a dense denoiser.

The dense model and MoDE have equal active parameters (MoDE's default expert ratio 1.25
with top-2 of 4 experts). Latency is the full policy call (observation encoding and all
sampling steps), median over repeats, measured round-robin so load changes hit every
variant alike. Weights are random: routing cost does not depend on what was learned.

    flock /tmp/mixpolicy-bench.lock python benchmarks/expert_cache_latency.py --threads 1

With ``--checkpoints`` it times trained checkpoints instead, side by side (a MoDE
checkpoint is timed both cached and uncached).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mixpolicy.policies.config import policy_config_from_dict
from mixpolicy.policies.denoising_policy import DenoisingPolicy, ShapeMeta

SIZES = {
    "tiny": dict(width=32, depth=2, heads=2),
    "small": dict(width=128, depth=4, heads=4),
    "base": dict(width=512, depth=12, heads=8),
}


def build(size: str, objective: str, steps: int):
    shapes = ShapeMeta(obs={"state": [39]}, action_dim=4, tasks=[f"task{i}" for i in range(10)])
    common = {"objective": {"type": objective, "num_inference_steps": steps}}
    torch.manual_seed(0)
    dense = DenoisingPolicy(policy_config_from_dict({"network": SIZES[size], **common}), shapes).eval()
    mode_cfg = policy_config_from_dict({"network": {"type": "mode", **SIZES[size]}, **common})
    cached = DenoisingPolicy(mode_cfg, shapes).eval()
    uncached_cfg = policy_config_from_dict({"network": {"type": "mode", **SIZES[size], "expert_cache": False}, **common})
    uncached = DenoisingPolicy(uncached_cfg, shapes).eval()
    uncached.load_state_dict(cached.state_dict())
    return {"dense": dense, "mode_uncached": uncached, "mode_cached": cached}


def time_round_robin(policies: dict, obs: dict, repeats: int) -> dict[str, float]:
    """Median milliseconds per predict_action_chunk, variants interleaved."""
    times = {k: [] for k in policies}
    with torch.inference_mode():
        for p in policies.values():  # warm-up (builds the expert cache once)
            for _ in range(2):
                p.predict_action_chunk(obs, torch.Generator().manual_seed(0))
        for r in range(repeats):
            for k, p in policies.items():
                t = time.perf_counter()
                p.predict_action_chunk(obs, torch.Generator().manual_seed(r))
                times[k].append(time.perf_counter() - t)
    return {k: 1000 * statistics.median(v) for k, v in times.items()}


def checkpoints(paths: list[str], batches: list[int], repeats: int) -> None:
    from mixpolicy.policies.checkpoint import load_policy

    policies = {}
    for path in paths:
        policy, meta = load_policy(path)
        name = policy.cfg.type + "_" + policy.cfg.objective.type
        if policy.cfg.network.type == "mode":
            policy.cfg.network.expert_cache = True
            policies[name + " (cached)"] = policy
            uncached, _ = load_policy(path)
            uncached.cfg.network.expert_cache = False
            policies[name + " (uncached)"] = uncached
        else:
            policies[name] = policy
    first = next(iter(policies.values()))
    print("| batch | " + " | ".join(policies) + " |")
    print("|" + " --- |" * (len(policies) + 1))
    for b in batches:
        obs = {"state": torch.randn(b, first.cfg.n_obs_steps, first.shape_meta.obs["state"][0]), "task": torch.zeros(b, dtype=torch.long)}
        ms = time_round_robin(policies, obs, repeats)
        print(f"| {b} | " + " | ".join(f"{v:.1f} ms" for v in ms.values()) + " |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["small", "base"], choices=sorted(SIZES))
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 25])
    ap.add_argument("--objective", default="edm", choices=["ddpm", "edm", "flow"])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--checkpoints", nargs="+", default=[], help="time these trained checkpoints (state observations) instead")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.checkpoints:
        print(f"trained checkpoints, {args.threads} thread(s), median of {args.repeats}, own sampling steps")
        checkpoints(args.checkpoints, args.batch, args.repeats)
        return
    print(f"objective {args.objective}, {args.steps} sampling steps, {args.threads} thread(s), median of {args.repeats}")
    print("| size | params dense | MoDE total / active | batch | dense ms | MoDE uncached ms | MoDE cached ms | uncached / cached | cached / dense |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for size in args.sizes:
        policies = build(size, args.objective, args.steps)
        dense_n = policies["dense"].parameter_counts()["total"]
        mc = policies["mode_cached"].parameter_counts()
        for b in args.batch:
            obs = {"state": torch.randn(b, 2, 39), "task": torch.zeros(b, dtype=torch.long)}
            ms = time_round_robin(policies, obs, args.repeats)
            print(
                f"| {size} | {dense_n / 1e6:.2f}M | {mc['total'] / 1e6:.2f}M / {mc['active'] / 1e6:.2f}M | {b} | {ms['dense']:.1f} | "
                f"{ms['mode_uncached']:.1f} | {ms['mode_cached']:.1f} | {ms['mode_uncached'] / ms['mode_cached']:.2f}x | "
                f"{ms['mode_cached'] / ms['dense']:.2f}x |",
                flush=True,
            )


if __name__ == "__main__":
    main()
