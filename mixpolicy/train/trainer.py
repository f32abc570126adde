"""Training loop: data-parallel, mixed precision, exact resume, periodic closed-loop evaluation.

One process (``mixpolicy train ...``) or many (``torchrun --nproc_per_node=N -m
mixpolicy.cli train ...``) run the same loop. ``batch_size`` is the global batch of one
optimizer step: it splits into ``processes x grad_accum_steps`` equal micro-batches.
Every random draw of a micro-batch (which windows, noise levels, noise, dropout) derives
from (seed, step, micro-batch index), so a resumed run continues exactly where the
checkpoint left off, and the result depends on the global batch and on the number of
micro-batches, not on how they are spread over processes and accumulation steps.

A run folder holds::

    train_config.json          the validated config of the run
    metrics.jsonl              one JSON line per logged step or evaluation
    tb/                        tensorboard scalars (tracking.tensorboard)
    wandb/                     wandb files (tracking.wandb)
    checkpoints/step_<N>/      policy (EMA weights) + training state; see checkpointing.py
    checkpoints/last, best     links to the newest and to the best-evaluated step
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from mixpolicy.config import check, to_dict
from mixpolicy.datasets.normalizer import Normalizer
from mixpolicy.datasets.replay_buffer import ReplayBuffer
from mixpolicy.datasets.sampler import InMemoryWindows, SequenceSampler
from mixpolicy.datasets.selection import EpisodeSelection, select_episodes
from mixpolicy.errors import UserError
from mixpolicy.policies.checkpoint import read_checkpoint_meta, save_policy
from mixpolicy.policies.config import PolicyConfig, policy_config_from_dict
from mixpolicy.policies.denoising_policy import TASK_KEY, DenoisingPolicy, ShapeMeta
from mixpolicy.train.batches import LoaderConfig, StepBatchSampler, batch_stream, micro_batch_seed
from mixpolicy.train.checkpointing import LAST, CheckpointStore, write_json_atomic
from mixpolicy.train.distributed import ProcessGroup
from mixpolicy.train.tracking import METRICS_FILE, TRACKING_FILE, Tracker, TrackingConfig
from mixpolicy.utils import set_threads

TRAIN_STATE_FILE = "training_state.safetensors"
TRAIN_STATE_JSON = "training_state.json"
PRECISIONS = ("auto", "fp32", "bf16")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
# What overwrite=true removes from a run folder (other files are left alone).
RUN_ARTIFACTS = ("checkpoints", "tb", "wandb", METRICS_FILE, TRACKING_FILE, "train_config.json")


@dataclass
class PeriodicEvalConfig:
    """Closed-loop evaluation of the EMA weights during training; the best step is kept."""

    every: int = 0
    episodes_per_task: int = 10
    tasks: list[str] = field(default_factory=list)
    seed: int = 100_000
    num_envs: int = 10
    max_episode_steps: int = 500
    num_inference_steps: int = 0

    def __post_init__(self):
        check(self.every >= 0, "eval.every", "must be >= 0 (0: no evaluation during training)")
        check(self.episodes_per_task >= 1, "eval.episodes_per_task", "must be >= 1")
        check(self.num_envs >= 1, "eval.num_envs", "must be >= 1")
        check(1 <= self.max_episode_steps <= 500, "eval.max_episode_steps", "must be in [1, 500]")
        check(self.num_inference_steps >= 0, "eval.num_inference_steps", "must be >= 0 (0: the policy's own)")
        check(self.seed >= 0, "eval.seed", "must be >= 0")
        if self.tasks:
            from mixpolicy.envs.metaworld_env import check_task_names

            check_task_names(self.tasks)


@dataclass
class TrainConfig:
    dataset: str = ""
    out_dir: str = "runs/train"
    policy: Any = None
    steps: int = 3000
    batch_size: int = 256
    grad_accum_steps: int = 1
    lr: float = 1e-3
    weight_decay: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup_steps: int = 100
    min_lr_ratio: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    ema_power: float = 0.75
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    compile: bool = False
    compile_mode: str = "default"
    num_threads: int = 0
    tasks: list[str] = field(default_factory=list)
    successful_only: bool = True
    max_episodes: int = 0
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    log_every: int = 50
    checkpoint_every: int = 0
    keep_last: int = 3
    eval: PeriodicEvalConfig = field(default_factory=PeriodicEvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    resume: bool = False
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self):
        if not isinstance(self.policy, PolicyConfig):
            self.policy = policy_config_from_dict(self.policy or {})
        check(bool(self.dataset), "dataset", "a dataset path is required (dataset=path/to/data.zarr)")
        check(bool(self.out_dir), "out_dir", "an output folder is required")
        check(self.steps >= 1, "steps", "must be >= 1")
        check(self.batch_size >= 1, "batch_size", "must be >= 1")
        check(self.grad_accum_steps >= 1, "grad_accum_steps", "must be >= 1")
        check(self.batch_size % self.grad_accum_steps == 0, "batch_size", f"must be divisible by grad_accum_steps={self.grad_accum_steps}")
        check(self.lr > 0, "lr", "must be > 0")
        check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas", "must be two numbers in [0, 1)")
        check(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]")
        check(self.grad_clip >= 0, "grad_clip", "must be >= 0 (0 disables clipping)")
        check(0 <= self.ema_decay < 1, "ema_decay", "must be in [0, 1)")
        check(self.precision in PRECISIONS, "precision", f"must be one of {PRECISIONS}")
        check(self.compile_mode in COMPILE_MODES, "compile_mode", f"must be one of {COMPILE_MODES}")
        check(self.max_episodes >= 0, "max_episodes", "must be >= 0 (0 means all)")
        check(self.log_every >= 1, "log_every", "must be >= 1")
        check(self.checkpoint_every >= 0, "checkpoint_every", "must be >= 0 (0: only at the end and at evaluations)")
        check(self.keep_last >= 1, "keep_last", "must be >= 1")
        check(self.num_threads >= 0, "num_threads", "must be >= 0 (0: all cores, split between local processes)")
        check(not (self.resume and self.overwrite), "resume", "cannot be combined with overwrite=true")


def lr_lambda(warmup: int, total: int, min_ratio: float):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for full fp32. ``auto``: bf16 on GPUs, fp32 on CPUs
    (bf16 autocast was slower on the CPUs measured, see BENCHMARKS.md)."""
    if name == "bf16" or (name == "auto" and device.type == "cuda"):
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise UserError("precision=bf16 but this GPU does not support bfloat16; use precision=fp32")
        return torch.bfloat16
    return None


