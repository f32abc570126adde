"""Every GPU check of mixpolicy in one run within a time budget, all figures in one JSON file.

    bash benchmarks/gpu/run.sh                      # on the GPU machine (installs the wheels first)
    bash benchmarks/gpu/run.sh --device cpu --quick --no-install --out /tmp/gpu.json   # here, seconds

Phases, in order, each with its own budget (BUDGET_S; a phase starts only while at least
half of its budget is left of the whole run's, and gets at most what is left):

* ``tests``: the tests that go through device code (benchmarks/gpu/test_on_device.py with
  MIXPOLICY_TEST_DEVICE, plus the training and deploy tests whose trainer picks cuda by
  ``device=auto``), run by pytest;
* ``train``: training steps/s through ``Trainer.train_step`` at small (width 128, depth 4)
  and base (512, 12, 8 heads) size, batch 256: fp32 (TF32 matmuls, as the trainer sets on
  cuda), bf16 autocast, and ``compile=true`` with each;
* ``latency``: milliseconds per action chunk at batch 1 and 32: a full 10-step EDM denoise,
  RTI warm calls of k=1 and k=2, MoDE with and without its expert cache; fp32 and bf16;
* ``deploy``: the 50 Hz control loop for 3,000 cycles against a synthetic robot (no
  simulator), the policy served on the device by the default process backend;
* ``ddp``: a few hundred training steps through torchrun at world size 1 with NCCL (gloo on
  the CPU), the trainer's DistributedDataParallel path;
* peak memory of each phase (cuda: the process's max allocated and reserved bytes, and the
  device's used memory sampled while the phase ran; cpu: the process's max RSS).

``--quick`` runs every phase with tiny sizes and few steps/cycles (``--device cpu --quick``
takes seconds; tests/test_gpu_script.py runs it). The script prints its figures and never
judges them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import numpy as np

# ---------------------------------------------------------------------------- mixpolicy
# Every mixpolicy name this script uses, in one place (update the paths here when modules
# move). An import that fails is reported in the JSON.
IMPORT_ERROR: str | None = None
try:
    import torch
    import torch.distributed as dist

    import mixpolicy.train.trainer as trainer_module  # the trainer builds its ProcessGroup through this module's name
    from mixpolicy.config import from_dict
    from mixpolicy.datasets.normalizer import Normalizer
    from mixpolicy.datasets.sampler import InMemoryWindows, SequenceSampler
    from mixpolicy.deploy.clock import RealtimeSettings, now
    from mixpolicy.deploy.loop import CYCLE_COLUMNS, ControlLoop, LoopConfig
    from mixpolicy.deploy.rti import RTIConfig, RTISampler
    from mixpolicy.deploy.runner import InferenceConfig, make_client
    from mixpolicy.deploy.safety import SafetyConfig
    from mixpolicy.policies.checkpoint import save_policy
    from mixpolicy.policies.config import policy_config_from_dict
    from mixpolicy.policies.denoising_policy import TASK_KEY, DenoisingPolicy, ShapeMeta, example_observation
    from mixpolicy.train.config import TrainConfig
    from mixpolicy.train.distributed import ProcessGroup
    from mixpolicy.train.setup import TrainingData
    from mixpolicy.train.trainer import Trainer
except ImportError as exc:  # the JSON still gets written, saying what is missing
    IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
FORMAT = 1
PHASES = ("tests", "train", "latency", "deploy", "ddp")
# Seconds per phase, start-up of its processes included. Phases usually end before their
# budget; whatever runs long, the run stops within TOTAL_BUDGET_S (8 minutes, the wheel
# install included): a phase starts only while half its budget is left and gets at most that.
BUDGET_S = {"tests": 110, "train": 150, "latency": 45, "deploy": 85, "ddp": 45}
TOTAL_BUDGET_S = 480.0
# Quick mode: caps for a slow, shared CPU (the work itself takes seconds).
QUICK_BUDGET_S = {"tests": 150, "train": 90, "latency": 60, "deploy": 60, "ddp": 90}
QUICK_TOTAL_BUDGET_S = 450.0
KILL_GRACE_S = 10.0  # this long past its budget a phase's processes are stopped
RESERVE_S = KILL_GRACE_S + 5.0  # kept back at the end: a late phase's grace, writing the results

# Network sizes (the policy's other settings are its defaults: 2 observation steps, chunks of 16).
SIZES = {
    "tiny": dict(width=32, depth=2, heads=2),
    "small": dict(width=128, depth=4, heads=4),
    "base": dict(width=512, depth=12, heads=8),
}
STATE_DIM, ACTION_DIM, N_TASKS = 39, 4, 10  # Meta-World-like state observations
TRAIN_VARIANTS = {  # name: (precision, compile); compiled ones last, so a short budget drops them first
    "fp32_eager": ("fp32", False),
    "bf16_eager": ("bf16", False),
    "bf16_compile": ("bf16", True),
    "fp32_compile": ("fp32", True),
}
# Existing tests that cannot run there: two processes need two GPUs; the SIGKILL test's child
# replaces PYTHONPATH (tests/test_train_scale.py::_env), so it cannot see the wheel folder;
# the periodic evaluation needs Meta-World.
DESELECT = [
    "tests/test_train_scale.py::test_two_gloo_processes_match_one_process_with_the_same_global_batch",
    "tests/test_train_scale.py::test_ranks_that_disagree_on_the_config_fail_with_one_clear_line",
    "tests/test_train_scale.py::test_sigkill_mid_run_then_resume_ends_with_the_uninterrupted_parameters",
    "tests/test_train_scale.py::test_periodic_closed_loop_evaluation_on_metaworld",
]
DEVICE_TESTS = ["benchmarks/gpu/test_on_device.py"]
# Quick mode on the CPU: the deploy phase starts the same server process, and
# tests/test_deploy_server.py covers it on the CPU.
QUICK_DESELECT = ["benchmarks/gpu/test_on_device.py::test_the_policy_server_process_serves_on_the_device"]
FULL_TESTS = DEVICE_TESTS + ["tests/test_trainer.py", "tests/test_train_scale.py", "tests/test_deploy_rti.py", "tests/test_deploy_server.py"]


@dataclasses.dataclass(frozen=True)
class Settings:
    """How much work each phase does (full run or quick mode)."""

    quick: bool
    train_sizes: tuple[str, ...]
    train_batch: int
    train_episodes: int
    train_warmup_steps: int  # untimed steps after the first (which holds compilation)
    train_measure_s: float
    train_min_steps: int
    latency_sizes: tuple[str, ...]
    latency_batches: tuple[int, ...]
    latency_repeats: int
    deploy_size: str
    deploy_cycles: int
    deploy_hz: float
    deploy_backend: str
    deploy_rti_k: int
    ddp_size: str
    ddp_steps: int

    def precisions(self, device: "torch.device") -> tuple[str, ...]:
        return ("fp32", "bf16") if device.type == "cuda" else ("fp32",)


FULL = Settings(
    quick=False, train_sizes=("small", "base"), train_batch=256, train_episodes=40, train_warmup_steps=5, train_measure_s=3.0,
    train_min_steps=10, latency_sizes=("small", "base"), latency_batches=(1, 32), latency_repeats=30, deploy_size="small",
    deploy_cycles=3000, deploy_hz=50.0, deploy_backend="process", deploy_rti_k=2, ddp_size="small", ddp_steps=300,
)  # fmt: skip
QUICK = Settings(
    quick=True, train_sizes=("tiny",), train_batch=16, train_episodes=6, train_warmup_steps=1, train_measure_s=0.0,
    train_min_steps=2, latency_sizes=("tiny",), latency_batches=(1, 32), latency_repeats=3, deploy_size="tiny",
    deploy_cycles=50, deploy_hz=50.0, deploy_backend="process", deploy_rti_k=2, ddp_size="tiny", ddp_steps=6,
)  # fmt: skip


# ---------------------------------------------------------------------------- shared pieces
def policy_dict(size: str, network: str = "transformer", **network_kw) -> dict[str, Any]:
    """A policy config dict: EDM with 10 sampling steps (the latency figures' schedule)."""
    return {"network": {"type": network, **SIZES[size], **network_kw}, "objective": {"type": "edm", "num_inference_steps": 10}}


def shape_meta() -> "ShapeMeta":
    return ShapeMeta(obs={"state": [STATE_DIM]}, action_dim=ACTION_DIM, tasks=[f"task-{i}" for i in range(N_TASKS)], fps=50.0)


def synthetic_training_data(episodes: int, length: int = 100, seed: int = 0, n_obs_steps: int = 2, horizon: int = 16) -> "TrainingData":
    """In-memory windows over random state/action episodes (speed does not depend on the values)."""
    rng = np.random.default_rng(seed)
    n = episodes * length
    arrays = {
        "state": rng.normal(size=(n, STATE_DIM)).astype(np.float32),
        "action": rng.uniform(-1, 1, size=(n, ACTION_DIM)).astype(np.float32),
    }
    ends = np.arange(1, episodes + 1, dtype=np.int64) * length
    offsets = {"state": range(-(n_obs_steps - 1), 1), "action": range(0, horizon)}
    windows = InMemoryWindows(arrays, SequenceSampler(ends, offsets), extras={TASK_KEY: np.arange(episodes) % N_TASKS})
    return TrainingData(windows, shape_meta(), Normalizer.from_data(arrays), source="synthetic")


def train_config(out_dir: Path, size: str, device: "torch.device", batch_size: int, threads: int, **kw) -> "TrainConfig":
    d = dict(
        dataset="synthetic", out_dir=str(out_dir), policy=policy_dict(size), steps=100_000, batch_size=batch_size,
        warmup_steps=10, device=str(device), progress=False, num_threads=threads, tracking={"tensorboard": False},
    )  # fmt: skip
    d.update(kw)
    return from_dict(TrainConfig, d)


class SyntheticRobot:
    """A robot without a simulator: observation n is published at start + n * dt (computed
    when read), its state a smooth function of the tick; commands are counted."""

    action_low = None  # the loop takes the policy's action range
    action_high = None

    def __init__(self, hz: float, state_dim: int = STATE_DIM, action_dim: int = ACTION_DIM):
        self.dt = 1.0 / hz
        self.action_dim = action_dim
        self._phase = np.arange(state_dim, dtype=np.float32)
        self.start = now()
        self.commands = 0

    def connect(self) -> None:
        pass

    def start_episode(self, seed: int | None = None) -> None:
        self.start = now()

    def get_observation(self) -> dict[str, Any]:
        tick = int((now() - self.start) / self.dt)
        state = np.sin(0.02 * tick + self._phase).astype(np.float32)
        return {"state": state, "tick": tick, "timestamp": self.start + tick * self.dt, "success": False, "done": False}

    def send_action(self, action: np.ndarray) -> None:
        self.commands += 1

    def hold_action(self, last: np.ndarray | None) -> np.ndarray:
        return np.zeros(self.action_dim)

    def disconnect(self, keep_torque: bool = False) -> None:
        pass


class WorldOfOneGroup(ProcessGroup if IMPORT_ERROR is None else object):
    """The trainer's process group, joined also at world size 1 (NCCL on cuda, gloo on cpu),
    so that one GPU runs the DistributedDataParallel path; the trainer itself stays
    single-process below world size 2."""

    def __init__(self, device_name: str):
        super().__init__(device_name)
        if self.world_size == 1 and not dist.is_initialized():
            if self.device.type == "cuda":
                self.device = torch.device("cuda", self.local_rank if self.device.index is None else self.device.index)
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo", timeout=timedelta(minutes=5))
            self._owns_group = True

    @property
    def distributed(self) -> bool:
        return dist.is_initialized()


# ---------------------------------------------------------------------------- measuring
def synchronize(device: "torch.device") -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: "torch.device") -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: "torch.device") -> dict[str, Any]:
    if device.type == "cuda":
        return {
            "kind": "cuda",
            "max_allocated_bytes": int(torch.cuda.max_memory_allocated(device)),
            "max_reserved_bytes": int(torch.cuda.max_memory_reserved(device)),
        }
    return {"kind": "cpu", "max_rss_bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)}


def free_memory(device: "torch.device") -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def percentiles(values, qs=(50, 90, 99)) -> dict[str, float]:
    v = np.asarray([x for x in values if x == x], dtype=np.float64)  # NaN: no value this cycle
    if v.size == 0:
        return {"count": 0}
    out = {f"p{q}": float(np.percentile(v, q)) for q in qs}
    out.update(count=int(v.size), mean=float(v.mean()), max=float(v.max()))
    return out


class DeviceMemorySampler:
    """The device's used memory (all processes), sampled in a thread while a phase runs."""

    def __init__(self, device: "torch.device", period_s: float = 0.05):
        self.device, self.period_s = device, period_s
        self.baseline = self.peak = self._used()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _used(self) -> int:
        free, total = torch.cuda.mem_get_info(self.device)
        return int(total - free)

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.peak = max(self.peak, self._used())

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join()
        return {"device_used_peak_bytes": self.peak, "device_used_before_bytes": self.baseline}


def one_line(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {msg[0] if msg else ''}"[:500]


class Phase:
    """What a phase function gets: settings, device, its deadline, a scratch folder, notes."""

    def __init__(self, name: str, settings: Settings, device: "torch.device", deadline: float, tmp: Path, on_progress: Callable[[dict], None] | None = None):
        self.name, self.s, self.device, self.deadline, self.tmp = name, settings, device, deadline, tmp
        self.notes: list[str] = []
        self.on_progress = on_progress or (lambda results: None)
        self.started = time.time()

    def left(self) -> float:
        return self.deadline - time.time()

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"   [{self.name}] note: {text}", flush=True)


# ---------------------------------------------------------------------------- phase: train
def train_variant(ph: Phase, data: "TrainingData", size: str, name: str, precision: str, compiled: bool) -> dict[str, Any]:
    s, device = ph.s, ph.device
    threads = 1 if s.quick else 0
    # On the CPU the quick mode compiles with the eager backend (dynamo's trace only):
    # inductor's C++ build takes minutes on a small shared CPU.
    eager_backend = compiled and s.quick and device.type == "cpu"
    cfg = train_config(ph.tmp / f"train-{size}-{name}", size, device, s.train_batch, threads, precision=precision, compile=compiled and not eager_backend)
    reset_peak_memory(device)
    trainer = Trainer(cfg, data=data)
    try:
        if eager_backend:
            trainer.policy.net.compile(backend="eager")
        t = time.perf_counter()
        trainer.train_step()
        synchronize(device)
        first_step_s = time.perf_counter() - t
        for _ in range(s.train_warmup_steps):
            trainer.train_step()
        synchronize(device)
        steps, t0 = 0, time.perf_counter()
        grad_norm = float("nan")
        while steps < s.train_min_steps or time.perf_counter() - t0 < s.train_measure_s:
            grad_norm = trainer.train_step()  # returns a float: the step has finished on the device
            steps += 1
        synchronize(device)
        elapsed = time.perf_counter() - t0
        return {
            "params": trainer.n_params,
            "precision": precision,
            "compile": "eager backend (quick mode on cpu)" if eager_backend else ("inductor" if compiled else False),
            "steps_per_s": steps / elapsed,
            "samples_per_s": s.train_batch * steps / elapsed,
            "timed_steps": steps,
            "first_step_s": first_step_s,
            "grad_norm_last": grad_norm,
            "finite": math.isfinite(grad_norm),
            "peak_memory": peak_memory(device),
        }
    finally:
        trainer.close()
        del trainer
        if compiled:
            torch._dynamo.reset()
        free_memory(device)


def phase_train(ph: Phase) -> dict[str, Any]:
    s = ph.s
    data = synthetic_training_data(s.train_episodes)
    res: dict[str, Any] = {"batch_size": s.train_batch, "windows": len(data.windows), "sizes": {}}
    if ph.device.type == "cuda":
        res["note"] = "fp32 runs TF32 matmuls (the trainer enables them on cuda)"
    for size in s.train_sizes:
        res["sizes"][size] = {"network": SIZES[size], "variants": {}}
    # Variant by variant over the sizes: a short budget drops the last compiled variant first.
    for name, (precision, compiled) in TRAIN_VARIANTS.items():
        for size in s.train_sizes:
            entry = res["sizes"][size]
            # Compilation takes most of a compiled variant; one that overruns is stopped with the
            # phase, the figures before it kept.
            need = s.train_measure_s + (30.0 if compiled and not s.quick else 10.0)
            if ph.left() < need:
                entry["variants"][name] = {"skipped": f"{ph.left():.0f} s left of the phase, it needs ~{need:.0f} s"}
                ph.note(f"{size}/{name} skipped: {entry['variants'][name]['skipped']}")
                continue
            try:
                entry["variants"][name] = r = train_variant(ph, data, size, name, precision, compiled)
                print(f"   train {size:5s} {name:12s} {r['steps_per_s']:8.2f} steps/s  {r['samples_per_s']:9.0f} samples/s  first step {r['first_step_s']:.2f} s", flush=True)
            except Exception as exc:  # one variant failing (e.g. no C compiler for triton) leaves the others
                entry["variants"][name] = {"error": one_line(exc)}
                ph.note(f"{size}/{name} failed: {one_line(exc)}")
                free_memory(ph.device)
            ph.on_progress(res)
    for entry in res["sizes"].values():
        eager = entry["variants"].get("fp32_eager", {}).get("steps_per_s")
        if eager:
            entry["speedup_vs_fp32_eager"] = {k: v["steps_per_s"] / eager for k, v in entry["variants"].items() if "steps_per_s" in v}
    return res


# ---------------------------------------------------------------------------- phase: latency
def time_round_robin(callers: dict[str, Callable[[int], Any]], repeats: int, device: "torch.device") -> dict[str, dict[str, float]]:
    """Milliseconds per call, the variants interleaved so that load changes hit all alike."""
    times: dict[str, list[float]] = {k: [] for k in callers}
    for k, call in callers.items():  # warm-up: allocations, cuBLAS handles, the expert cache
        for i in range(2):
            call(-1 - i)
    synchronize(device)
    for r in range(repeats):
        for k, call in callers.items():
            t = time.perf_counter()
            call(r)
            synchronize(device)
            times[k].append(1e3 * (time.perf_counter() - t))
    return {k: {"median_ms": statistics.median(v), "p90_ms": float(np.percentile(v, 90)), "min_ms": min(v)} for k, v in times.items()}


def latency_callers(device: "torch.device", dense, cached, uncached, obs, k_values=(1, 2)) -> tuple[dict, dict]:
    """Each caller returns the chunk on the host, as the deploy path needs it."""

    def gen(r: int):
        return torch.Generator(device=device).manual_seed(1000 + r)

    callers: dict[str, Callable[[int], Any]] = {"full_10": lambda r: dense.plan(obs, gen(r)).actions.cpu()}
    steps = {"full_10": dense.objective.schedule().numel()}
    shift = dense.cfg.n_action_steps
    for k in k_values:
        sampler = RTISampler(dense, RTIConfig(k=k))
        sampler(obs, shift=None, generator=gen(0))  # the first call of an episode is a full denoise

        def rti(r, sampler=sampler):
            res = sampler(obs, shift=shift, generator=gen(r))
            assert res.warm and res.steps == sampler.cfg.k
            return res.actions.cpu()

        callers[f"rti_k{k}"], steps[f"rti_k{k}"] = rti, k
    callers["mode_cached"] = lambda r: cached.plan(obs, gen(r)).actions.cpu()
    callers["mode_uncached"] = lambda r: uncached.plan(obs, gen(r)).actions.cpu()
    steps["mode_cached"] = steps["mode_uncached"] = steps["full_10"]
    return callers, steps


def phase_latency(ph: Phase) -> dict[str, Any]:
    s, device = ph.s, ph.device
    if device.type == "cpu":
        torch.set_num_threads(1)
    else:  # fp32 means fp32 here (torch's default), whatever an earlier phase in this process set
        torch.backends.cuda.matmul.allow_tf32 = False
    res: dict[str, Any] = {"objective": "edm, 10 steps", "repeats": s.latency_repeats, "precisions": "fp32: full fp32 matmuls; bf16: autocast, as the deploy path runs on cuda", "sizes": {}}
    reset_peak_memory(device)
    for size in s.latency_sizes:
        if ph.left() < 5:
            ph.note(f"size {size} skipped: {ph.left():.0f} s left")
            continue
        meta = shape_meta()
        torch.manual_seed(0)
        dense = DenoisingPolicy(policy_config_from_dict(policy_dict(size)), meta).to(device).eval()
        cached = DenoisingPolicy(policy_config_from_dict(policy_dict(size, "mode", expert_cache=True)), meta).to(device).eval()
        uncached = DenoisingPolicy(policy_config_from_dict(policy_dict(size, "mode", expert_cache=False)), meta).to(device).eval()
        uncached.load_state_dict(cached.state_dict())
        counts = cached.parameter_counts()
        entry = res["sizes"][size] = {
            "network": SIZES[size],
            "params_dense": dense.parameter_counts()["total"],
            "params_mode_total": counts["total"],
            "params_mode_active": counts["active"],
        }
        for precision in s.precisions(device):
            for b in s.latency_batches:
                if ph.left() < 3:
                    ph.note(f"{size}/{precision}/batch {b} skipped: {ph.left():.0f} s left")
                    continue
                obs = {k: v.to(device) for k, v in example_observation(dense, b).items()}
                autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
                with torch.inference_mode(), autocast:
                    callers, steps = latency_callers(device, dense, cached, uncached, obs)
                    timed = time_round_robin(callers, s.latency_repeats, device)
                for k, v in timed.items():
                    v["network_evaluations"] = steps[k]
                full = timed["full_10"]["median_ms"]
                timed["ratios"] = {
                    "full_over_rti_k1": full / timed["rti_k1"]["median_ms"],
                    "full_over_rti_k2": full / timed["rti_k2"]["median_ms"],
                    "mode_uncached_over_cached": timed["mode_uncached"]["median_ms"] / timed["mode_cached"]["median_ms"],
                }
                entry.setdefault(precision, {})[f"batch_{b}"] = timed
                print(
                    f"   latency {size:5s} {precision} batch {b:2d}: "
                    + "  ".join(f"{k} {v['median_ms']:.2f}" for k, v in timed.items() if k != "ratios")
                    + " ms",
                    flush=True,
                )
                ph.on_progress(res)
        del dense, cached, uncached
        free_memory(device)
    res["peak_memory"] = peak_memory(device)
    return res


# ---------------------------------------------------------------------------- phase: deploy
def phase_deploy(ph: Phase) -> dict[str, Any]:
    s, device = ph.s, ph.device
    setup_s = 15.0 if not s.quick else 0.0  # server start, model load, warm-up calls
    cycles = s.deploy_cycles
    fits = int(max(0.0, ph.left() - setup_s - 5.0) * s.deploy_hz)
    if fits < cycles:
        ph.note(f"{cycles} cycles do not fit the {ph.left():.0f} s left: running {fits}")
        cycles = fits
    if cycles < 1:
        raise RuntimeError("no time left for a single cycle")
    torch.manual_seed(0)
    policy = DenoisingPolicy(policy_config_from_dict(policy_dict(s.deploy_size)), shape_meta())
    ckpt = save_policy(policy, ph.tmp / "deploy-policy", info={"source": "gpu_bench synthetic"})
    # timeout_s: the product's 2 s default may not cover a cold first call on a GPU (cuBLAS,
    # kernels loaded); the cold call is reported as cold_first_call_ms.
    inference = InferenceConfig(backend=s.deploy_backend, device=str(device), num_threads=1, timeout_s=10.0, rti=RTIConfig(k=s.deploy_rti_k))
    loop_cfg = LoopConfig(control_hz=s.deploy_hz, max_episode_ticks=cycles)
    robot = SyntheticRobot(s.deploy_hz)
    client = make_client(inference, str(ckpt))
    try:
        loop = ControlLoop(robot, client, loop_cfg, SafetyConfig())
        try:
            rt = RealtimeSettings(loop_cfg.switch_interval_us / 1e6, loop_cfg.gc_freeze, loop_cfg.fifo_priority)
            with loop.sigint_guard(), rt:
                for n in rt.notes:
                    ph.note(n)
                result = loop.run_episode("synthetic", 0, seed=0)
            cold = loop.worker.latency.cold_s
        finally:
            loop.close()
    finally:
        client.close()
    rows = np.asarray(loop.rows, dtype=np.float64).reshape(-1, len(CYCLE_COLUMNS))
    col = {c: rows[:, i] for i, c in enumerate(CYCLE_COLUMNS)}
    res = {
        "backend": s.deploy_backend,
        "policy": {"network": SIZES[s.deploy_size], "objective": "edm, 10 steps", "rti_k": s.deploy_rti_k, "params": sum(p.numel() for p in policy.parameters())},
        "control_hz": s.deploy_hz,
        "cycles_asked": cycles,
        "cycles": int(rows.shape[0]),
        "ticks": result.ticks,
        "end": result.end,
        "fault": result.fault,
        "fault_detail": result.fault_detail,
        "missed_deadlines": int(col["missed"].sum()),
        "hold_cycles": int(col["hold"].sum()),
        "jitter_ms": percentiles(col["jitter_ms"]),
        "work_ms": percentiles(col["work_ms"]),
        "obs_age_ms": percentiles(col["obs_age_ms"]),
        "latency_ms": percentiles(col["latency_ms"]),
        "warm_latency_ms": percentiles(result.warm_latencies_ms),
        "full_latency_ms": percentiles(result.full_latencies_ms),
        "first_call_of_episode_ms": result.first_latency_ms,
        "cold_first_call_ms": None if cold is None else 1e3 * cold,
        "in_policy_compute_ms": percentiles(result.steady_compute_ms),
        "policy_calls": result.calls,
        "denoise_steps_per_call": result.denoise_steps / max(1, result.calls),
        "commands_received": robot.commands,
    }
    print(
        f"   deploy {res['cycles']} cycles at {s.deploy_hz:.0f} Hz ({s.deploy_backend}): jitter p99 {res['jitter_ms'].get('p99', float('nan')):.3f} ms, "
        f"max {res['jitter_ms'].get('max', float('nan')):.2f} ms; missed {res['missed_deadlines']}, holds {res['hold_cycles']}, "
        f"warm latency p50 {res['warm_latency_ms'].get('p50', float('nan')):.2f} ms; end {result.end}",
        flush=True,
    )
    return res


# ---------------------------------------------------------------------------- phase: ddp
def ddp_compat() -> str | None:
    """torch < 2.13 has no ``DistributedDataParallel(forward_sync_buffers=...)``, which the
    trainer passes (train/setup.py, wrap_for_processes): translate it to ``broadcast_buffers`` there (for this trainer the same:
    its buffers, the normalizer statistics, are equal on every rank). Returns a note, or
    None when torch takes the argument itself."""
    import inspect

    from torch.nn import parallel

    ddp = parallel.DistributedDataParallel
    if "forward_sync_buffers" in inspect.signature(ddp.__init__).parameters:
        return None

    class CompatDDP(ddp):
        def __init__(self, *a, forward_sync_buffers=None, **kw):
            if forward_sync_buffers is not None:
                kw.setdefault("broadcast_buffers", forward_sync_buffers)
            super().__init__(*a, **kw)

    parallel.DistributedDataParallel = CompatDDP  # wrap_for_processes imports it from here when it wraps
    return (
        f"torch {torch.__version__} lacks DistributedDataParallel(forward_sync_buffers=...) (torch >= 2.13), which "
        "train/setup.py (wrap_for_processes) passes: this run translated it to broadcast_buffers=False; unpatched, DDP fails there"
    )


def ddp_worker(args) -> int:
    """Runs under torchrun: the trainer's DDP path at world size 1; writes its figures."""
    s = QUICK if args.quick else FULL
    device = torch.device(args.device)
    trainer_module.ProcessGroup = WorldOfOneGroup  # the trainer builds its group through this name
    compat = ddp_compat()
    out = Path(args.phase_out)
    tmp = Path(tempfile.mkdtemp(prefix="mixpolicy-ddp-"))
    try:
        reset_peak_memory(device)
        cfg = train_config(
            tmp / "run", s.ddp_size, device, s.train_batch, 1 if s.quick else 0, steps=s.ddp_steps,
            log_every=max(1, s.ddp_steps // 6), precision="auto", checkpoint_every=0,
        )  # fmt: skip
        from torch.nn.parallel import DistributedDataParallel

        trainer = Trainer(cfg, data=synthetic_training_data(s.train_episodes))
        wrapped = isinstance(trainer.loss_module, DistributedDataParallel)
        backend = dist.get_backend() if dist.is_initialized() else None
        t = time.perf_counter()
        summary = trainer.run()
        wall = time.perf_counter() - t
        records = [json.loads(l) for l in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in records if r["kind"] == "train"]
        steady = train[1:] or train  # the first interval holds start-up
        res = {
            "status": "ok",
            "results": {
                "backend": backend,
                "world_size": int(os.environ.get("WORLD_SIZE", "1")),
                "ddp_wrapped": wrapped,
                "device": str(trainer.device),
                "precision": "bf16" if trainer.autocast_dtype is not None else "fp32",
                "network": SIZES[s.ddp_size],
                "params": trainer.n_params,
                "batch_size": s.train_batch,
                "steps": summary["steps"],
                "steps_per_s": float(np.mean([r["steps_per_s"] for r in steady])),
                "samples_per_s": float(np.mean([r["samples_per_s"] for r in steady])),
                "final_loss": summary["final_loss"],
                "run_s": wall,
                "torch_compat": compat,
                "peak_memory": peak_memory(device),
            },
        }
    except Exception as exc:
        res = {"status": "failed", "error": one_line(exc), "traceback": traceback.format_exc()[-3000:]}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write_json(out, res)
    return 0 if res["status"] == "ok" else 1


def phase_ddp(ph: Phase, args) -> dict[str, Any]:
    out = ph.tmp / "ddp-worker.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", str(Path(__file__)), "--ddp-worker",
           "--device", str(ph.device), "--phase-out", str(out)] + (["--quick"] if ph.s.quick else [])  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    if ph.device.type == "cpu":
        env["OMP_NUM_THREADS"] = "1"
    rc, timed_out = run_process(cmd, ph.left(), env=env)
    if timed_out:
        raise TimeoutError(f"torchrun did not finish within {ph.deadline - ph.started:.0f} s")
    if not out.exists():
        raise RuntimeError(f"torchrun exited {rc} without results")
    worker = json.loads(out.read_text())
    if worker["status"] != "ok":
        raise RuntimeError(f"the DDP worker failed: {worker.get('error')}\n{worker.get('traceback', '')}")
    r = worker["results"]
    if r.get("torch_compat"):
        ph.note(r["torch_compat"])
    print(f"   ddp {r['backend']} world size {r['world_size']}: {r['steps']} steps, {r['steps_per_s']:.2f} steps/s", flush=True)
    return r


# ---------------------------------------------------------------------------- phase: tests
def phase_tests(ph: Phase) -> dict[str, Any]:
    report = ph.tmp / "pytest-report.json"
    files = DEVICE_TESTS if ph.s.quick else FULL_TESTS
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "gpu_pytest_report", "-p", "no:cacheprovider", f"--basetemp={ph.tmp / 'pytest'}", *files]
    deselect = QUICK_DESELECT if ph.s.quick else DESELECT
    cmd += [f"--deselect={d}" for d in deselect]
    env = dict(os.environ, MIXPOLICY_TEST_DEVICE=str(ph.device), MIXPOLICY_PYTEST_REPORT=str(report))
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])])
    rc, timed_out = run_process(cmd, ph.left(), env=env)
    res = json.loads(report.read_text()) if report.exists() else {}
    res.update(exit_code=rc, files=files, deselected=deselect)
    if timed_out:
        ph.note(f"pytest stopped at the phase budget after {res.get('done', 0)} tests")
        res["timed_out"] = True
    print(f"   tests: {res.get('passed', 0)} passed, {res.get('failed', 0)} failed, {res.get('errors', 0)} errors, {res.get('skipped', 0)} skipped", flush=True)
    for f in res.get("failures", [])[:20]:
        print(f"     FAILED {f['test']}: {f['message']}", flush=True)
    return res


