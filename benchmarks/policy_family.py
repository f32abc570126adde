"""Dense vs MoDE, diffusion vs flow: one multitask policy per variant, trained and evaluated.

Each ``run`` trains one variant on a dataset (equal steps, batch and active parameters
for every variant), evaluates it closed-loop (Wilson intervals over episodes with seeds
disjoint from the demonstrations), measures its action-chunk latency (batch 1, one
thread) and writes ``<out>/<variant>/result.json``; ``report`` prints the markdown table.
Run the variants one at a time under the shared lock, e.g.::

    for v in dit_edm dit_flow mode mode_flow; do
      flock /tmp/mixpolicy-bench.lock python benchmarks/policy_family.py run --variant $v \
          --dataset data/mt10.zarr --out runs/family --steps 3000
    done
    python benchmarks/policy_family.py report --out runs/family
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from mixpolicy.cli import compose  # noqa: E402
from mixpolicy.config import from_dict  # noqa: E402
from mixpolicy.policies.checkpoint import load_policy  # noqa: E402
from mixpolicy.policies.denoising_policy import example_observation  # noqa: E402
from mixpolicy.policies.solvers import function_evaluations  # noqa: E402
from mixpolicy.envs.evaluate import evaluate_policy, wilson_interval  # noqa: E402
from mixpolicy.train.config import TrainConfig  # noqa: E402
from mixpolicy.train.trainer import Trainer  # noqa: E402
from mixpolicy.utils import set_threads  # noqa: E402

# variant -> policy YAML (configs/policy/<name>.yaml)
VARIANTS = {
    "dit": "dit",
    "dit_edm": "dit_edm",
    "dit_flow": "dit_flow",
    "mode": "mode",
    "mode_flow": "mode_flow",
}


def chunk_latency(policy, obs, repeats: int = 30, num_threads: int = 1, **kw) -> float:
    """Median seconds per predict_action_chunk call (after warm-up)."""
    set_threads(num_threads)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        policy.predict_action_chunk(obs, gen, **kw)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        policy.predict_action_chunk(obs, gen, **kw)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _last_metric(path: Path, key: str) -> float:
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return float(lines[-1][key]) if lines and key in lines[-1] else float("nan")


def run(args) -> None:
    name = args.name or args.variant
    out = Path(args.out) / name
    overrides = [
        f"policy={VARIANTS[args.variant]}",
        f"dataset={args.dataset}",
        f"out_dir={out / 'train'}",
        f"steps={args.steps}",
        f"batch_size={args.batch_size}",
        f"seed={args.seed}",
        f"num_threads={args.threads}",
        "overwrite=true",
        "progress=false",
        *args.override,
    ]
    cfg = from_dict(TrainConfig, compose("train", overrides))
    trainer = Trainer(cfg)
    counts = trainer.policy.parameter_counts()
    print(f"{args.variant}: {counts['total'] / 1e6:.3f}M parameters, {counts['active'] / 1e6:.3f}M active", flush=True)
    train_res = trainer.run()
    policy, _ = load_policy(train_res["checkpoint"])
    set_threads(args.threads)
    tasks = list(policy.shape_meta.tasks)
    t = time.perf_counter()
    # --episodes 0 trains only (the checkpoint is evaluated later with `mixpolicy eval`)
    ev = evaluate_policy(policy, tasks, episodes_per_task=args.episodes, seed=100_000, progress=False) if args.episodes else None
    eval_s = time.perf_counter() - t
    latency = chunk_latency(policy, example_observation(policy))
    result = {
        "variant": name,
        "policy": VARIANTS[args.variant],
        "params_total": counts["total"],
        "params_active": counts["active"],
        "steps": train_res["steps"],
        "batch_size": args.batch_size,
        "train_seconds": train_res["seconds"],
        "train_steps_per_s": train_res["steps"] / train_res["seconds"],
        "final_loss": train_res["final_loss"],
        # the denoising part alone (MoDE's loss also holds its router terms)
        "final_denoise_loss": _last_metric(out / "train" / "metrics.jsonl", "denoise_loss"),
        "seed": args.seed,
        "episodes_per_task": args.episodes,
        **({
            "eval_seeds": [100_000, 100_000 + args.episodes - 1],
            "per_task": {k: {"successes": v["successes"], "episodes": v["episodes"]} for k, v in ev["tasks"].items()},
            "average_success": ev["average_success"],
            "overall_wilson95": ev["overall_wilson95"],
        } if ev else dict.fromkeys(("eval_seeds", "per_task", "average_success", "overall_wilson95"))),
        "eval_seconds": eval_s,
        "num_inference_steps": policy.cfg.objective.num_inference_steps,
        "function_evaluations": function_evaluations(policy.objective, policy.cfg.objective.num_inference_steps),
        "chunk_latency_s_batch1_1thread": latency,
        "overrides": args.override,
    }
    (out / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "per_task"}, indent=2))


def report(args) -> None:
    rows = []
    for p in sorted(Path(args.out).glob("*/result.json")):
        rows.append(json.loads(p.read_text()))
    if not rows:
        raise SystemExit(f"no results under {args.out}")
    rows.sort(key=lambda r: (list(VARIANTS).index(r["policy"]), r["variant"]))
    evaluated = [r for r in rows if r["per_task"]]  # runs with --episodes 0 have no success rows
    if evaluated:
        print("| task | " + " | ".join(r["variant"] for r in evaluated) + " |")
        print("|" + " --- |" * (len(evaluated) + 1))
        for t in evaluated[0]["per_task"]:
            cells = []
            for r in evaluated:
                s, n = r["per_task"][t]["successes"], r["per_task"][t]["episodes"]
                lo, hi = wilson_interval(s, n)
                cells.append(f"{100 * s / n:.0f}% [{100 * lo:.0f}, {100 * hi:.0f}]")
            print(f"| {t} | " + " | ".join(cells) + " |")
        cells = [f"**{100 * r['average_success']:.1f}%** [{100 * r['overall_wilson95'][0]:.1f}, {100 * r['overall_wilson95'][1]:.1f}]" for r in evaluated]
        print("| average | " + " | ".join(cells) + " |")
    else:
        print("(no run under this folder was evaluated: each was trained with --episodes 0)")
    print()
    print("| variant | params total / active | train steps/s (batch {}) |".format(rows[0]["batch_size"]) + " chunk latency (ms, batch 1, 1 thread) | NFE | final denoising loss |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['variant']} | {r['params_total'] / 1e6:.3f}M / {r['params_active'] / 1e6:.3f}M | {r['train_steps_per_s']:.2f} | "
            f"{1000 * r['chunk_latency_s_batch1_1thread']:.1f} | {r['function_evaluations']} | "
            f"{r.get('final_denoise_loss', r['final_loss']):.4f} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="train, evaluate and time one variant")
    r.add_argument("--variant", choices=sorted(VARIANTS), required=True)
    r.add_argument("--name", default="", help="result folder name (default: the variant)")
    r.add_argument("--dataset", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--steps", type=int, default=3000)
    r.add_argument("--batch-size", type=int, default=128)
    r.add_argument("--episodes", type=int, default=50, help="evaluation episodes per task (0: train only)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--override", action="append", default=[], help="extra train override, e.g. policy.network.depth=6")
    p = sub.add_parser("report", help="print the markdown tables of all runs under --out")
    p.add_argument("--out", required=True)
    args = ap.parse_args()
    run(args) if args.cmd == "run" else report(args)


if __name__ == "__main__":
    main()
