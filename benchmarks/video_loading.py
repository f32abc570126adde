"""Loading a real-robot-shaped video dataset: two cameras at 480x640, 30 fps, LeRobot v3.0 mp4.

One run (``all``) makes two datasets 10x apart in frames, then for each:

1. ``mixpolicy data convert src=<lerobot> out=<zarr> resize=[96,128]`` in a fresh process:
   wall time and peak RSS (frames are decoded as a stream and resized one at a time);
2. ``mixpolicy train`` on the converted store with both cameras and the state (disk-backed
   windows, ``data.storage=disk``, and the default ``auto``), a few steps: peak RSS;

and on the larger one, windows/s side by side (one process, batch 64, random windows of the
state and both cameras at t-1 and t plus 16 actions, frames at 96x128):
mixpolicy's ``ZarrWindows`` on the converted store against ``LeRobotDataset`` reading the
same mp4 files (PyAV decoding, the same ``delta_timestamps``, each frame resized to 96x128
by an image transform, as a LeRobot user would have to).

``--writer mixpolicy`` writes the datasets with ``mixpolicy data convert out_format=lerobot
use_videos=true`` from synthetic frames (h264, every frame a keyframe); ``--writer lerobot``
with the real ``LeRobotDataset.create`` / ``add_frame`` / ``save_episode`` in video mode
(its default codec, AV1 with 2-frame GOPs; needs lerobot >= 0.4, here lerobot 0.6.1 on
Python 3.12: ``bash scripts/install_lerobot.sh --py312``). The LeRobot side of the
windows/s comparison needs lerobot too; without it that part is skipped with a note.

    /work/venvs/py312/bin/python benchmarks/video_loading.py all --work /tmp/vload --episodes 4 40 --frames 150 --skip-windows --out sizes.json
    ../shared/tools/quiet-run -- /work/venvs/py312/bin/python benchmarks/video_loading.py windows --dataset /tmp/vload/mixpolicy_40ep --out windows.json
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

from mixpolicy.utils import cpu_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")

FPS = 30
HEIGHT, WIDTH = 480, 640
RESIZE = (96, 128)
CAMERAS = ("front", "wrist")
STATE_DIM = ACTION_DIM = 6
BATCH = 64
N_OBS = 2
HORIZON = 16
MIXPOLICY = [str(Path(sys.executable).with_name("mixpolicy"))]  # the console script beside this interpreter


# ---------------------------------------------------------------------- synthetic frames
class Scene:
    """Smooth 480x640 frames of one camera: a drifting colour gradient and a moving disk,
    so codecs see motion and texture like a table-top camera (not noise, not flat)."""

    def __init__(self, seed: int):
        rng = np.random.default_rng(seed)
        yy, xx = np.mgrid[:HEIGHT, :WIDTH].astype(np.float32)
        self.base = np.stack([110 + 60 * np.sin(xx / (70 + 20 * c) + rng.uniform(0, 6)) * np.cos(yy / (90 - 15 * c)) for c in range(3)], -1)
        self.yy, self.xx = yy, xx
        self.phase = rng.uniform(0, 2 * np.pi, 2)
        self.colour = rng.uniform(30, 225, 3).astype(np.float32)

    def frame(self, t: int) -> np.ndarray:
        cy = HEIGHT / 2 + 150 * np.sin(0.05 * t + self.phase[0])
        cx = WIDTH / 2 + 220 * np.cos(0.04 * t + self.phase[1])
        disk = ((self.yy - cy) ** 2 + (self.xx - cx) ** 2 < 45**2)[..., None]
        shifted = np.roll(self.base, (t // 2) % WIDTH, axis=1)
        return np.where(disk, self.colour, shifted).astype(np.uint8)


def episode_frames(e: int, frames: int):
    """(state, action, {camera: frames}) of synthetic episode ``e``, one step at a time."""
    scenes = {c: Scene(1000 * e + i) for i, c in enumerate(CAMERAS)}
    for t in range(frames):
        state = np.sin(0.1 * t + np.arange(STATE_DIM) + e).astype(np.float32)
        action = np.cos(0.1 * t + np.arange(ACTION_DIM) - e).astype(np.float32)
        yield state, action, {c: s.frame(t) for c, s in scenes.items()}


def make_with_mixpolicy(root: Path, episodes: int, frames: int) -> None:
    """A LeRobot v3.0 video dataset written by ``mixpolicy data convert out_format=lerobot``."""
    from mixpolicy.datasets.replay_buffer import DatasetMeta, KeySpec, ReplayBuffer

    store = root.with_name(root.name + ".src.zarr")
    specs = {"state": KeySpec((STATE_DIM,), "float32"), **{f"image_{c}": KeySpec((HEIGHT, WIDTH, 3), "uint8") for c in CAMERAS}}
    specs["action"] = KeySpec((ACTION_DIM,), "float32")
    meta = DatasetMeta(fps=FPS, obs_keys=[k for k in specs if k != "action"], specs=specs, source="synthetic arm", robot_type="synthetic_arm")
    buf = ReplayBuffer.create(store, meta, overwrite=True)
    for e in range(episodes):
        steps = list(episode_frames(e, frames))
        data = {"state": np.stack([s for s, _, _ in steps]), "action": np.stack([a for _, a, _ in steps])}
        data.update({f"image_{c}": np.stack([f[c] for _, _, f in steps]) for c in CAMERAS})
        buf.add_episode(data, task=f"task {e % 3}")
        del steps, data
    buf.close()
    cmd = [*MIXPOLICY, "data", "convert", f"src={store}", f"out={root}", "out_format=lerobot", "use_videos=true", "overwrite=true", "progress=false"]
    subprocess.run(cmd, check=True)
    shutil.rmtree(store)


def make_with_lerobot(root: Path, episodes: int, frames: int) -> None:
    """The same episodes written by the real ``LeRobotDataset`` in video mode."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    features = {
        "observation.state": {"dtype": "float32", "shape": (STATE_DIM,), "names": None},
        "action": {"dtype": "float32", "shape": (ACTION_DIM,), "names": None},
        **{f"observation.images.{c}": {"dtype": "video", "shape": (HEIGHT, WIDTH, 3), "names": ["height", "width", "channels"]} for c in CAMERAS},
    }
    if root.exists():
        shutil.rmtree(root)
    ds = LeRobotDataset.create("local/arm", fps=FPS, features=features, root=root, use_videos=True, robot_type="synthetic_arm")
    for e in range(episodes):
        for state, action, cams in episode_frames(e, frames):
            ds.add_frame({"observation.state": state, "action": action, **{f"observation.images.{c}": f for c, f in cams.items()}, "task": f"task {e % 3}"})
        ds.save_episode()
    ds.finalize()


