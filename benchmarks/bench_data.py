"""Data-layer throughput and memory, side by side with LeRobotDataset on the same episodes.

Run under the shared lock (it saturates the CPU):

    flock /tmp/mixpolicy-bench.lock .venv/bin/python benchmarks/bench_data.py \
        --image-store /tmp/issue3/img_demo.zarr --out /tmp/issue3/bench_data.json

What it measures, in one run:

1. windows/s for state-only windows (state at t-1, t; actions t .. t+15) and for image
   windows (84x84 camera at t-1, t, plus the state and actions): mixpolicy's
   ``InMemoryWindows`` (the cache for data that fits), ``ZarrWindows`` (read from disk per
   batch, chunk cache off so every batch decodes what it touches) single-process and in a
   ``DataLoader`` with workers; and ``LeRobotDataset`` (PNG frames, the same episodes
   exported by ``export_lerobot``, the same ``delta_timestamps``) single-process and with
   the same number of workers. Batch size 256 everywhere.
2. compression ratio and random-read speed of Blosc settings on the image key;
3. memory of opening and sampling a store far larger than RAM: a sparse synthetic store
   whose logical size is ``--big-frames`` x 84 x 84 x 3 bytes (only a few chunks exist on
   disk; zarr reads missing chunks as the fill value), in a fresh process: RSS after import,
   after opening, after building the window index, and after reading random batches.

Without ``--image-store`` a synthetic image store is generated (smooth moving patterns);
``mixpolicy collect cameras=[corner]`` makes a rendered one. LeRobot parts are skipped
with a note where lerobot is not installed (bash scripts/install_lerobot.sh).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mixpolicy.datasets.replay_buffer import DatasetMeta, KeySpec, ReplayBuffer  # noqa: E402
from mixpolicy.datasets.sampler import InMemoryWindows, SequenceSampler, ZarrWindows, window_loader  # noqa: E402

BATCH = 256
N_OBS = 2
HORIZON = 16


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def synthetic_image_store(path: Path, episodes: int, length: int, seed: int = 0) -> ReplayBuffer:
    meta = DatasetMeta(
        fps=10,
        obs_keys=["state", "image_corner"],
        specs={"state": KeySpec((39,), "float32"), "image_corner": KeySpec((84, 84, 3), "uint8"), "action": KeySpec((4,), "float32")},
        source="synthetic",
    )
    buf = ReplayBuffer.create(path, meta, overwrite=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:84, :84] / 84.0
    for e in range(episodes):
        phase = rng.uniform(0, 6, size=3)
        t = np.arange(length)[:, None, None, None] / length
        img = 127 + 100 * np.sin(6 * xx[None, ..., None] + phase + 3 * t) * np.cos(5 * yy[None, ..., None] + phase[::-1] - 2 * t)
        img = img + rng.normal(0, 4, size=img.shape)
        buf.add_episode(
            {
                "state": rng.normal(size=(length, 39)).astype(np.float32),
                "image_corner": np.clip(img, 0, 255).astype(np.uint8),
                "action": rng.uniform(-1, 1, size=(length, 4)).astype(np.float32),
            },
            task="synthetic-v3",
        )
    return buf


def offsets(image_key: str | None) -> dict[str, range]:
    o = {"state": range(-(N_OBS - 1), 1), "action": range(0, HORIZON)}
    if image_key:
        o[image_key] = range(-(N_OBS - 1), 1)
    return o


def time_batches(fetch, n_windows: int, min_seconds: float, warmup: int = 1) -> float:
    """Windows/s of ``fetch(batch_index)`` returning a batch, after ``warmup`` batches."""
    for i in range(warmup):
        fetch(i)
    done, t0, i = 0, time.perf_counter(), warmup
    while done < n_windows or time.perf_counter() - t0 < min_seconds:
        fetch(i)
        done += BATCH
        i += 1
        if time.perf_counter() - t0 > 8 * max(min_seconds, 1):
            break
    return done / (time.perf_counter() - t0)


def endless(loader):
    """Batches from ``loader`` across epochs, as a training loop draws them."""
    while True:
        yield from loader


def bench_mixpolicy(buffer: ReplayBuffer, image_key: str | None, workers: int, seconds: float) -> dict[str, float]:
    rng = np.random.default_rng(0)
    sampler = SequenceSampler(buffer.episode_ends, offsets(image_key))
    ids = rng.integers(0, len(sampler), size=(100000 // BATCH + 50, BATCH))
    out = {}
    t = time.perf_counter()
    mem = InMemoryWindows(buffer.load(sampler.key_offsets), sampler)
    out["in_memory_load_s"] = time.perf_counter() - t
    out["in_memory"] = time_batches(lambda i: mem.batch(ids[i % len(ids)]), 20 * BATCH, seconds)
    disk = ZarrWindows(buffer.path, sampler, chunk_cache_bytes=0)
    out["zarr_1proc"] = time_batches(lambda i: disk.batch(ids[i % len(ids)]), 10 * BATCH, seconds)
    if workers:
        loader = window_loader(disk, BATCH, num_workers=workers, seed=0)
        it = endless(loader)
        out[f"zarr_{workers}workers"] = time_batches(lambda i: next(it), 10 * BATCH, seconds, warmup=2 * workers)
        del it, loader
    return out


def bench_lerobot(root: Path, image_key: str | None, fps: float, workers: int, seconds: float) -> dict[str, float]:
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    delta = {"observation.state": [i / fps for i in range(-(N_OBS - 1), 1)], "action": [i / fps for i in range(HORIZON)]}
    if image_key:
        delta[f"observation.images.{image_key.removeprefix('image_')}"] = [i / fps for i in range(-(N_OBS - 1), 1)]
    ds = LeRobotDataset("local/bench", root=root, delta_timestamps=delta)
    out = {}
    for n in [0] + ([workers] if workers else []):
        loader = torch.utils.data.DataLoader(
            ds, batch_size=BATCH, shuffle=True, num_workers=n, generator=torch.Generator().manual_seed(0),
            persistent_workers=n > 0, prefetch_factor=4 if n else None,
        )
        it = endless(loader)
        out["1proc" if n == 0 else f"{n}workers"] = time_batches(lambda i, it=it: next(it), 2 * BATCH, seconds, warmup=1 + 2 * n)
        del it, loader
    return out


# ---------------------------------------------------------------------- codecs
def bench_codecs(buffer: ReplayBuffer, key: str, work: Path, frames: int = 3000) -> dict[str, dict[str, float]]:
    """Compression ratio and random-frame read speed of Blosc settings on the image key."""
    import zarr
    from zarr.codecs import BloscCodec

    from mixpolicy.datasets.chunks import RowReader

    data = np.asarray(buffer.array(key)[: min(frames, buffer.n_steps)])
    chunk = int(buffer.array(key).chunks[0])
    rng = np.random.default_rng(0)
    batches = [np.unique(rng.integers(0, len(data), size=2 * BATCH)) for _ in range(20)]
    out = {}
    for cname, shuffle in [("zstd", "bitshuffle"), ("zstd", "shuffle"), ("zstd", "noshuffle"), ("lz4", "bitshuffle"), ("lz4", "noshuffle")]:
        path = work / f"codec_{cname}_{shuffle}.zarr"
        shutil.rmtree(path, ignore_errors=True)
        arr = zarr.create_array(
            str(path), shape=data.shape, chunks=(chunk, *data.shape[1:]), dtype=data.dtype,
            compressors=BloscCodec(cname=cname, clevel=3, shuffle=shuffle, typesize=1),
        )
        t = time.perf_counter()
        arr[:] = data
        write_s = time.perf_counter() - t
        stored = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        reader = RowReader(zarr.open_array(str(path), mode="r"), cache_bytes=0)
        t = time.perf_counter()
        for rows in batches:
            reader.read(rows)
        read_s = time.perf_counter() - t
        out[f"{cname}+{shuffle}"] = {
            "ratio": data.nbytes / stored,
            "write_MBps": data.nbytes / 1e6 / write_s,
            "random_frames_per_s": sum(len(r) for r in batches) / read_s,
        }
        shutil.rmtree(path, ignore_errors=True)
    return out


# ---------------------------------------------------------------------- memory
def make_sparse_big_store(path: Path, frames: int, episode_len: int = 100) -> None:
    """A store of ``frames`` 84x84x3 frames where only the first episodes' chunks exist."""
    import zarr

    meta = DatasetMeta(
        fps=10,
        obs_keys=["state", "image_corner"],
        specs={"state": KeySpec((39,), "float32"), "image_corner": KeySpec((84, 84, 3), "uint8"), "action": KeySpec((4,), "float32")},
        source="sparse synthetic",
    )
    buf = ReplayBuffer.create(path, meta, overwrite=True)
    rng = np.random.default_rng(0)
    for _ in range(3):  # a few real episodes so some chunks hold data
        buf.add_episode(
            {
                "state": rng.normal(size=(episode_len, 39)).astype(np.float32),
                "image_corner": rng.integers(0, 255, size=(episode_len, 84, 84, 3), dtype=np.uint8),
                "action": rng.normal(size=(episode_len, 4)).astype(np.float32),
            }
        )
    root = zarr.open_group(str(path), mode="r+")
    for key in ("state", "image_corner", "action"):
        arr = root["data"][key]
        arr.resize((frames, *arr.shape[1:]))
    n_ep = frames // episode_len
    ends = root["meta/episode_ends"]
    ends.resize((n_ep,))
    ends[:] = np.arange(1, n_ep + 1, dtype=np.int64) * episode_len
    for name in ("episode_task", "episode_success", "episode_seed", "episode_source"):
        a = root["meta"][name]
        a.resize((n_ep,))


