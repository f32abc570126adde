"""Training speed on this machine: precision x torch.compile, processes x threads, loaders.

    python benchmarks/train_scale.py --data DATA.zarr --work /tmp/train_scale [--steps 60]

1. precision/compile: samples/s of ``mixpolicy train`` at batch 256 for fp32 and bf16
   autocast, eager and ``compile=true`` (compile time reported separately: the first
   log interval, which holds it, is excluded)
2. data parallel on one machine: 1 process x all cores vs torchrun N processes x 1 thread
   (gloo), same global batch
3. loaders: windows/s of the in-process vectorized gather vs DataLoader workers, for state
   windows and for 84x84 RGB windows with 2 observation frames (synthetic, in memory)
4. checkpoint write time (policy + full training state, fsync'd)

Every figure is measured in this one invocation; compare ratios, not absolute numbers.
Writes ``<work>/train_scale.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


VARIANTS = {
    "fp32_eager": ["precision=fp32"],
    "bf16_eager": ["precision=bf16"],
    "fp32_compile": ["precision=fp32", "compile=true"],
    "bf16_compile": ["precision=bf16", "compile=true"],
}


def _policy_overrides(width: int, depth: int) -> list[str]:
    return [f"policy.network.width={width}", f"policy.network.depth={depth}", "policy.network.heads=4"]


def _samples_per_s(run: Path) -> float:
    recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if r["kind"] == "train"][1:]  # the first interval holds warm-up / compilation
    return float(np.mean([r["samples_per_s"] for r in recs]))


def train_speed(args, name: str, overrides: list[str], launcher: list[str] | None = None) -> dict:
    run = args.work / name
    cmd = (launcher or [sys.executable]) + ["-m", "mixpolicy.cli", "train", f"dataset={args.data}", f"out_dir={run}", "overwrite=true",
           f"steps={args.steps}", f"log_every={args.log_every}", "batch_size=256", "progress=false", *overrides]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    return {"samples_per_s": _samples_per_s(run), "first_interval_s": args.log_every / first["steps_per_s"], "wall_s": wall}


def loader_speed(args) -> dict:
    import torch

    from mixpolicy.datasets.sampler import InMemoryWindows, SequenceSampler
    from mixpolicy.train.batches import LoaderConfig, StepBatchSampler, batch_stream

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    ends = np.cumsum(rng.integers(80, 200, size=60))
    n = int(ends[-1])
    kinds = {
        "state": ({"state": rng.normal(size=(n, 39)).astype(np.float32)}, {"state": range(-1, 1)}),
        "image_84": ({"image": rng.integers(0, 255, size=(n, 84, 84, 3), dtype=np.uint8), "state": rng.normal(size=(n, 39)).astype(np.float32)},
                     {"image": range(-1, 1), "state": range(-1, 1)}),
    }
    out = {}
    for kind, (arrays, offsets) in kinds.items():
        arrays["action"] = rng.uniform(-1, 1, size=(n, 4)).astype(np.float32)
        offsets = {**offsets, "action": range(0, 16)}
        windows = InMemoryWindows(arrays, SequenceSampler(ends, offsets))
        sampler = StepBatchSampler(len(windows), 256, seed=0)
        for workers in (0, 1, 2):
            stream = batch_stream(windows, sampler, 0, LoaderConfig(num_workers=workers, prefetch_factor=4), torch.device("cpu"))
            for _ in range(5):
                next(stream)
            t = time.perf_counter()
            count = 0
            while time.perf_counter() - t < args.loader_seconds:
                next(stream)
                count += 1
            out[f"{kind}/workers_{workers}"] = 256 * count / (time.perf_counter() - t)
            del stream
    return out


def checkpoint_speed(args) -> dict:
    run = args.work / "fp32_eager"
    from mixpolicy.config import from_dict
    from mixpolicy.train.config import TrainConfig
    from mixpolicy.train.trainer import Trainer

    cfg = json.loads((run / "train_config.json").read_text())
    cfg.update(resume=True, overwrite=False, progress=False)
    trainer = Trainer(from_dict(TrainConfig, cfg))
    times = []
    for _ in range(5):
        t = time.perf_counter()
        trainer._save()
        times.append(time.perf_counter() - t)
    size = sum(p.stat().st_size for p in (run / "checkpoints" / "last").resolve().iterdir())
    return {"write_s_median": float(np.median(times)), "bytes": size, "params": trainer.n_params}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--log-every", type=int, default=15)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--loader-seconds", type=float, default=5.0)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), help="precision/compile variants (fp32_eager is the reference)")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    cores = len(os.sched_getaffinity(0))
    net = _policy_overrides(args.width, args.depth)
    res: dict = {"cores": cores, "model": {"width": args.width, "depth": args.depth}}
    for name in dict.fromkeys(["fp32_eager", *args.variants]):
        res[name] = train_speed(args, name, net + VARIANTS[name])
        print(name, {k: round(v, 1) for k, v in res[name].items()}, flush=True)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={cores}"]
    res["ddp_procs_x1_thread"] = train_speed(args, "ddp", net + ["precision=fp32", "num_threads=1"], launcher=torchrun)
    res["ddp_procs_x1_thread"]["processes"] = cores
    print("ddp", res["ddp_procs_x1_thread"], flush=True)
    res["checkpoint"] = checkpoint_speed(args)
    print("checkpoint", res["checkpoint"], flush=True)
    res["loader_windows_per_s"] = loader_speed(args)
    print("loader windows/s", {k: round(v) for k, v in res["loader_windows_per_s"].items()}, flush=True)
    base = res["fp32_eager"]["samples_per_s"]
    print("\nsamples/s relative to fp32 eager:", {k: round(res[k]["samples_per_s"] / base, 2) for k in [*args.variants, "ddp_procs_x1_thread"] if k != "fp32_eager"})
    (args.work / "train_scale.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