# ---------------------------------------------------------------------------- orchestration
def run_process(cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> tuple[int, bool]:
    """Run ``cmd`` in its own session; past ``timeout`` the whole session is stopped."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True)
    try:
        return proc.wait(timeout=max(1.0, timeout)), False
    except subprocess.TimeoutExpired:
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        return proc.returncode if proc.returncode is not None else -9, True


IN_PROCESS = {"train": phase_train, "latency": phase_latency, "deploy": phase_deploy}


def run_phase_here(name: str, settings: Settings, device, deadline: float, tmp: Path, args, on_progress=None) -> dict[str, Any]:
    ph = Phase(name, settings, device, deadline, tmp, on_progress)
    entry: dict[str, Any] = {}
    try:
        if name == "tests":
            results = phase_tests(ph)
            ok = results.get("exit_code") == 0 and not results.get("timed_out")
            entry.update(status="ok" if ok else ("timeout" if results.get("timed_out") else "failed"), results=results)
        elif name == "ddp":
            entry.update(status="ok", results=phase_ddp(ph, args))
        else:
            reset_peak_memory(device)
            entry.update(status="ok", results=IN_PROCESS[name](ph))
            entry["peak_memory"] = peak_memory(device)
    except TimeoutError as exc:
        entry.update(status="timeout", error=one_line(exc))
    except Exception as exc:
        entry.update(status="failed", error=one_line(exc), traceback=traceback.format_exc()[-3000:])
        print(f"   [{name}] failed: {one_line(exc)}", flush=True)
    entry["notes"] = ph.notes
    if "peak_memory" not in entry:  # tests and ddp: what their own processes reported
        entry["peak_memory"] = dict((entry.get("results") or {}).get("peak_memory") or {})
    return entry


def run_phase_isolated(name: str, budget: float, args, tmp: Path) -> dict[str, Any]:
    """A phase in a child interpreter: a crash or a hang there leaves the others running."""
    out = tmp / f"phase-{name}.json"
    cmd = [sys.executable, str(Path(__file__)), "--phase", name, "--phase-out", str(out), "--deadline", str(time.time() + budget), "--device", args.device, "--tmp", str(tmp)]
    cmd += ["--quick"] if args.quick else []
    rc, timed_out = run_process(cmd, budget + KILL_GRACE_S)
    entry = json.loads(out.read_text()) if out.exists() else {}
    if timed_out:
        entry.update(status="timeout", error=f"stopped {KILL_GRACE_S:.0f} s past its {budget:.0f} s budget")
    elif rc != 0 or not entry:  # the child writes failures into its entry and exits 0: it crashed
        entry.update(status="failed", error=entry.get("error") or f"the phase process exited {rc}" + ("" if entry else " without results"))
    entry.setdefault("notes", [])
    return entry


def device_info(device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": str(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_model": _cpu_model(),
        "c_compiler": shutil.which("cc") or shutil.which("gcc"),  # triton builds its launcher with it (torch.compile on cuda)
        "wheels_installed": os.environ.get("MIXPOLICY_GPU_WHEELS_INSTALLED") == "1",
    }
    if device.type == "cuda":
        try:
            from torch.cuda import nccl

            p = torch.cuda.get_device_properties(device)
            info.update(
                gpu=p.name, capability=f"{p.major}.{p.minor}", gpu_memory_bytes=int(p.total_memory), bf16=torch.cuda.is_bf16_supported(),
                cudnn=torch.backends.cudnn.version(), nccl=".".join(map(str, nccl.version())),
            )  # fmt: skip
        except Exception as exc:  # a detail missing must not stop the run
            info["gpu_info_error"] = one_line(exc)
    return info


def _cpu_model() -> str | None:
    with contextlib.suppress(Exception):  # mixpolicy's import is itself one of the checks
        from mixpolicy.utils import cpu_model

        return cpu_model()
    return None


def _json_default(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(type(x).__name__)


def _finite(x):
    """Strict JSON: a non-finite float becomes null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(_finite(json.loads(json.dumps(obj, default=_json_default))), indent=2, allow_nan=False))
    os.replace(tmp, path)