def load_training_windows(cfg: TrainConfig, key_offsets: dict[str, range]):
    """Open the dataset, select episodes, load the needed keys; returns (buffer, windows, shape_meta, arrays, mask)."""
    buffer = ReplayBuffer.open(cfg.dataset)
    if buffer.n_episodes == 0:
        raise UserError(f"dataset {cfg.dataset} holds no episodes")
    missing = [k for k in key_offsets if k not in buffer.keys]
    if missing:
        raise UserError(f"dataset {cfg.dataset} lacks required key(s) {missing} (has {', '.join(buffer.keys)})")
    mask = select_episodes(
        buffer, EpisodeSelection(tasks=list(cfg.tasks), successful_only=cfg.successful_only, max_episodes=cfg.max_episodes)
    )
    if not mask.any():
        raise UserError("no episodes left after filtering (successful_only / tasks / max_episodes)")
    arrays = buffer.load(key_offsets)
    for k, a in arrays.items():
        if np.issubdtype(a.dtype, np.floating) and not np.all(np.isfinite(a)):
            raise UserError(f"dataset key {k!r} contains NaN or inf")
    sampler = SequenceSampler(buffer.episode_ends, key_offsets, mask)
    windows = InMemoryWindows(arrays, sampler, extras={TASK_KEY: buffer.episode_task_index})
    action_key = cfg.policy.action_key
    shape_meta = ShapeMeta(
        obs={k: list(arrays[k].shape[1:]) for k in key_offsets if k != action_key},
        action_dim=int(arrays[action_key].shape[1]),
        tasks=list(buffer.meta.tasks),
        discrete_action_dims=list(buffer.meta.discrete_action_dims),
        task_descriptions=dict(buffer.meta.task_descriptions),
        fps=float(buffer.meta.fps),
    )
    return buffer, windows, shape_meta, arrays, mask


@dataclass
class TrainingData:
    """What the trainer trains on.

    ``windows`` is a ``torch.utils.data.Dataset`` whose items are dicts of tensors
    (observation keys ``(n_obs_steps, ...)``, the action key ``(horizon, action_dim)``,
    ``task``). When it also has a vectorized ``batch(ids) -> dict of (B, ...) tensors``
    and ``loader.num_workers == 0`` batches are gathered in the training process;
    otherwise a DataLoader with workers feeds the loop.
    """

    windows: Any
    shape_meta: ShapeMeta
    normalizer: Normalizer
    source: str = ""


