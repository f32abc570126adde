"""Continual learning with per-task experts: learn task set A, then add experts for task set B.

Stages (each skipped when its output exists, so an interrupted run continues):

1. scripted demonstrations for A, B and A+B (``mixpolicy collect``);
2. ``base``: a task-routed MoDE policy trained on A;
3. ``continual``: ``add_experts=N`` on B from ``base`` (only the new experts, their router
   outputs and B's task rows train; A's actions stay bit-identical, checked here);
4. ``joint``: the same architecture with all E + N experts trained on A+B from scratch for
   the steps of both stages together;
5. closed-loop evaluation (seeds disjoint from the demonstrations) of base on A,
   continual on A and B, joint on A and B; a markdown table and ``<out>/results.json``.

Full size (A = MT10, B = 5 more Meta-World tasks), run by whoever measures::

    python benchmarks/continual_tasks.py --out runs/continual --episodes 50 \
        --steps-a 6000 --steps-b 3000 --eval-episodes 50

A tiny run that proves the pipeline (seconds of training, short episodes)::

    python benchmarks/continual_tasks.py --out /tmp/continual --tasks-a reach-v3 push-v3 \
        --tasks-b drawer-close-v3 --episodes 2 --steps-a 4 --steps-b 4 --eval-episodes 1 \
        --max-episode-steps 40 --override policy.network.width=32 --override policy.network.depth=1
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from mixpolicy.cli import compose  # noqa: E402
from mixpolicy.config import from_dict  # noqa: E402
from mixpolicy.envs.collect import CollectConfig, collect  # noqa: E402
from mixpolicy.envs.evaluate import evaluate_policy  # noqa: E402
from mixpolicy.envs.metaworld_env import MT10_TASKS  # noqa: E402
from mixpolicy.policies.checkpoint import load_policy  # noqa: E402
from mixpolicy.train.config import TrainConfig  # noqa: E402
from mixpolicy.train.trainer import Trainer  # noqa: E402
from mixpolicy.utils import set_threads  # noqa: E402

# Five Meta-World v3 tasks outside MT10.
NEW_TASKS = ("button-press-v3", "coffee-push-v3", "dial-turn-v3", "faucet-open-v3", "handle-press-v3")


def dataset(out: Path, name: str, tasks: list[str], args) -> Path:
    path = out / "data" / f"{name}.zarr"
    if not path.exists():
        collect(CollectConfig(tasks=list(tasks), episodes_per_task=args.episodes, out=str(path), seed=0, progress=False))
    return path


def train(out: Path, name: str, data: Path, steps: int, args, extra: list[str], experts: int = 0) -> Path:
    ckpt = out / name / "checkpoints" / "last"
    if ckpt.exists():
        return ckpt
    overrides = [
        "policy=mode", "policy.network.router_input=" + args.router_input, f"policy.network.num_experts={experts or args.experts}",
        f"dataset={data}", f"out_dir={out / name}", f"steps={steps}", f"batch_size={args.batch_size}", f"seed={args.seed}",
        f"num_threads={args.threads}", "overwrite=true", "progress=false", *args.override, *extra,
    ]  # fmt: skip
    trainer = Trainer(from_dict(TrainConfig, compose("train", overrides)))
    counts = trainer.policy.parameter_counts()
    trainable = sum(p.numel() for p in trainer.policy.parameters() if p.requires_grad)
    print(f"{name}: {counts['total'] / 1e6:.3f}M parameters, {counts['active'] / 1e6:.3f}M active, {trainable / 1e6:.3f}M trained", flush=True)
    trainer.run()
    return ckpt


def old_tasks_bit_identical(base, continual, n_tasks: int) -> bool:
    """The same observations and noise give the old tasks the same actions (cached and uncached)."""
    g = torch.Generator().manual_seed(0)
    state = torch.randn(n_tasks, base.cfg.n_obs_steps, base.shape_meta.obs["state"][0], generator=g)
    same = True
    for cache in (True, False):
        for policy in (base, continual):
            policy.cfg.network.expert_cache = cache
        for t in range(n_tasks):
            obs = {"state": state[t : t + 1], "task": torch.tensor([t])}
            a = base.plan(obs, torch.Generator().manual_seed(t)).actions
            b = continual.plan(obs, torch.Generator().manual_seed(t)).actions
            same &= bool(torch.equal(a, b))
    for policy in (base, continual):
        policy.cfg.network.expert_cache = True
    return same


def evaluate(out: Path, name: str, ckpt: Path, tasks: list[str], args) -> dict:
    path = out / "eval" / f"{name}.json"
    if path.exists():
        return json.loads(path.read_text())
    policy, _ = load_policy(ckpt)
    set_threads(args.threads)
    ev = evaluate_policy(policy, list(tasks), episodes_per_task=args.eval_episodes, seed=100_000, max_episode_steps=args.max_episode_steps, progress=False)
    result = {
        "per_task": {t: {"successes": r["successes"], "episodes": r["episodes"]} for t, r in ev["tasks"].items()},
        "average_success": ev["average_success"],
        "overall_wilson95": ev["overall_wilson95"],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tasks-a", nargs="+", default=list(MT10_TASKS))
    ap.add_argument("--tasks-b", nargs="+", default=list(NEW_TASKS))
    ap.add_argument("--episodes", type=int, default=50, help="demonstrations per task")
    ap.add_argument("--steps-a", type=int, default=6000)
    ap.add_argument("--steps-b", type=int, default=3000)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--experts", type=int, default=4, help="experts per block of the base policy")
    ap.add_argument("--add-experts", type=int, default=2, help="experts per block added for task set B")
    ap.add_argument("--lr-b", type=float, default=0.0, help="learning rate of the new experts' stage (0: the train config's lr)")
    ap.add_argument("--router-input", choices=("task", "both", "noise"), default="task")
    ap.add_argument("--eval-episodes", type=int, default=50)
    ap.add_argument("--max-episode-steps", type=int, default=0, help="0: the environment's own (500)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--override", action="append", default=[], help="train override for every policy, e.g. policy.network.depth=6")
    args = ap.parse_args()
    out = Path(args.out)
    overlap = set(args.tasks_a) & set(args.tasks_b)
    if overlap:
        raise SystemExit(f"task sets A and B overlap: {sorted(overlap)}")

    data_a, data_b = dataset(out, "a", args.tasks_a, args), dataset(out, "b", args.tasks_b, args)
    data_ab = dataset(out, "ab", [*args.tasks_a, *args.tasks_b], args)
    base = train(out, "base", data_a, args.steps_a, args, [])
    lr_b = [f"lr={args.lr_b}"] if args.lr_b else []
    continual = train(out, "continual", data_b, args.steps_b, args, [f"init_from={base}", f"add_experts={args.add_experts}", *lr_b])
    total = args.experts + args.add_experts
    joint = train(out, "joint", data_ab, args.steps_a + args.steps_b, args, [], experts=total)

    base_policy, continual_policy = load_policy(base)[0], load_policy(continual)[0]
    identical = old_tasks_bit_identical(base_policy, continual_policy, len(args.tasks_a))
    evals = {
        "base_on_a": evaluate(out, "base_on_a", base, args.tasks_a, args),
        "continual_on_a": evaluate(out, "continual_on_a", continual, args.tasks_a, args),
        "continual_on_b": evaluate(out, "continual_on_b", continual, args.tasks_b, args),
        "joint_on_a": evaluate(out, "joint_on_a", joint, args.tasks_a, args),
        "joint_on_b": evaluate(out, "joint_on_b", joint, args.tasks_b, args),
    }
    counts = {name: load_policy(c)[0].parameter_counts() for name, c in (("base", base), ("continual", continual), ("joint", joint))}
    results = {
        "tasks_a": args.tasks_a, "tasks_b": args.tasks_b, "episodes_per_task": args.episodes, "eval_episodes": args.eval_episodes,
        "steps_a": args.steps_a, "steps_b": args.steps_b, "batch_size": args.batch_size, "experts": args.experts,
        "add_experts": args.add_experts, "lr_b": args.lr_b or None, "router_input": args.router_input, "seed": args.seed, "overrides": args.override,
        "old_tasks_bit_identical": identical, "parameters": counts, "evaluations": evals,
    }  # fmt: skip
    (out / "results.json").write_text(json.dumps(results, indent=2))

    def cell(name: str) -> str:
        r = evals[name]
        lo, hi = r["overall_wilson95"]
        return f"{100 * r['average_success']:.1f}% [{100 * lo:.0f}, {100 * hi:.0f}]"

    print(f"| policy | params total / active | A ({len(args.tasks_a)} tasks) | B ({len(args.tasks_b)} tasks) |")
    print("| --- | --- | --- | --- |")
    for name, a, b in (("base (A)", "base_on_a", None), ("continual (A, then B experts)", "continual_on_a", "continual_on_b"), ("joint (A+B)", "joint_on_a", "joint_on_b")):
        c = counts[name.split()[0]]
        print(f"| {name} | {c['total'] / 1e6:.3f}M / {c['active'] / 1e6:.3f}M | {cell(a)} | {cell(b) if b else '-'} |")
    print(f"\nold tasks' actions bit-identical after adding experts: {identical}; results: {out / 'results.json'}")


if __name__ == "__main__":
    main()