def orchestrate(args, out: Path) -> int:
    t0 = float(os.environ.get("MIXPOLICY_GPU_T0") or time.time())
    settings = QUICK if args.quick else FULL
    budgets = dict(QUICK_BUDGET_S if args.quick else BUDGET_S)
    total = args.budget_s or (QUICK_TOTAL_BUDGET_S if args.quick else TOTAL_BUDGET_S)
    device = torch.device(args.device)
    isolate = args.isolate == "yes" or (args.isolate == "auto" and device.type == "cuda")
    results: dict[str, Any] = {
        "format": FORMAT,
        "mode": "quick" if args.quick else "full",
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0)),
        "budget_s": total,
        "phase_budgets_s": budgets,
        "isolated_phases": isolate,
        "machine": device_info(device),
        "install": {"seconds": float(os.environ.get("MIXPOLICY_GPU_INSTALL_S") or 0.0), "wheels": os.environ.get("MIXPOLICY_GPU_WHEELS_INSTALLED") == "1"},
        "settings": dataclasses.asdict(settings),
        "phases": {},
    }
    write_json(out, results)
    m = results["machine"]
    print(f"== mixpolicy GPU checks ({results['mode']}) on {m.get('gpu') or m['cpu_model']}: torch {m['torch']}, python {m['python']}, budget {total:.0f} s", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="mixpolicy-gpu-"))
    try:
        for name in args.phases:
            left = t0 + total - RESERVE_S - time.time()
            budget = budgets[name]
            entry: dict[str, Any]
            if left < 0.5 * budget:
                entry = {"status": "skipped", "notes": [f"skipped: {left:.0f} s left of the {total:.0f} s budget, the phase needs ~{budget:.0f} s"]}
                print(f"[{name}] {entry['notes'][0]}", flush=True)
                results["phases"][name] = entry
                write_json(out, results)
                continue
            reduced = left < budget
            budget = min(budget, left)
            print(f"[{name}] start, budget {budget:.0f} s", flush=True)
            start = time.time()
            phase_tmp = tmp / name
            phase_tmp.mkdir()
            sampler = DeviceMemorySampler(device) if isolate and device.type == "cuda" else None
            if isolate and name in IN_PROCESS:
                entry = run_phase_isolated(name, budget, args, phase_tmp)
            else:
                entry = run_phase_here(name, settings, device, start + budget, phase_tmp, args)
            if sampler is not None:
                entry.setdefault("peak_memory", {}).update(sampler.stop())
            if reduced:
                entry["notes"].insert(0, f"budget reduced to the {budget:.0f} s left")
            entry.update(elapsed_s=time.time() - start, budget_s=budget)
            results["phases"][name] = entry
            print(f"[{name}] {entry['status']} in {entry['elapsed_s']:.1f} s (budget {budget:.0f} s, run so far {time.time() - t0:.0f} s)", flush=True)
            write_json(out, results)
            free_memory(device)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    results["peak_memory_by_phase"] = {k: v.get("peak_memory", {}) for k, v in results["phases"].items()}
    results["total_s"] = time.time() - t0
    statuses = {k: v["status"] for k, v in results["phases"].items()}
    results["statuses"] = statuses
    write_json(out, results)
    print(f"== done in {results['total_s']:.0f} s: " + ", ".join(f"{k} {v}" for k, v in statuses.items()) + f"; results in {out}", flush=True)
    return 0 if all(v in ("ok", "skipped") for v in statuses.values()) else 1


