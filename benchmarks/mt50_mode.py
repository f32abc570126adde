"""MT50 (all 50 Meta-World v3 tasks, state observations, one policy): dense vs MoDE.

Variants of one EDM policy, same width, depth, steps and batch:

- ``dense``: the dense transformer (GELU MLPs of ratio 4);
- ``mode_active``: MoDE, 4 SwiGLU experts top-2 of ratio 1.25: the dense active parameters;
- ``mode_total``: MoDE with the expert ratio that gives the dense *total* parameters
  (fewer active ones);
- ``mode_total_top1``: the same experts, each token routed to one of them (top-1): the
  dense total parameters at about half its FLOPs per chunk.

``flops`` counts parameters and FLOPs per action chunk (batch 1, the policy's sampling
schedule, with and without MoDE's expert cache) with ``torch.utils.flop_counter``; it
needs no data and no training. Every ``run`` also records them. Commands, for whoever
measures::

    python benchmarks/mt50_mode.py collect --out data/mt50.zarr --episodes 50
    for v in dense mode_active mode_total mode_total_top1; do
      flock /tmp/mixpolicy-bench.lock python benchmarks/mt50_mode.py run --variant $v \
          --dataset data/mt50.zarr --out runs/mt50 --steps 20000 --episodes 50
    done
    python benchmarks/mt50_mode.py report --out runs/mt50
    python benchmarks/mt50_mode.py flops --out runs/mt50/flops.json

Evaluations run in parts (``--episodes 0``, then ``mixpolicy eval ... seed=...`` over disjoint
seed ranges) are pooled per policy, the first named the baseline::

    python benchmarks/mt50_mode.py merge --out runs/mt50/eval50.json \
        --eval dense=runs/mt50/dense_a/results.json,runs/mt50/dense_b/results.json \
        --eval mode_active=runs/mt50/mode_a/results.json,runs/mt50/mode_b/results.json
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from mixpolicy.cli import compose  # noqa: E402
from mixpolicy.config import from_dict  # noqa: E402
from mixpolicy.envs.metaworld_env import ACTION_DIM, STATE_DIM, available_tasks  # noqa: E402
from mixpolicy.policies.denoising_policy import DenoisingPolicy, ShapeMeta, example_observation  # noqa: E402
from mixpolicy.train.config import TrainConfig  # noqa: E402

VARIANTS = ("dense", "mode_active", "mode_total", "mode_total_top1")


def total_ratio(width: int, experts: int, router_ratio: float = 0.5) -> float:
    """The MoDE expert ratio whose block MLP has the dense one's parameters: E * 3 h w
    (SwiGLU) + router = 8 w^2 + 5 w (GELU MLP of ratio 4 with biases)."""
    rh = max(1, int(width * router_ratio))
    router = width * rh + rh + rh * experts + experts
    hidden = max(1, round((8 * width * width + 5 * width - router) / (3 * experts * width)))
    return (hidden + 0.5) / width  # int(width * ratio) == hidden


def variant_overrides(variant: str, width: int, depth: int, experts: int) -> list[str]:
    common = [f"policy.network.width={width}", f"policy.network.depth={depth}"]
    if variant == "dense":
        return ["policy=dit_edm", *common]
    mode = ["policy=mode", *common, f"policy.network.num_experts={experts}"]
    if variant in ("mode_total", "mode_total_top1"):
        mode.append(f"policy.network.mlp_ratio={total_ratio(width, experts):.6f}")
    if variant == "mode_total_top1":
        mode.append("policy.network.top_k=1")
    return mode


def mt50_shape_meta() -> ShapeMeta:
    return ShapeMeta(obs={"state": [STATE_DIM]}, action_dim=ACTION_DIM, tasks=available_tasks())


def chunk_flops(policy, cache: bool) -> int:
    """FLOPs of one action chunk (batch 1, the policy's schedule)."""
    policy.eval()
    if policy.cfg.network.type == "mode":
        policy.cfg.network.expert_cache = cache
    obs = example_observation(policy)
    policy.plan(obs, torch.Generator().manual_seed(0))  # builds the expert cache outside the count
    counter = FlopCounterMode(display=False)
    with counter:
        policy.plan(obs, torch.Generator().manual_seed(0))
    return int(counter.get_total_flops())


def measure(variant: str, width: int, depth: int, experts: int, overrides: list[str]) -> dict:
    cfg = from_dict(TrainConfig, compose("train", [*variant_overrides(variant, width, depth, experts), "dataset=unused", "out_dir=unused", *overrides]))
    torch.manual_seed(0)
    policy = DenoisingPolicy(cfg.policy, mt50_shape_meta())
    counts = policy.parameter_counts()
    row = {"variant": variant, "params_total": counts["total"], "params_active": counts["active"], "flops_per_chunk": chunk_flops(policy, cache=True)}
    if cfg.policy.network.type == "mode":
        row["mlp_ratio"] = cfg.policy.network.mlp_ratio
        row["flops_per_chunk_uncached"] = chunk_flops(policy, cache=False)
    row["num_inference_steps"] = cfg.policy.objective.num_inference_steps
    return row


def flops(args) -> None:
    rows = [measure(v, args.width, args.depth, args.experts, args.override) for v in VARIANTS]
    print("| variant | params total / active | FLOPs per chunk (expert cache) | uncached |")
    print("| --- | --- | --- | --- |")
    for r in rows:
        unc = r.get("flops_per_chunk_uncached")
        print(f"| {r['variant']} | {r['params_total'] / 1e6:.3f}M / {r['params_active'] / 1e6:.3f}M | "
              f"{r['flops_per_chunk'] / 1e6:.2f} MFLOP | {'-' if unc is None else f'{unc / 1e6:.2f} MFLOP'} |")  # fmt: skip
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"width": args.width, "depth": args.depth, "experts": args.experts, "rows": rows}, indent=2))