# ---------------------------------------------------------------------- processes and memory
def high_water_mb(pid: int) -> float | None:
    """VmHWM of a live process (its peak RSS since its exec), or None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def run_measured(cmd: list[str]) -> dict:
    """Run ``cmd``; its wall time and peak RSS. The peak is the child's VmHWM, read every 20 ms
    while it runs: wait4's ru_maxrss would also count the RSS of this process at the fork."""
    t = time.perf_counter()
    with open(os.devnull, "w") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.PIPE, text=True)
        peak = 0.0
        while proc.poll() is None:
            peak = max(peak, high_water_mb(proc.pid) or 0.0)
            time.sleep(0.02)
        err = proc.stderr.read()
    out = {"seconds": round(time.perf_counter() - t, 2), "peak_rss_mb": round(peak, 1), "rc": proc.returncode}
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{err[-2000:]}")
    return out


def folder_mb(path: Path) -> float:
    return round(sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20, 1)


def convert(src: Path, out: Path) -> dict:
    cmd = [*MIXPOLICY, "data", "convert", f"src={src}", f"out={out}", f"resize=[{RESIZE[0]},{RESIZE[1]}]", "overwrite=true", "progress=false"]
    return {**run_measured(cmd), "zarr_mb": folder_mb(out)}


def train(store: Path, out: Path, storage: str, steps: int) -> dict:
    cmd = [
        *MIXPOLICY, "train", f"dataset={store}", f"out_dir={out}", "policy=dit_edm",
        f"policy.obs_keys=[state,{','.join(f'image_{c}' for c in CAMERAS)}]", "policy.image_encoder.trunk=light",
        f"steps={steps}", "batch_size=32", f"data.storage={storage}", "num_threads=2", "progress=false", "checkpoint_every=0", "overwrite=true",
    ]  # fmt: skip
    return run_measured(cmd)


# ---------------------------------------------------------------------- windows/s
def time_windows(fetch, batches: int) -> float:
    fetch()  # warm-up: opens files, builds decoders
    t = time.perf_counter()
    for _ in range(batches):
        fetch()
    return batches * BATCH / (time.perf_counter() - t)


def windows_mixpolicy(store: Path, batches: int) -> float:
    from mixpolicy.datasets.replay_buffer import ReplayBuffer
    from mixpolicy.datasets.sampler import SequenceSampler, ZarrWindows

    buffer = ReplayBuffer.open(store)
    obs = range(-(N_OBS - 1), 1)
    sampler = SequenceSampler(buffer.episode_ends, {"state": obs, **{f"image_{c}": obs for c in CAMERAS}, "action": range(HORIZON)})
    windows = ZarrWindows(store, sampler)
    rng = np.random.default_rng(0)
    return time_windows(lambda: windows.batch(rng.integers(0, len(sampler), BATCH)), batches)


