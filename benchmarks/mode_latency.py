"""Per-call latency of the real-time inference modes at batch 1, side by side.

One process, one thread by default; every repeat calls each mode once in rotating order, so a
slow moment of the machine lands on all of them. Modes: ``full`` (the whole schedule from the
prior, as ``naive``), ``rti`` (warm start, the last ``--rti-k`` solver steps), ``rtc`` (the
whole schedule with the frozen-prefix constraint), ``rti+rtc`` (both). The warm start and the
constraint are built by the deploy sampler's own ``chunk_conditions`` from a planned chunk
shifted by ``--shift`` steps, with ``--delay`` frozen actions.

    python benchmarks/mode_latency.py --checkpoint runs/mt10/checkpoints/last --delay 4 --prefix guidance
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from mixpolicy.deploy.rti import chunk_conditions
from mixpolicy.policies.denoising_policy import example_observation
from mixpolicy.policies.inference import load_for_inference


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--delay", type=int, default=4, help="frozen prefix length (ticks)")
    ap.add_argument("--shift", type=int, default=0, help="steps since the previous chunk's observation (0: n_action_steps)")
    ap.add_argument("--rti-k", type=int, default=2)
    ap.add_argument("--prefix", default="guidance", help="hard | guidance | conditioned")
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    policy, _ = load_for_inference(args.checkpoint, device="cpu", num_threads=args.threads)
    steps = policy.cfg.objective.num_inference_steps
    obs = example_observation(policy)
    prev = policy.plan(obs, torch.Generator().manual_seed(0)).normalized
    shift = args.shift or policy.cfg.n_action_steps
    start = steps - args.rti_k

    def call(mode: str):
        kw = {}
        if mode != "full":
            prefix = args.prefix if "rtc" in mode else "none"
            kw["warm_start"], kw["prefix"] = chunk_conditions(prev, shift, start if "rti" in mode else None, True, prefix, args.delay)
        return policy.plan(obs, torch.Generator().manual_seed(1), **kw)

    modes = ["full", "rti", "rtc", "rti+rtc"]
    times = {m: [] for m in modes}
    for r in range(args.repeats + 5):
        order = modes[r % len(modes) :] + modes[: r % len(modes)]
        for m in order:
            t = time.perf_counter()
            call(m)
            if r >= 5:
                times[m].append(1000 * (time.perf_counter() - t))
    result = {m: {"median_ms": statistics.median(v), "p90_ms": sorted(v)[int(0.9 * len(v))]} for m, v in times.items()}
    result["ratio_rti+rtc_over_rti"] = result["rti+rtc"]["median_ms"] / result["rti"]["median_ms"]
    result["ratio_rtc_over_full"] = result["rtc"]["median_ms"] / result["full"]["median_ms"]
    result["settings"] = {**vars(args), "shift": shift, "schedule_steps": steps}
    for m in modes:
        print(f"{m:8s} median {result[m]['median_ms']:.2f} ms  p90 {result[m]['p90_ms']:.2f} ms")
    print(f"rti+rtc / rti = {result['ratio_rti+rtc_over_rti']:.2f}x; rtc / full = {result['ratio_rtc_over_full']:.2f}x")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