def build_training_data(cfg: TrainConfig, key_offsets: dict[str, range]) -> TrainingData:
    """In-memory windows over the selected episodes of ``cfg.dataset``, stats from those episodes."""
    _, windows, shape_meta, arrays, _ = load_training_windows(cfg, key_offsets)
    rows = windows.sampler.anchor  # every step of a selected episode anchors one window
    # Images (uint8 H x W x 3) are normalized inside the policy's image encoder.
    normalizer = Normalizer.from_data({k: arrays[k][rows] for k in key_offsets if arrays[k].ndim == 2})
    discrete_scale = cfg.policy.discrete_action_scale
    if discrete_scale != 1.0 and shape_meta.discrete_action_dims:
        normalizer.scale_dims(cfg.policy.action_key, shape_meta.discrete_action_dims, 1.0 / discrete_scale)
    return TrainingData(windows, shape_meta, normalizer, source=str(cfg.dataset))


class _LossModule(nn.Module):
    """``forward`` = the policy's ``compute_loss``, so DistributedDataParallel's hooks see it."""

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy

    def forward(self, batch: dict[str, torch.Tensor]):
        return self.policy.compute_loss(batch)


class _StopSignal:
    """SIGTERM / SIGINT (preemption, Ctrl-C) ask the loop to checkpoint and stop at the next step boundary."""

    def __init__(self):
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:  # a second signal stops at once
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


