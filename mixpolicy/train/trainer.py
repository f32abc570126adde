"""Training loop: AdamW, warmup + cosine, EMA, gradient clipping, safetensors checkpoints.

A run folder holds::

    train_config.json                 the validated config of the run
    metrics.jsonl                     one JSON line per logged step
    tb/                               tensorboard scalars
    checkpoints/last/                 policy (EMA weights) + training state for resume
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from mixpolicy.config import ConfigError, check, from_dict, to_dict
from mixpolicy.datasets.normalizer import Normalizer
from mixpolicy.datasets.replay_buffer import ReplayBuffer
from mixpolicy.datasets.sampler import InMemoryWindows, SequenceSampler
from mixpolicy.datasets.selection import EpisodeSelection, select_episodes
from mixpolicy.errors import UserError
from mixpolicy.policies.checkpoint import load_policy, read_checkpoint_meta, save_policy
from mixpolicy.policies.config import PolicyConfig, policy_class, policy_config_from_dict
from mixpolicy.policies.denoising_policy import TASK_KEY, ShapeMeta
from mixpolicy.utils import resolve_device, set_threads

TRAIN_STATE_FILE = "training_state.safetensors"
TRAIN_STATE_JSON = "training_state.json"


@dataclass
class TrainConfig:
    dataset: str = ""
    out_dir: str = "runs/train"
    policy: Any = None
    steps: int = 3000
    batch_size: int = 256
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
    num_threads: int = 0
    tasks: list[str] = field(default_factory=list)
    successful_only: bool = True
    max_episodes: int = 0
    log_every: int = 50
    checkpoint_every: int = 0
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
        check(self.lr > 0, "lr", "must be > 0")
        check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas", "must be two numbers in [0, 1)")
        check(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]")
        check(self.grad_clip >= 0, "grad_clip", "must be >= 0 (0 disables clipping)")
        check(0 <= self.ema_decay < 1, "ema_decay", "must be in [0, 1)")
        check(self.max_episodes >= 0, "max_episodes", "must be >= 0 (0 means all)")
        check(self.log_every >= 1, "log_every", "must be >= 1")
        check(self.checkpoint_every >= 0, "checkpoint_every", "must be >= 0 (0: only at the end)")
        check(self.num_threads >= 0, "num_threads", "must be >= 0 (0: all cores)")
        check(not (self.resume and self.overwrite), "resume", "cannot be combined with overwrite=true")


def lr_lambda(warmup: int, total: int, min_ratio: float):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def load_training_windows(cfg: TrainConfig, key_offsets: dict[str, range]):
    """Open the dataset, select episodes, load the needed keys; returns (buffer, windows, shape_meta, arrays)."""
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
    )
    return buffer, windows, shape_meta, arrays, mask


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.out = Path(cfg.out_dir)
        self.ckpt_dir = self.out / "checkpoints" / "last"
        if self.out.exists() and any(self.out.iterdir()) and not (cfg.resume or cfg.overwrite):
            raise UserError(f"output folder {self.out} is not empty (pass resume=true to continue or overwrite=true)")
        if cfg.resume and not (self.ckpt_dir / TRAIN_STATE_FILE).is_file():
            raise UserError(f"nothing to resume in {self.out}: no {self.ckpt_dir / TRAIN_STATE_FILE}")
        self.device = resolve_device(cfg.device)
        set_threads(cfg.num_threads)
        torch.manual_seed(cfg.seed)
        self.rng = np.random.default_rng(cfg.seed)

        probe_cls = policy_class(cfg.policy.type)
        offsets = {k: range(-(cfg.policy.n_obs_steps - 1), 1) for k in cfg.policy.obs_keys}
        offsets[cfg.policy.action_key] = range(0, cfg.policy.horizon)
        self.buffer, self.windows, shape_meta, arrays, mask = load_training_windows(cfg, offsets)
        # Normalization statistics come from the selected episodes only.
        # (every step of a selected episode anchors one window).
        sel_rows = self.windows.sampler.anchor
        # Images (uint8 H x W x 3) are normalized inside the policy's image encoder.
        normalizer = Normalizer.from_data({k: arrays[k][sel_rows] for k in offsets if arrays[k].ndim == 2})
        discrete_scale = getattr(cfg.policy, "discrete_action_scale", 1.0)
        if discrete_scale != 1.0 and shape_meta.discrete_action_dims:
            normalizer.scale_dims(cfg.policy.action_key, shape_meta.discrete_action_dims, 1.0 / discrete_scale)
        self.policy = probe_cls(cfg.policy, shape_meta, normalizer).to(self.device)
        self.n_params = sum(p.numel() for p in self.policy.parameters())

        decay, no_decay = [], []
        for name, p in self.policy.named_parameters():
            (no_decay if p.ndim < 2 or "embed" in name or name.endswith(".pos") else decay).append(p)
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr,
            betas=tuple(cfg.betas),
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
        )
        from diffusers.training_utils import EMAModel

        self.ema = EMAModel(self.policy.parameters(), decay=cfg.ema_decay, use_ema_warmup=True, power=cfg.ema_power)
        self.step = 0
        if cfg.resume:
            self._load_state()

    # ------------------------------------------------------------------ state
    def _save(self) -> None:
        params = list(self.policy.parameters())
        self.ema.store(params)
        self.ema.copy_to(params)
        try:
            save_policy(self.policy, self.ckpt_dir, info={"step": self.step, "dataset": str(self.cfg.dataset)})
        finally:
            self.ema.restore(params)
        tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in self.policy.state_dict().items()}
        for i, p in enumerate(self.ema.shadow_params):
            tensors[f"ema.{i}"] = p.detach().cpu().contiguous()
        opt = self.optimizer.state_dict()
        for pid, st in opt["state"].items():
            for name, v in st.items():
                tensors[f"optim.{pid}.{name}"] = torch.as_tensor(v).detach().cpu().contiguous()
        tensors["rng.torch"] = torch.get_rng_state()
        state_json = {
            "step": self.step,
            "optimizer_param_groups": [{k: v for k, v in g.items() if k != "params"} for g in opt["param_groups"]],
            "scheduler": self.scheduler.state_dict(),
            "ema_optimization_step": int(self.ema.optimization_step),
            "numpy_rng": self.rng.bit_generator.state,
        }
        tmp = self.ckpt_dir / (TRAIN_STATE_FILE + ".tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, self.ckpt_dir / TRAIN_STATE_FILE)
        (self.ckpt_dir / (TRAIN_STATE_JSON + ".tmp")).write_text(json.dumps(state_json))
        os.replace(self.ckpt_dir / (TRAIN_STATE_JSON + ".tmp"), self.ckpt_dir / TRAIN_STATE_JSON)

    def _load_state(self) -> None:
        meta = read_checkpoint_meta(self.ckpt_dir)
        if meta["policy_type"] != self.cfg.policy.type:
            raise UserError(
                f"cannot resume: {self.ckpt_dir} holds a {meta['policy_type']!r} policy, the config asks for {self.cfg.policy.type!r}"
            )
        tensors = load_file(str(self.ckpt_dir / TRAIN_STATE_FILE))
        state_json = json.loads((self.ckpt_dir / TRAIN_STATE_JSON).read_text())
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
        torch.set_rng_state(tensors["rng.torch"])
        self.rng.bit_generator.state = state_json["numpy_rng"]
        self.step = int(state_json["step"])

    # ------------------------------------------------------------------ loop
    def train_step(self) -> tuple[dict[str, float], torch.Tensor]:
        """One optimization step on a random batch; returns (logs, gradient norm)."""
        cfg = self.cfg
        ids = self.rng.integers(0, len(self.windows), size=cfg.batch_size)
        batch = {k: v.to(self.device, non_blocking=True) for k, v in self.windows.batch(ids).items()}
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            loss, logs = self.policy.compute_loss(batch)
        if not torch.isfinite(loss):
            raise UserError(f"loss became {float(loss)} at step {self.step}; lower lr or check the data")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        self.optimizer.step()
        self.scheduler.step()
        self.ema.step(self.policy.parameters())
        self.step += 1
        return logs, grad_norm

    def run(self, until: int | None = None) -> dict[str, Any]:
        """Train to cfg.steps (or stop early at step ``until``, saving a resumable state)."""
        cfg = self.cfg
        stop = min(cfg.steps, until) if until is not None else cfg.steps
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "train_config.json").write_text(json.dumps(to_dict(cfg), indent=2))
        writer = _tensorboard_writer(self.out / "tb")
        metrics_file = open(self.out / "metrics.jsonl", "a")
        self.policy.train()
        n_windows = len(self.windows)
        bar = tqdm(
            total=cfg.steps,
            initial=self.step,
            desc="train",
            unit="step",
            disable=not cfg.progress,
            dynamic_ncols=True,
        )
        t0 = time.perf_counter()
        start_step = self.step
        last_loss = float("nan")
        try:
            while self.step < stop:
                logs, grad_norm = self.train_step()
                last_loss = logs["loss"]
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    elapsed = time.perf_counter() - t0
                    record = {
                        "step": self.step,
                        **logs,
                        "grad_norm": float(grad_norm),
                        "lr": self.scheduler.get_last_lr()[0],
                        "steps_per_s": (self.step - start_step) / max(elapsed, 1e-9),
                    }
                    bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{record['lr']:.1e}")
                    metrics_file.write(json.dumps(record) + "\n")
                    metrics_file.flush()
                    if writer is not None:
                        for k, v in record.items():
                            if k != "step":
                                writer.add_scalar(f"train/{k}", v, self.step)
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < stop:
                    self._save()
        finally:
            bar.close()
            metrics_file.close()
            if writer is not None:
                writer.close()
        self._save()
        elapsed = time.perf_counter() - t0
        return {
            "checkpoint": str(self.ckpt_dir),
            "steps": self.step,
            "final_loss": last_loss,
            "seconds": elapsed,
            "params": self.n_params,
            "windows": n_windows,
        }


def _tensorboard_writer(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a dependency, but keep training alive without it
        return None
    return SummaryWriter(str(path))


def train(cfg: TrainConfig) -> dict[str, Any]:
    return Trainer(cfg).run()