def peak_mb() -> float:
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec from the forking parent
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def memory_child(path: str, batches: int) -> None:
    report = {"rss_after_import_mb": rss_mb(), "peak_after_import_mb": peak_mb()}
    buf = ReplayBuffer.open(path)
    report["rss_after_open_mb"] = rss_mb()
    report["peak_after_open_mb"] = peak_mb()
    sampler = SequenceSampler(buf.episode_ends, offsets("image_corner"))
    report["rss_after_index_mb"] = rss_mb()
    report["peak_after_index_mb"] = peak_mb()
    w = ZarrWindows(path, sampler)  # default 64 MiB chunk cache per key
    report["peak_after_dataset_mb"] = peak_mb()
    rng = np.random.default_rng(0)
    samples = []
    for i in range(batches):
        w.batch(rng.integers(0, len(sampler), size=BATCH))
        if i in (0, batches // 2, batches - 1):
            samples.append(round(rss_mb(), 1))
    report["rss_during_batches_mb"] = samples
    report["peak_rss_mb"] = peak_mb()
    report["steps"] = buf.n_steps
    report["windows"] = len(sampler)
    report["logical_gb"] = sum(np.prod(buf.array(k).shape) * buf.array(k).dtype.itemsize for k in buf.keys) / 1e9
    print(json.dumps(report))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image-store", default="", help="a store with an image key (default: synthetic)")
    ap.add_argument("--image-key", default="image_corner")
    ap.add_argument("--synthetic-episodes", type=int, default=60)
    ap.add_argument("--synthetic-length", type=int, default=100)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=4.0, help="minimum measuring time per figure")
    ap.add_argument("--big-frames", type=int, default=10_000_000)
    ap.add_argument("--work", default="/tmp/mixpolicy-bench-data")
    ap.add_argument("--out", default="")
    ap.add_argument("--memory-child", default="", help=argparse.SUPPRESS)
    ap.add_argument("--batches", type=int, default=100, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        memory_child(args.memory_child, args.batches)
        return
    torch.set_num_threads(1)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {
        "batch_size": BATCH, "n_obs_steps": N_OBS, "horizon": HORIZON, "workers": args.workers,
        "cpus": os.cpu_count(), "loadavg_at_start": os.getloadavg(),
    }

    if args.image_store:
        buffer = ReplayBuffer.open(args.image_store)
        results["image_data"] = f"rendered: {args.image_store}"
    else:
        buffer = synthetic_image_store(work / "synthetic.zarr", args.synthetic_episodes, args.synthetic_length)
        results["image_data"] = f"synthetic: {args.synthetic_episodes} episodes x {args.synthetic_length} steps"
    image_key = args.image_key
    results["episodes"], results["steps"] = buffer.n_episodes, buffer.n_steps
    results["image_chunk_frames"] = int(buffer.array(image_key).chunks[0])
    print(f"data: {results['image_data']} ({buffer.n_episodes} episodes, {buffer.n_steps} steps)", flush=True)

    have_lerobot = True
    try:
        import lerobot.datasets.lerobot_dataset  # noqa: F401
    except Exception as exc:  # optional comparison
        have_lerobot = False
        results["lerobot"] = f"not installed ({type(exc).__name__}); bash scripts/install_lerobot.sh"
    if have_lerobot:
        from mixpolicy.datasets.lerobot_format import export_lerobot

        lr_root = work / "lerobot_export"
        shutil.rmtree(lr_root, ignore_errors=True)
        t = time.perf_counter()
        export_lerobot(buffer, lr_root, progress=False)
        results["lerobot_export_s"] = time.perf_counter() - t

    for name, key in (("state", None), ("image", image_key)):
        print(f"== {name} windows", flush=True)
        mine = bench_mixpolicy(buffer, key, args.workers, args.seconds)
        results[f"{name}_mixpolicy"] = mine
        print(json.dumps(mine), flush=True)
        if have_lerobot:
            theirs = bench_lerobot(work / "lerobot_export", key, float(buffer.meta.fps), args.workers, args.seconds)
            results[f"{name}_lerobot"] = theirs
            print(json.dumps(theirs), flush=True)
            results[f"{name}_ratio"] = {
                "zarr_1proc_vs_lerobot_1proc": mine["zarr_1proc"] / theirs["1proc"],
                "in_memory_vs_lerobot_1proc": mine["in_memory"] / theirs["1proc"],
            }
            if args.workers:
                w = f"{args.workers}workers"
                results[f"{name}_ratio"][f"zarr_{w}_vs_lerobot_{w}"] = mine[f"zarr_{w}"] / theirs[w]
            print(json.dumps(results[f"{name}_ratio"]), flush=True)

    print("== image codecs", flush=True)
    results["codecs"] = bench_codecs(buffer, image_key, work)
    print(json.dumps(results["codecs"]), flush=True)

    print("== memory: sparse store far larger than RAM", flush=True)
    big = work / "big_sparse.zarr"
    make_sparse_big_store(big, args.big_frames)
    proc = subprocess.run(
        [sys.executable, __file__, "--memory-child", str(big), "--batches", str(args.batches)], capture_output=True, text=True, check=True
    )
    results["memory"] = json.loads(proc.stdout.strip().splitlines()[-1])
    results["memory"]["ram_gb"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    print(json.dumps(results["memory"]), flush=True)
    shutil.rmtree(big, ignore_errors=True)

    results["loadavg_at_end"] = os.getloadavg()
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