class Trainer:
    """``Trainer(cfg).run()``; attributes ``policy``, ``n_params``, ``windows``, ``device``, ``step``."""

    def __init__(self, cfg: TrainConfig, data: TrainingData | None = None):
        self.cfg = cfg
        self.group = ProcessGroup(cfg.device)
        try:
            self._setup(cfg, data)
        except BaseException:
            self.group.close()
            raise

    def _setup(self, cfg: TrainConfig, data: TrainingData | None) -> None:
        self.device = self.group.device
        self.is_main = self.group.is_main
        self.out = Path(cfg.out_dir)
        self.checkpoints = CheckpointStore(self.out / "checkpoints", cfg.keep_last)
        self.ckpt_dir = self.checkpoints.root / LAST
        if self.out.exists() and any(self.out.iterdir()) and not (cfg.resume or cfg.overwrite):
            raise UserError(f"output folder {self.out} is not empty (pass resume=true to continue or overwrite=true)")
        resume_dir = None
        if cfg.resume:
            resume_dir = self.checkpoints.resolve(LAST)
            if resume_dir is None or not (resume_dir / TRAIN_STATE_FILE).is_file():
                raise UserError(f"nothing to resume in {self.out}: no {self.ckpt_dir / TRAIN_STATE_FILE}")
        set_threads(cfg.num_threads or self.group.cores_per_process())
        self.autocast_dtype = resolve_precision(cfg.precision, self.device)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        torch.manual_seed(cfg.seed)

        offsets = {k: range(-(cfg.policy.n_obs_steps - 1), 1) for k in cfg.policy.obs_keys}
        offsets[cfg.policy.action_key] = range(0, cfg.policy.horizon)
        self.data = data if data is not None else build_training_data(cfg, offsets)
        self.windows = self.data.windows
        self.policy = DenoisingPolicy(cfg.policy, self.data.shape_meta, self.data.normalizer).to(self.device)
        self.n_params = sum(p.numel() for p in self.policy.parameters())
        if cfg.eval.every:
            self.eval_tasks = cfg.eval.tasks or [t for t in self.data.shape_meta.tasks]
            if not self.eval_tasks or "unknown" in self.eval_tasks:
                raise UserError("eval.every > 0 but the dataset records no Meta-World tasks; set eval.tasks=[...]")
            if self.policy.task_conditioned:
                for t in self.eval_tasks:
                    self.policy.task_index(t)  # a task the policy never saw fails now, not at the first evaluation
        # Ranks must train the same thing: compare configs and what they loaded.
        self.group.check_same(
            "training config",
            {"config": to_dict(cfg), "windows": len(self.windows), "parameters": self.n_params, "world_size": self.group.world_size},
        )
        self._batches: Iterator[dict[str, torch.Tensor]] | None = None
        self.sampler = StepBatchSampler(
            len(self.windows), cfg.batch_size, cfg.seed, self.group.world_size, self.group.rank, cfg.grad_accum_steps
        )

        decay, no_decay = [], []
        for name, p in self.policy.named_parameters():
            (no_decay if p.ndim < 2 or "embed" in name or name.endswith(".pos") else decay).append(p)
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr,
            betas=tuple(cfg.betas),
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio))
        from diffusers.training_utils import EMAModel

        self.ema = EMAModel(self.policy.parameters(), decay=cfg.ema_decay, use_ema_warmup=True, power=cfg.ema_power)
        self.step = 0
        self.resumed_from: str | None = None
        if resume_dir is not None:
            self._load_state(resume_dir)
            self.resumed_from = str(resume_dir)
        self._fresh = not cfg.resume

        if cfg.compile:
            self.policy.net.compile(mode=cfg.compile_mode)  # in place: parameter names and checkpoints are unchanged
        self.loss_module: nn.Module = _LossModule(self.policy)
        if self.group.distributed:
            from torch.nn.parallel import DistributedDataParallel

            # A mixture policy may leave an expert without samples in a step: only then must
            # DDP search the graph for unused parameters. Buffers (normalizer statistics)
            # never change, so they are synchronized once at construction, not every forward.
            self.loss_module = DistributedDataParallel(
                self.loss_module,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=self.policy.skips_parameters,
                forward_sync_buffers=False,
                gradient_as_bucket_view=True,
            )

    # ------------------------------------------------------------------ state
    @contextlib.contextmanager
    def ema_weights(self):
        """Temporarily load the EMA weights into the policy (for saving and evaluation)."""
        params = list(self.policy.parameters())
        self.ema.store(params)
        self.ema.copy_to(params)
        try:
            yield self.policy
        finally:
            self.ema.restore(params)

    def _write_checkpoint(self, path: Path) -> None:
        with self.ema_weights():
            save_policy(self.policy, path, info={"step": self.step, "dataset": self.data.source})
        tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in self.policy.state_dict().items()}
        for i, p in enumerate(self.ema.shadow_params):
            tensors[f"ema.{i}"] = p.detach().cpu().contiguous()
        opt = self.optimizer.state_dict()
        for pid, st in opt["state"].items():
            for name, v in st.items():
                tensors[f"optim.{pid}.{name}"] = torch.as_tensor(v).detach().cpu().contiguous()
        state_json = {
            "step": self.step,
            "sampler": self.sampler.state(self.step),
            "world_size": self.group.world_size,
            "grad_accum_steps": self.cfg.grad_accum_steps,
            "seed": self.cfg.seed,
            "optimizer_param_groups": [{k: v for k, v in g.items() if k != "params"} for g in opt["param_groups"]],
            "scheduler": self.scheduler.state_dict(),
            "ema_optimization_step": int(self.ema.optimization_step),
        }
        save_file(tensors, str(path / TRAIN_STATE_FILE))
        (path / TRAIN_STATE_JSON).write_text(json.dumps(state_json, indent=2))

    def _save(self) -> None:
        if self.is_main:
            self.checkpoints.write(self.step, self._write_checkpoint)

    def _load_state(self, ckpt: Path) -> None:
        meta = read_checkpoint_meta(ckpt)
        if meta["policy_type"] != self.cfg.policy.type:
            raise UserError(f"cannot resume: {ckpt} holds a {meta['policy_type']!r} policy, the config asks for {self.cfg.policy.type!r}")
        tensors = load_file(str(ckpt / TRAIN_STATE_FILE))
        state_json = json.loads((ckpt / TRAIN_STATE_JSON).read_text())
        saved_sampler = state_json.get("sampler")
        if saved_sampler is not None:
            for key, now in (("n_windows", self.sampler.n_windows), ("batch_size", self.sampler.batch_size)):
                if saved_sampler[key] != now:
                    raise UserError(
                        f"cannot resume exactly: the run used {key}={saved_sampler[key]}, now {now} "
                        "(same dataset, filters and batch_size are needed; overwrite=true starts over)"
                    )
        if state_json.get("seed", self.cfg.seed) != self.cfg.seed:
            raise UserError(f"cannot resume exactly: the run used seed={state_json['seed']}, now {self.cfg.seed}")
        model_state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
        try:
            self.policy.load_state_dict(model_state, strict=True)
        except RuntimeError as exc:
            raise UserError(f"cannot resume: saved weights do not fit the config ({str(exc).splitlines()[0]})") from None
        for i, p in enumerate(self.ema.shadow_params):
            p.data.copy_(tensors[f"ema.{i}"])
        self.ema.optimization_step = state_json["ema_optimization_step"]
        opt_state: dict[int, dict[str, torch.Tensor]] = {}
        for k, v in tensors.items():
            if k.startswith("optim."):
                _, pid, name = k.split(".", 2)
                opt_state.setdefault(int(pid), {})[name] = v
        groups = self.optimizer.state_dict()["param_groups"]
        for g, saved in zip(groups, state_json["optimizer_param_groups"]):
            g.update(saved)
        self.optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
        self.scheduler.load_state_dict(state_json["scheduler"])
        self.step = int(state_json["step"])

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> dict[str, Any]:
        """Closed-loop success of the EMA weights on ``eval.tasks`` (main process only)."""
        from mixpolicy.train.evaluate import evaluate_policy

        e = self.cfg.eval
        with self.ema_weights():
            try:
                res = evaluate_policy(
                    self.policy,
                    self.eval_tasks,
                    episodes_per_task=e.episodes_per_task,
                    seed=e.seed,
                    num_envs=e.num_envs,
                    max_episode_steps=e.max_episode_steps,
                    num_inference_steps=e.num_inference_steps or None,
                    progress=False,
                )
            finally:
                self.policy.train()
        return {
            "step": self.step,
            "average_success": res["average_success"],
            "wilson95": res["overall_wilson95"],
            "episodes_per_task": e.episodes_per_task,
            "seed": e.seed,
            "seconds": res["seconds"],
            "tasks": {t: {k: r[k] for k in ("success_rate", "successes", "episodes", "wilson95", "mean_length")} for t, r in res["tasks"].items()},
        }

    def _evaluate_and_select(self, tracker: Tracker, bar) -> None:
        if self.is_main:
            summary = self.evaluate()
            is_best = self.checkpoints.record_eval(self.step, summary)
            values = {"average_success": summary["average_success"], "wilson95_low": summary["wilson95"][0], "wilson95_high": summary["wilson95"][1]}
            values.update({f"success/{t}": r["success_rate"] for t, r in summary["tasks"].items()})
            tracker.log("eval", self.step, values)
            bar.write(
                f"step {self.step}: success {100 * summary['average_success']:.1f}% "
                f"[{100 * summary['wilson95'][0]:.1f}, {100 * summary['wilson95'][1]:.1f}]" + (" (best so far)" if is_best else "")
            )
        self.group.barrier()

    # ------------------------------------------------------------------ loop
    def _prepare_run_folder(self) -> None:
        if not self.is_main:
            return
        if self._fresh and self.cfg.overwrite:
            for name in RUN_ARTIFACTS:
                p = self.out / name
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
        self._fresh = False
        self.out.mkdir(parents=True, exist_ok=True)
        self.checkpoints.clean_temporaries()
        write_json_atomic(self.out / "train_config.json", to_dict(self.cfg))

    def train_step(self, batches: Iterator[dict[str, torch.Tensor]] | None = None, interval: "_Interval | None" = None) -> float:
        """One optimization step over ``grad_accum_steps`` micro-batches; returns the gradient norm.

        ``batches`` defaults to a stream that continues from the current step (what ``run`` uses).
        """
        cfg = self.cfg
        if batches is None:
            if self._batches is None:
                self._batches = batch_stream(self.windows, self.sampler, self.step, cfg.loader, self.device)
            batches = self._batches
        interval = interval if interval is not None else _Interval()
        accum = cfg.grad_accum_steps
        amp = self.autocast_dtype is not None
        t_step = time.perf_counter()
        for k in range(accum):
            t = time.perf_counter()
            batch = next(batches)
            interval.data_s += time.perf_counter() - t
            batch = {key: v.to(self.device, non_blocking=True) for key, v in batch.items()}
            torch.manual_seed(micro_batch_seed(cfg.seed, self.step, self.sampler.shard_index(k)))
            sync = self.loss_module.no_sync() if self.group.distributed and k < accum - 1 else contextlib.nullcontext()
            with sync:
                with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.bfloat16, enabled=amp):
                    loss, logs = self.loss_module(batch)
                if not torch.isfinite(loss):
                    raise UserError(f"loss became {float(loss)} at step {self.step}; lower lr or check the data")
                (loss / accum).backward()
            interval.add(logs)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.ema.step(self.policy.parameters())
        self.step += 1
        interval.grad_norm += float(grad_norm)
        interval.steps += 1
        interval.train_s += time.perf_counter() - t_step
        return float(grad_norm)

    def run(self, until: int | None = None) -> dict[str, Any]:
        """Train to cfg.steps (or stop early at step ``until``, saving a resumable state)."""
        cfg = self.cfg
        stop = min(cfg.steps, until) if until is not None else cfg.steps
        self._prepare_run_folder()
        self.group.barrier()
        tracker = Tracker(self.out, cfg.tracking, to_dict(cfg), resume_step=self.step if self.step > 0 else None, active=self.is_main)
        self.policy.train()
        batches = self._batches = batch_stream(self.windows, self.sampler, self.step, cfg.loader, self.device)
        bar = tqdm(total=cfg.steps, initial=self.step, desc="train", unit="step", disable=not (cfg.progress and self.is_main), dynamic_ncols=True)
        interval = _Interval()
        t_run = time.perf_counter()
        start_step = self.step
        last_loss = float("nan")
        saved_at = -1
        try:
            with _StopSignal() as stop_signal:
                while self.step < stop:
                    self.train_step(batches, interval)
                    bar.update(1)

                    if self.step % cfg.log_every == 0 or self.step == stop:
                        record = interval.reduce(self.group)
                        last_loss = record.get("loss", last_loss)
                        record.update(
                            lr=self.scheduler.get_last_lr()[0],
                            epoch=self.step / self.sampler.steps_per_epoch,
                            samples_per_s=cfg.batch_size * interval.steps / max(interval.train_s, 1e-9),
                            steps_per_s=interval.steps / max(interval.train_s, 1e-9),
                            data_wait_frac=interval.data_s / max(interval.train_s, 1e-9),
                        )
                        tracker.log("train", self.step, record)
                        bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{record['lr']:.1e}")
                        interval = _Interval()

                    do_eval = cfg.eval.every and (self.step % cfg.eval.every == 0 or self.step == cfg.steps)
                    periodic = cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0
                    if do_eval or periodic or self.step == stop:
                        self._save()
                        saved_at = self.step
                    if do_eval:
                        self._evaluate_and_select(tracker, bar)
                    if self.group.any(stop_signal.requested) and self.step < stop:
                        if saved_at != self.step:
                            self._save()
                        if self.is_main:
                            print(f"training stopped at step {self.step}; checkpoint in {self.ckpt_dir} (resume=true continues)", file=sys.stderr)
                        raise KeyboardInterrupt
        finally:
            bar.close()
            tracker.close()
        if saved_at != self.step:
            self._save()
        self.group.barrier()
        best = self.checkpoints.resolve("best") if self.is_main else None
        result = {
            "checkpoint": str(self.ckpt_dir),
            "steps": self.step,
            "final_loss": last_loss,
            "seconds": time.perf_counter() - t_run,
            "params": self.n_params,
            "windows": len(self.windows),
            "trained_steps": self.step - start_step,
            "best_checkpoint": str(best) if best else None,
            "best_success": self.checkpoints.best_score() if best else None,
        }
        if self.step >= cfg.steps:
            self.close()
        return result

    def close(self) -> None:
        """Leave the process group (when this trainer joined it)."""
        self.group.close()


class _Interval:
    """Loss terms and timings accumulated between two log lines."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.grad_norm = 0.0
        self.steps = 0
        self.train_s = 0.0
        self.data_s = 0.0

    def add(self, logs: dict[str, Any]) -> None:
        for k, v in logs.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
            self.counts[k] = self.counts.get(k, 0) + 1

    def reduce(self, group: ProcessGroup) -> dict[str, float]:
        """Mean of every logged term over micro-batches of all processes; mean gradient norm."""
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        for part in group.all_gather_json({"sums": self.sums, "counts": self.counts}):
            for k, v in part["sums"].items():
                sums[k] = sums.get(k, 0.0) + v
                counts[k] = counts.get(k, 0) + part["counts"][k]
        out = {k: sums[k] / counts[k] for k in sorted(sums)}
        out["grad_norm"] = self.grad_norm / max(1, self.steps)
        return out


def train(cfg: TrainConfig) -> dict[str, Any]:
    return Trainer(cfg).run()