def windows_lerobot(root: Path, batches: int) -> float:
    import torch
    from lerobot.datasets.lerobot_dataset import LeRobotDataset
    from torchvision.transforms import v2

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_data import endless

    obs = [i / FPS for i in range(-(N_OBS - 1), 1)]
    delta = {"observation.state": obs, **{f"observation.images.{c}": obs for c in CAMERAS}, "action": [i / FPS for i in range(HORIZON)]}
    resize = v2.Resize(RESIZE, antialias=True)  # 480x640 -> 96x128: the same aspect, nothing to crop
    ds = LeRobotDataset("local/arm", root=root, delta_timestamps=delta, video_backend="pyav", image_transforms=resize)
    loader = torch.utils.data.DataLoader(ds, batch_size=BATCH, shuffle=True, num_workers=0, generator=torch.Generator().manual_seed(0))
    it = endless(loader)
    return time_windows(lambda: next(it), batches)


def lerobot_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("lerobot") is not None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("all", help="make both datasets, convert, train, windows/s")
    a.add_argument("--work", required=True)
    a.add_argument("--episodes", type=int, nargs=2, default=[4, 40], help="episodes of the small and the large dataset")
    a.add_argument("--frames", type=int, default=150, help="frames per episode (5 s at 30 fps)")
    a.add_argument("--writer", choices=["mixpolicy", "lerobot"], default="mixpolicy")
    a.add_argument("--train-steps", type=int, default=20)
    a.add_argument("--batches", type=int, nargs=2, default=[50, 4], help="timed batches: mixpolicy, LeRobotDataset")
    a.add_argument("--out", default="", help="results JSON")
    a.add_argument("--skip-windows", action="store_true", help="no windows/s part (run it alone under a quiet machine: windows)")
    a.add_argument("--reuse", action="store_true", help="keep datasets an earlier run made under --work")
    w = sub.add_parser("windows", help="windows/s only, on a dataset made by all")
    w.add_argument("--dataset", required=True, help="the LeRobot folder (its converted store sits beside it as <name>.zarr)")
    w.add_argument("--batches", type=int, nargs=2, default=[50, 4])
    w.add_argument("--out", default="")
    args = ap.parse_args()
    if args.cmd == "windows":
        speed = windows(Path(args.dataset), args.batches, lerobot_available())
        if args.out:
            Path(args.out).write_text(json.dumps(speed, indent=2))
        return 0
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    has_lerobot = lerobot_available()
    if args.writer == "lerobot" and not has_lerobot:
        raise SystemExit("--writer lerobot needs lerobot (bash scripts/install_lerobot.sh)")
    result: dict = {"cpu": cpu_model(), "writer": args.writer, "frames_per_episode": args.frames, "cameras": list(CAMERAS),
                    "source_size": [HEIGHT, WIDTH], "resize": list(RESIZE), "fps": FPS, "sizes": {}}  # fmt: skip
    for episodes in args.episodes:
        name = f"{args.writer}_{episodes}ep"
        root = work / name
        t = time.perf_counter()
        reused = args.reuse and (root / "meta" / "info.json").is_file()
        if not reused:
            (make_with_lerobot if args.writer == "lerobot" else make_with_mixpolicy)(root, episodes, args.frames)
        row = {"episodes": episodes, "frames": episodes * args.frames, "make_s": None if reused else round(time.perf_counter() - t, 1), "lerobot_mb": folder_mb(root)}
        row["convert"] = convert(root, work / f"{name}.zarr")
        row["train_disk"] = train(work / f"{name}.zarr", work / f"{name}_run_disk", "disk", args.train_steps)
        row["train_auto"] = train(work / f"{name}.zarr", work / f"{name}_run_auto", "auto", args.train_steps)
        result["sizes"][name] = row
        print(json.dumps({name: row}), flush=True)
    if not args.skip_windows:
        result["windows_per_s"] = windows(work / f"{args.writer}_{args.episodes[1]}ep", args.batches, has_lerobot)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


def windows(root: Path, batches: list[int], has_lerobot: bool) -> dict:
    """windows/s of mixpolicy on ``root``'s converted store and of LeRobotDataset on ``root``."""
    speed = {"cpu": cpu_model(), "dataset": str(root), "batch": BATCH, "mixpolicy_zarr_windows_per_s": round(windows_mixpolicy(root.with_name(root.name + ".zarr"), batches[0]), 1)}
    if has_lerobot:
        speed["lerobot_pyav_windows_per_s"] = round(windows_lerobot(root, batches[1]), 2)
        speed["ratio"] = round(speed["mixpolicy_zarr_windows_per_s"] / speed["lerobot_pyav_windows_per_s"], 1)
    else:
        speed["note"] = "lerobot not installed: the LeRobotDataset side was skipped"
    print(json.dumps({"windows_per_s": speed}), flush=True)
    return speed


if __name__ == "__main__":
    raise SystemExit(main())
