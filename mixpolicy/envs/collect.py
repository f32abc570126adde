"""Scripted-expert demonstrations for Meta-World v3 tasks, written to a zarr store.

With ``noise_std > 0`` the executed action is the expert's plus Gaussian noise while the
recorded action is the expert's clean one, so the data shows how to recover from small
deviations (DART-style). Episode ``i`` of a task is generated from seed ``seed + i``
(attempts that fail and are dropped still consume their seed).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from mixpolicy.config import check
from mixpolicy.datasets.replay_buffer import DatasetMeta, KeySpec, ReplayBuffer
from mixpolicy.keys import camera_key
from mixpolicy.envs.metaworld_env import (
    ACTION_DIM,
    CONTROL_HZ,
    GRIPPER_ACTION_DIM,
    PROPRIO_DIM,
    STATE_DIM,
    MetaWorldEnv,
    check_task_names,
    scripted_expert,
    task_description,
)
from mixpolicy.errors import UserError
from mixpolicy.utils import staged_output


@dataclass
class CollectConfig:
    tasks: list[str] = field(default_factory=lambda: ["reach-v3", "push-v3", "drawer-open-v3"])
    episodes_per_task: int = 50
    out: str = "data/metaworld.zarr"
    noise_std: float = 0.0
    keep_successful_only: bool = True
    max_attempts_factor: int = 3
    cameras: list[str] = field(default_factory=list)
    image_size: int = 84
    seed: int = 0
    max_episode_steps: int = 500
    post_success_steps: int = 5
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self):
        check(len(self.tasks) >= 1, "tasks", "list at least one Meta-World task")
        check_task_names(self.tasks)
        check(len(set(self.tasks)) == len(self.tasks), "tasks", "contains duplicates")
        check(self.episodes_per_task >= 1, "episodes_per_task", "must be >= 1")
        check(bool(self.out), "out", "an output path is required")
        check(self.noise_std >= 0, "noise_std", "must be >= 0")
        check(self.max_attempts_factor >= 1, "max_attempts_factor", "must be >= 1")
        check(8 <= self.image_size <= 1024, "image_size", "must be in [8, 1024]")
        check(1 <= self.max_episode_steps <= 500, "max_episode_steps", "must be in [1, 500]")
        check(self.post_success_steps >= 0, "post_success_steps", "must be >= 0")
        check(self.seed >= 0, "seed", "must be >= 0")


def _meta(cfg: CollectConfig) -> DatasetMeta:
    specs = {
        "state": KeySpec((STATE_DIM,), "float32"),
        "proprio": KeySpec((PROPRIO_DIM,), "float32"),
        "action": KeySpec((ACTION_DIM,), "float32"),
    }
    for cam in cfg.cameras:
        specs[camera_key(cam)] = KeySpec((cfg.image_size, cfg.image_size, 3), "uint8")
    return DatasetMeta(
        fps=CONTROL_HZ,
        tasks=[],
        obs_keys=[k for k in specs if k != "action"],
        action_key="action",
        discrete_action_dims=[GRIPPER_ACTION_DIM],
        task_descriptions={t: task_description(t) for t in cfg.tasks},
        source="metaworld scripted experts",
        specs=specs,
    )


def rollout_expert(env: MetaWorldEnv, expert, seed: int, noise_std: float, rng: np.random.Generator, post_success_steps: int):
    """One episode; returns (dict of arrays, success)."""
    obs, _ = env.reset(seed=seed)
    keys = list(obs)
    frames: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    actions: list[np.ndarray] = []
    success, extra = False, 0
    while True:
        action = expert(obs["state"])
        for k in keys:
            frames[k].append(obs[k])
        actions.append(action)
        executed = action + rng.normal(0.0, noise_std, size=action.shape) if noise_std > 0 else action
        obs, _, succ, truncated, _ = env.step(np.clip(executed, -1, 1))
        success = success or succ
        if success:
            extra += 1
            if extra > post_success_steps:
                break
        if truncated:
            break
    data = {k: np.stack(v) for k, v in frames.items()}
    data["action"] = np.stack(actions).astype(np.float32)
    return data, success


def collect(cfg: CollectConfig) -> dict[str, Any]:
    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite:
        raise UserError(f"output {out} already exists (pass overwrite=true to replace it)")
    meta = _meta(cfg)
    # Build into a sibling folder and swap in at the end: an interrupted run or a
    # failure never damages an existing dataset at `out`.
    rng = np.random.default_rng(cfg.seed)
    stats: dict[str, Any] = {}
    t0 = time.perf_counter()
    bar = tqdm(total=len(cfg.tasks) * cfg.episodes_per_task, desc="collect", unit="ep", disable=not cfg.progress, dynamic_ncols=True)
    with staged_output(out) as tmp, bar:
        buffer = ReplayBuffer.create(tmp, meta, overwrite=True)
        for task in cfg.tasks:
            env = MetaWorldEnv(task, cameras=cfg.cameras, image_size=cfg.image_size, max_episode_steps=cfg.max_episode_steps)
            expert = scripted_expert(task)
            kept, attempts, failures = 0, 0, 0
            max_attempts = cfg.episodes_per_task * (cfg.max_attempts_factor if cfg.keep_successful_only else 1)
            while kept < cfg.episodes_per_task and attempts < max_attempts:
                seed = cfg.seed + attempts
                attempts += 1
                data, success = rollout_expert(env, expert, seed, cfg.noise_std, rng, cfg.post_success_steps)
                if not success:
                    failures += 1
                    if cfg.keep_successful_only:
                        continue
                buffer.add_episode(data, task=task, success=success, seed=seed)
                kept += 1
                bar.update(1)
            env.close()
            if kept < cfg.episodes_per_task:
                raise UserError(
                    f"{task}: only {kept} successful episodes in {attempts} attempts; lower noise_std or set keep_successful_only=false"
                )
            stats[task] = {"episodes": kept, "attempts": attempts, "expert_failures": failures}
        buffer.close()  # release the write lock before the store moves into place
    buffer = ReplayBuffer.open(out)
    return {
        "path": str(out),
        "episodes": buffer.n_episodes,
        "steps": buffer.n_steps,
        "seconds": time.perf_counter() - t0,
        "per_task": stats,
    }