def phase_child(args) -> int:
    """One in-process phase in this (child) interpreter; writes its entry as it goes."""
    out = Path(args.phase_out)
    device = torch.device(args.device)
    settings = QUICK if args.quick else FULL
    tmp = Path(args.tmp)

    def progress(results: dict) -> None:  # partial figures survive a stop at the budget
        write_json(out, {"status": "timeout", "results": results, "notes": ["stopped at the budget; figures so far"]})

    entry = run_phase_here(args.phase, settings, device, args.deadline, tmp, args, on_progress=progress)
    write_json(out, entry)
    return 0


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not the usage block
        self.exit(2, f"gpu_bench: error: {message}\n")


def main(argv: list[str] | None = None) -> int:
    p = _Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (cuda when present), cuda, cuda:N or cpu")
    p.add_argument("--quick", action="store_true", help="tiny sizes, few steps and cycles: every phase in seconds")
    p.add_argument("--out", default=None, help="results JSON (default: $OUT/gpu_results.json when OUT is set)")
    p.add_argument("--phases", nargs="+", default=list(PHASES), choices=PHASES, metavar="PHASE", help=f"phases to run, in order (default: {' '.join(PHASES)})")
    p.add_argument("--budget-s", type=float, default=0.0, help="the whole run's budget in seconds (default: 480, quick mode 450)")
    p.add_argument("--isolate", default="auto", choices=["auto", "yes", "no"], help="run train/latency/deploy each in its own process (auto: on cuda)")
    p.add_argument("--ddp-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--phase", choices=list(IN_PROCESS), help=argparse.SUPPRESS)
    p.add_argument("--phase-out", help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--tmp", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.budget_s < 0:
        p.error(f"--budget-s must be >= 0, got {args.budget_s}")
    out = None
    if not (args.ddp_worker or args.phase):
        out_arg = args.out or (str(Path(os.environ["OUT"]) / "gpu_results.json") if os.environ.get("OUT") else None)
        if out_arg is None:
            p.error("pass --out FILE (or set OUT to a folder)")
        out = Path(out_arg)
        if not out.parent.is_dir():
            p.error(f"--out: folder {out.parent} does not exist")
    if IMPORT_ERROR is not None:
        if out is not None:
            write_json(out, {"format": FORMAT, "statuses": {}, "import_error": IMPORT_ERROR, "phases": {}})
        print(f"gpu_bench: error: cannot import mixpolicy's dependencies ({IMPORT_ERROR}); were the wheels installed?", file=sys.stderr)
        return 2
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(args.device)
    except RuntimeError:
        p.error(f"--device: unknown device {args.device!r} (use auto, cpu, cuda or cuda:N)")
    if device.type not in ("cpu", "cuda"):
        p.error(f"--device: {args.device!r} is neither cpu nor cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA GPU is visible (use --device cpu)")
    if args.ddp_worker:
        return ddp_worker(args)
    if args.phase:
        return phase_child(args)
    return orchestrate(args, out)


if __name__ == "__main__":
    sys.exit(main())
