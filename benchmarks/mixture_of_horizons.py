"""Mixture of horizons on Meta-World: success, policy calls and time per episode, step cost.

Subcommands (run each under the shared lock):

* ``eval``: closed-loop evaluation of one checkpoint with one execution setting (a fixed
  count, or adaptive execution at a ratio); writes ``<out>/<name>.json``.
* ``steptime``: training steps of several policy configs side by side on one dataset
  (interleaved, same batches drawn per step), median seconds per step and ratios.
* ``latency``: median seconds per planning call (batch 1 and 25) of trained checkpoints,
  interleaved in one process.
* ``report``: the markdown table of every ``eval`` result under ``--out``.

Example::

    flock /tmp/mixpolicy-bench.lock python benchmarks/mixture_of_horizons.py eval \\
        --checkpoint runs/moh/checkpoints/last --name moh_adaptive_1.2 --adaptive-ratio 1.2 --out runs/moh_eval
    python benchmarks/mixture_of_horizons.py report --out runs/moh_eval
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from mixpolicy.cli import compose  # noqa: E402
from mixpolicy.config import from_dict  # noqa: E402
from mixpolicy.policies.checkpoint import load_policy  # noqa: E402
from mixpolicy.policies.denoising_policy import example_observation  # noqa: E402
from mixpolicy.envs.evaluate import evaluate_policy, wilson_interval  # noqa: E402
from mixpolicy.train.config import TrainConfig  # noqa: E402
from mixpolicy.train.trainer import Trainer  # noqa: E402
from mixpolicy.utils import set_threads  # noqa: E402


# ---------------------------------------------------------------------- eval
def cmd_eval(args) -> None:
    set_threads(args.threads)
    policy, meta = load_policy(args.checkpoint)
    if args.adaptive_ratio:
        changes = {"execution": "adaptive", "adaptive_ratio": args.adaptive_ratio}
        if args.min_executed:
            changes["min_executed"] = args.min_executed
        policy.cfg = dataclasses.replace(policy.cfg, head=dataclasses.replace(policy.cfg.head, **changes))
        policy.head.cfg = policy.cfg.head
    elif policy.cfg.head.type == "moh":
        policy.set_execution("fixed")
    tasks = args.tasks or list(policy.shape_meta.tasks)
    t0 = time.perf_counter()
    ev = evaluate_policy(
        policy,
        tasks,
        episodes_per_task=args.episodes,
        seed=args.seed,
        num_envs=args.num_envs,
        n_action_steps=args.n_action_steps or None,
        progress=False,
    )
    seconds = time.perf_counter() - t0
    n_eps = sum(r["episodes"] for r in ev["tasks"].values())
    result = {
        "name": args.name,
        "checkpoint": args.checkpoint,
        "policy_type": meta["policy_type"],
        "horizon": policy.cfg.horizon,
        "horizons": list(policy.cfg.head.horizons) if policy.cfg.head.type == "moh" else [policy.cfg.horizon],
        "train_step": meta.get("info", {}).get("step"),
        "execution": ev["execution"],
        "episodes_per_task": args.episodes,
        "eval_seeds": [args.seed, args.seed + args.episodes - 1],
        "num_envs": args.num_envs,
        "threads": args.threads,
        "per_task": {
            k: {"successes": v["successes"], "episodes": v["episodes"], "mean_policy_calls": v["mean_policy_calls"], "mean_length": v["mean_length"]}
            for k, v in ev["tasks"].items()
        },
        "average_success": ev["average_success"],
        "overall_wilson95": ev["overall_wilson95"],
        "mean_policy_calls": ev["mean_policy_calls"],
        "mean_executable": ev["mean_executable"],
        "mean_episode_length": float(np.mean([e["length"] for r in ev["tasks"].values() for e in r["per_episode"]])),
        "wall_s_per_episode": seconds / n_eps,
        "policy_s_per_episode": ev["policy_seconds"] / n_eps,
        "eval_seconds": seconds,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "per_task"}, indent=2))


# ---------------------------------------------------------------------- training step time
def cmd_steptime(args) -> None:
    """Interleave optimization steps of each config (same data, same batch size)."""
    set_threads(args.threads)
    trainers = {}
    tmp = Path(tempfile.mkdtemp(prefix="moh_steptime_"))
    for spec in args.config:
        name, _, rest = spec.partition("=")
        overrides = [o for o in rest.split(",") if o and o != "unpacked"]
        d = compose(
            "train",
            [f"dataset={args.dataset}", f"out_dir={tmp / name}", f"batch_size={args.batch_size}", f"num_threads={args.threads}",
             "progress=false", *args.override, *overrides],
        )  # fmt: skip
        trainers[name] = Trainer(from_dict(TrainConfig, d))
        trainers[name].policy.train()
        if "unpacked" in rest.split(","):  # one padded row per horizon instead of shared rows
            from mixpolicy.policies.moh import HorizonLayout

            policy = trainers[name].policy
            policy.head.set_layout(HorizonLayout(policy.cfg.head.horizons, 1 + policy.net.n_cond_tokens, policy.net.mask, pack=False))
    times = {n: [] for n in trainers}
    for i in range(args.warmup + args.steps):
        for name, trainer in trainers.items():
            t = time.perf_counter()
            trainer.train_step()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t)
    base = statistics.median(times[next(iter(trainers))])
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        tokens = None
        policy = trainers[name].policy
        if policy.cfg.head.type == "moh":
            tokens = policy.head.layout.rows * policy.head.layout.row_length
        rows.append({"config": name, "median_s": med, "ratio": med / base, "params": sum(p.numel() for p in policy.parameters()), "tokens_per_sample": tokens})
        print(f"{name:24s} {1e3 * med:8.1f} ms/step  x{med / base:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"dataset": args.dataset, "batch_size": args.batch_size, "threads": args.threads, "steps": args.steps, "rows": rows}, indent=2))


# ---------------------------------------------------------------------- latency
def cmd_latency(args) -> None:
    set_threads(args.threads)
    policies = {}
    for spec in args.checkpoint:
        name, _, path = spec.partition("=")
        policies[name] = load_policy(path)[0]
    rows = []
    for batch in args.batch:
        obs = {n: example_observation(p, batch) for n, p in policies.items()}
        times = {n: [] for n in policies}
        gen = torch.Generator().manual_seed(0)
        for i in range(3 + args.repeats):
            for name, policy in policies.items():
                t = time.perf_counter()
                policy.plan(obs[name], gen)
                if i >= 3:
                    times[name].append(time.perf_counter() - t)
        for name in policies:
            med = statistics.median(times[name])
            rows.append({"checkpoint": name, "batch": batch, "median_ms": 1e3 * med})
            print(f"batch {batch:3d} {name:24s} {1e3 * med:8.2f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps({"threads": args.threads, "repeats": args.repeats, "rows": rows}, indent=2))


# ---------------------------------------------------------------------- adaptive lengths offline
def cmd_lengths(args) -> None:
    """Adaptive lengths on dataset windows (no simulation): one sampling pass per batch,
    then the lengths every (ratio, min_executed) pair would give."""
    from mixpolicy.datasets.replay_buffer import ReplayBuffer
    from mixpolicy.datasets.sampler import InMemoryWindows, SequenceSampler
    from mixpolicy.policies.denoising_policy import TASK_KEY
    from mixpolicy.policies.moh import adaptive_lengths

    set_threads(args.threads)
    policy, _ = load_policy(args.checkpoint)
    buffer = ReplayBuffer.open(args.dataset)
    offsets = {k: range(-(policy.cfg.n_obs_steps - 1), 1) for k in policy.cfg.obs_keys}
    windows = InMemoryWindows(buffer.load(offsets), SequenceSampler(buffer.episode_ends, offsets), extras={TASK_KEY: buffer.episode_task_index})
    ids = np.random.default_rng(args.seed).choice(len(windows), size=min(args.windows, len(windows)), replace=False)
    gen = torch.Generator().manual_seed(args.seed)
    disagreements = []
    for chunk in np.array_split(ids, max(1, len(ids) // 256)):
        policy.plan(windows.batch(chunk), gen)
        disagreements.append(policy.head.last_disagreement)
    d = torch.cat(disagreements)
    moh = policy.cfg.head
    print("| min_executed | ratio | mean length | share at the longest prefix | share at the minimum |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    longest = moh.longest_adaptive_prefix()
    for m in args.min_executed:
        for r in args.ratios:
            lengths = adaptive_lengths(d, moh.horizons, r, m, moh.min_active_horizons).float()
            print(f"| {m} | {r:g} | {lengths.mean():.2f} | {(lengths == longest).float().mean():.2f} | {(lengths == m).float().mean():.2f} |")
    ratio = d / d[:, :2].mean(1, keepdim=True).clamp_min(1e-12)
    print("median disagreement by index / mean of the first 2:", [round(float(v), 2) for v in ratio.median(0).values[:longest]])


# ---------------------------------------------------------------------- report
def _pct(s: int, n: int) -> str:
    lo, hi = wilson_interval(s, n)
    return f"{100 * s / n:.0f}% [{100 * lo:.0f}, {100 * hi:.0f}]"


def cmd_report(args) -> None:
    rows = [json.loads(p.read_text()) for p in sorted(Path(args.out).glob("*.json"))]
    if args.names:
        by_name = {r["name"]: r for r in rows}
        rows = [by_name[n] for n in args.names if n in by_name]
    if not rows:
        raise SystemExit(f"no results under {args.out}")
    print("| policy | horizons | execution | success [95% CI] | policy calls / episode | actions / call | episode length | wall s / episode | policy s / episode |")
    print("| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        ex = r["execution"]
        how = f"fixed {ex['n_action_steps']}" if ex["execution"] == "fixed" else f"adaptive r={ex['adaptive_ratio']:g} (min {ex['min_executed']}, max {ex['longest']})"
        lo, hi = r["overall_wilson95"]
        print(
            f"| {r['name']} | {','.join(map(str, r['horizons']))} | {how} | **{100 * r['average_success']:.1f}%** [{100 * lo:.1f}, {100 * hi:.1f}] "
            f"| {r['mean_policy_calls']:.1f} | {r['mean_executable']:.2f} | {r['mean_episode_length']:.1f} | {r['wall_s_per_episode']:.3f} | {r['policy_s_per_episode']:.3f} |"
        )
    if args.per_task:
        tasks = list(rows[0]["per_task"])
        print()
        print("| task | " + " | ".join(r["name"] for r in rows) + " |")
        print("|" + " --- |" * (len(rows) + 1))
        for t in tasks:
            print(f"| {t} | " + " | ".join(_pct(r["per_task"][t]["successes"], r["per_task"][t]["episodes"]) for r in rows) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("eval", help="closed-loop evaluation with one execution setting")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--name", required=True)
    e.add_argument("--out", required=True)
    e.add_argument("--episodes", type=int, default=50)
    e.add_argument("--seed", type=int, default=100_000)
    e.add_argument("--num-envs", type=int, default=25)
    e.add_argument("--threads", type=int, default=2)
    e.add_argument("--tasks", nargs="*", default=[])
    e.add_argument("--n-action-steps", type=int, default=0, help="fixed execution with this count (0: the policy's own)")
    e.add_argument("--adaptive-ratio", type=float, default=0.0, help="adaptive execution at this ratio (MoH policies)")
    e.add_argument("--min-executed", type=int, default=0, help="adaptive: minimum executed actions (0: the policy's own)")
    s = sub.add_parser("steptime", help="training step time of configs side by side")
    s.add_argument("--dataset", required=True)
    s.add_argument("--config", nargs="+", required=True, help="name=override,override,... (the first is the baseline; 'unpacked': one padded row per horizon)")
    s.add_argument("--override", action="append", default=[], help="applied to every config")
    s.add_argument("--batch-size", type=int, default=128)
    s.add_argument("--steps", type=int, default=30)
    s.add_argument("--warmup", type=int, default=5)
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--json", default="")
    la = sub.add_parser("latency", help="planning latency of checkpoints side by side")
    la.add_argument("--checkpoint", nargs="+", required=True, help="name=path")
    la.add_argument("--batch", type=int, nargs="+", default=[1, 25])
    la.add_argument("--repeats", type=int, default=30)
    la.add_argument("--threads", type=int, default=1)
    la.add_argument("--json", default="")
    ln = sub.add_parser("lengths", help="adaptive lengths on dataset windows for several ratios")
    ln.add_argument("--checkpoint", required=True)
    ln.add_argument("--dataset", required=True)
    ln.add_argument("--windows", type=int, default=1024)
    ln.add_argument("--ratios", type=float, nargs="+", default=[1.1, 1.2, 1.4, 2.0])
    ln.add_argument("--min-executed", type=int, nargs="+", default=[2, 4])
    ln.add_argument("--seed", type=int, default=0)
    ln.add_argument("--threads", type=int, default=2)
    r = sub.add_parser("report", help="markdown table of eval results")
    r.add_argument("--out", required=True)
    r.add_argument("--names", nargs="*", default=[])
    r.add_argument("--per-task", action="store_true")
    args = ap.parse_args()
    {"eval": cmd_eval, "steptime": cmd_steptime, "latency": cmd_latency, "lengths": cmd_lengths, "report": cmd_report}[args.cmd](args)


if __name__ == "__main__":
    main()