def collect_data(args) -> None:
    from mixpolicy.envs.collect import CollectConfig, collect

    collect(CollectConfig(tasks=available_tasks(), episodes_per_task=args.episodes, out=args.out, seed=0))


def run(args) -> None:
    """Train and evaluate one variant with the policy-family benchmark's runner."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from policy_family import VARIANTS as FAMILY, run as family_run

    FAMILY[args.variant] = "dit_edm" if args.variant == "dense" else "mode"
    policy_override = variant_overrides(args.variant, args.width, args.depth, args.experts)
    extra = list(args.override)
    args.override = [*policy_override[1:], *extra]  # the family runner sets policy= itself
    args.name = args.variant
    family_run(args)
    out = Path(args.out) / args.variant / "result.json"
    result = json.loads(out.read_text())
    result.update({k: v for k, v in measure(args.variant, args.width, args.depth, args.experts, extra).items() if k.startswith("flops") or k == "mlp_ratio"})
    out.write_text(json.dumps(result, indent=2))


def report(args) -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from policy_family import VARIANTS as FAMILY, report as family_report

    for v in VARIANTS:
        FAMILY[v] = "dit_edm" if v == "dense" else "mode"
    family_report(args)
    rows = [json.loads(p.read_text()) for p in sorted(Path(args.out).glob("*/result.json"))]
    print("\n| variant | FLOPs per chunk (expert cache) | uncached |\n| --- | --- | --- |")
    for r in rows:
        unc = r.get("flops_per_chunk_uncached")
        print(f"| {r['variant']} | {r.get('flops_per_chunk', 0) / 1e6:.2f} MFLOP | {'-' if unc is None else f'{unc / 1e6:.2f} MFLOP'} |")


def merge(args) -> None:
    """Pool several ``mixpolicy eval`` results of one checkpoint (disjoint seed ranges) into one
    success table per policy: per-task successes summed, Wilson intervals over the pool."""
    from mixpolicy.utils import wilson_interval

    pooled: dict = {}
    for spec in args.eval:
        name, _, files = spec.partition("=")
        if not files:
            raise SystemExit(f"--eval {spec!r}: expected NAME=results.json[,results.json...]")
        tasks: dict[str, list[int]] = {}
        seeds: dict[str, set[int]] = {}
        for f in files.split(","):
            try:
                res = json.loads(Path(f).read_text())
            except (OSError, ValueError) as exc:
                raise SystemExit(f"--eval {name}: cannot read {f}: {exc}") from None
            if "tasks" not in res:
                raise SystemExit(f"--eval {name}: {f} is not a `mixpolicy eval` results.json (no 'tasks')")
            for task, t in res["tasks"].items():
                overlap = seeds.setdefault(task, set()) & set(t["seeds"])
                if overlap:
                    raise SystemExit(f"{f}: {task} seeds {sorted(overlap)[:3]} already counted for {name}")
                seeds[task] |= set(t["seeds"])
                acc = tasks.setdefault(task, [0, 0])
                acc[0] += t["successes"]
                acc[1] += t["episodes"]
        succ, n = sum(a[0] for a in tasks.values()), sum(a[1] for a in tasks.values())
        pooled[name] = {
            "success": succ / n, "wilson95": list(wilson_interval(succ, n)), "episodes": n,
            "episodes_per_task": sorted({a[1] for a in tasks.values()}),
            "seeds": [min(min(v) for v in seeds.values()), max(max(v) for v in seeds.values())],
            "per_task": {k: a[0] / a[1] for k, a in sorted(tasks.items())}, "files": files.split(","),
        }  # fmt: skip
        print(f"{name}: {100 * succ / n:.1f}% [{100 * pooled[name]['wilson95'][0]:.1f}, {100 * pooled[name]['wilson95'][1]:.1f}] over {n} episodes")
    names = list(pooled)
    for other in names[1:]:
        a, b = pooled[names[0]]["per_task"], pooled[other]["per_task"]
        common = sorted(set(a) & set(b))
        better = sum(b[t] > a[t] for t in common)
        worse = sum(b[t] < a[t] for t in common)
        p0, n0, p1, n1 = pooled[names[0]]["success"], pooled[names[0]]["episodes"], pooled[other]["success"], pooled[other]["episodes"]
        half = 1.96 * (p0 * (1 - p0) / n0 + p1 * (1 - p1) / n1) ** 0.5  # Wald interval of the difference
        diff = 100 * (p1 - p0)
        pooled[other]["vs_" + names[0]] = {"points": diff, "wald95_points": [diff - 100 * half, diff + 100 * half], "better_tasks": better, "worse_tasks": worse}
        print(f"{other} vs {names[0]}: {diff:+.1f} points [{diff - 100 * half:+.1f}, {diff + 100 * half:+.1f}], better on {better} tasks, worse on {worse}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(pooled, indent=2))


def latency(args) -> None:
    """Median seconds per action chunk (batch 1, expert cache on) of trained checkpoints, side by
    side: every repeat calls each policy once, in rotating order, so a slow moment of the
    machine lands on all of them."""
    import statistics
    import time

    from mixpolicy.policies.checkpoint import load_policy
    from mixpolicy.utils import cpu_model, set_threads

    set_threads(args.threads)
    policies = {}
    for spec in args.checkpoint:
        name, _, path = spec.partition("=")
        if not path:
            raise SystemExit(f"--checkpoint {spec!r}: expected NAME=path")
        policy, _ = load_policy(path)
        policy.eval()
        policies[name] = (policy, example_observation(policy))
    gen = torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = {n: [] for n in policies}
    names = list(policies)
    with torch.inference_mode():
        for n in names:  # warm-up: builds the expert caches
            for _ in range(3):
                policies[n][0].plan(policies[n][1], gen)
        for r in range(args.repeats):
            for n in names[r % len(names):] + names[: r % len(names)]:
                policy, obs = policies[n]
                t = time.perf_counter()
                policy.plan(obs, gen)
                times[n].append(time.perf_counter() - t)
    base = statistics.median(times[names[0]])
    rows = {n: {"median_ms": 1000 * statistics.median(t), "ratio_to_" + names[0]: statistics.median(t) / base} for n, t in times.items()}
    for n, r in rows.items():
        print(f"{n}: {r['median_ms']:.2f} ms per chunk ({r['ratio_to_' + names[0]]:.2f}x {names[0]})")
    if args.out:
        Path(args.out).write_text(json.dumps({"cpu": cpu_model(), "threads": args.threads, "repeats": args.repeats, "rows": rows}, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    size = argparse.ArgumentParser(add_help=False)
    size.add_argument("--width", type=int, default=256)
    size.add_argument("--depth", type=int, default=6)
    size.add_argument("--experts", type=int, default=4)
    size.add_argument("--override", action="append", default=[], help="extra train override, e.g. policy.horizon=16")
    f = sub.add_parser("flops", parents=[size], help="parameters and FLOPs per chunk of every variant (no data)")
    f.add_argument("--out", default="", help="JSON file for the table")
    c = sub.add_parser("collect", help="scripted demonstrations of all 50 tasks")
    c.add_argument("--out", required=True)
    c.add_argument("--episodes", type=int, default=50)
    r = sub.add_parser("run", parents=[size], help="train, evaluate and count one variant")
    r.add_argument("--variant", choices=VARIANTS, required=True)
    r.add_argument("--dataset", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--steps", type=int, default=20000)
    r.add_argument("--batch-size", type=int, default=256)
    r.add_argument("--episodes", type=int, default=50, help="evaluation episodes per task (0: train only)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--threads", type=int, default=2)
    p = sub.add_parser("report", help="the tables of all runs under --out")
    p.add_argument("--out", required=True)
    m = sub.add_parser("merge", help="pool `mixpolicy eval` results over disjoint seed ranges")
    m.add_argument("--eval", action="append", required=True, help="NAME=results.json[,results.json...]; the first NAME is the baseline")
    m.add_argument("--out", default="", help="JSON file for the pooled table")
    lat = sub.add_parser("latency", help="chunk latency of trained checkpoints side by side (batch 1)")
    lat.add_argument("--checkpoint", action="append", required=True, help="NAME=checkpoint; the first NAME is the baseline")
    lat.add_argument("--repeats", type=int, default=100)
    lat.add_argument("--threads", type=int, default=1)
    lat.add_argument("--out", default="")
    args = ap.parse_args()
    {"flops": flops, "collect": collect_data, "run": run, "report": report, "merge": merge, "latency": latency}[args.cmd](args)


if __name__ == "__main__":
    main()
