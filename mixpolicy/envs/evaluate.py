"""Closed-loop evaluation on Meta-World with receding-horizon execution.

Episodes of a task run in a pool of environments; whenever an environment's action queue
is empty it joins one batched policy call, and a finished environment immediately starts
the next seed. Each call's chunk runs for ``n_action_steps`` actions, or, for a
mixture-of-horizons policy with adaptive execution, for the length the policy chose for
that sample. Each episode's seed fixes its goal and object placement, so results are
reproducible and seeds disjoint from the demonstrations test generalization.

Results of a training run's checkpoint ``<run>/checkpoints/step_N`` (or of the ``last`` /
``best`` link to one) go to ``<run>/eval/step_N/``, which checkpoint pruning and
``overwrite`` never delete; a checkpoint outside a run writes to ``<checkpoint>/eval``.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from mixpolicy.config import check, to_dict
from mixpolicy.envs.metaworld_env import MetaWorldEnv, check_task_names
from mixpolicy.errors import UserError
from mixpolicy.datasets.replay_buffer import UNKNOWN_TASK
from mixpolicy.policies.config import IMAGE_PREFIX, is_image_key
from mixpolicy.policies.denoising_policy import TASK_KEY
from mixpolicy.utils import wilson_interval  # noqa: F401 (re-exported)
from mixpolicy.video import write_video

EVAL_DIR = "eval"
RESULTS_FILE = "results.json"
_RUN_STEP = re.compile(r"^step_\d+$")


@dataclass
class EvalConfig:
    checkpoint: str = ""
    tasks: list[str] = field(default_factory=list)
    episodes_per_task: int = 50
    seed: int = 100_000
    num_envs: int = 25
    max_episode_steps: int = 500
    num_inference_steps: int = 0
    n_action_steps: int = 0
    execution: str = ""  # "" (the policy's own) | fixed | adaptive (mixture-of-horizons policies)
    adaptive_ratio: float = 0.0  # 0: the policy's own
    device: str = "auto"
    num_threads: int = 0
    video: bool = False
    video_episodes: int = 2
    video_size: int = 224
    image_size: int = 0  # 0: the checkpoint's; else refused unless it is the checkpoint's
    cameras: list[str] = field(default_factory=list)  # empty: the checkpoint's; else refused unless they are the checkpoint's
    out: str = ""  # results folder; default: <run>/eval/step_N for a run's checkpoint, else <checkpoint>/eval
    progress: bool = True

    def __post_init__(self):
        check(bool(self.checkpoint), "checkpoint", "a checkpoint folder is required (checkpoint=path)")
        check(self.episodes_per_task >= 1, "episodes_per_task", "must be >= 1")
        check(self.num_envs >= 1, "num_envs", "must be >= 1")
        check(1 <= self.max_episode_steps <= 500, "max_episode_steps", "must be in [1, 500]")
        check(self.num_inference_steps >= 0, "num_inference_steps", "must be >= 0 (0: the policy's own)")
        check(self.n_action_steps >= 0, "n_action_steps", "must be >= 0 (0: the policy's own)")
        check(self.execution in ("", "fixed", "adaptive"), "execution", "must be fixed or adaptive (empty: the policy's own)")
        check(self.adaptive_ratio >= 0, "adaptive_ratio", "must be >= 0 (0: the policy's own)")
        check(
            not (self.execution == "adaptive" and self.n_action_steps),
            "n_action_steps",
            "sets a fixed count; adaptive execution chooses the count per chunk (leave n_action_steps=0)",
        )
        check(self.video_episodes >= 0, "video_episodes", "must be >= 0")
        check(self.seed >= 0, "seed", "must be >= 0")
        check(self.image_size >= 0, "image_size", "must be >= 0 (0: the checkpoint's)")
        if self.tasks:
            check_task_names(self.tasks)


class _Slot:
    """One environment of the pool and the episode it is running."""

    def __init__(self, env: MetaWorldEnv, n_obs_steps: int):
        self.env = env
        self.history: deque[dict[str, np.ndarray]] = deque(maxlen=n_obs_steps)
        self.queue: deque[np.ndarray] = deque()
        self.seed: int | None = None
        self.steps = 0
        self.frames: list[np.ndarray] | None = None
        self.calls = 0
        self.planned = 0  # actions queued from this episode's chunks

    def start(self, seed: int, record: bool) -> None:
        obs, _ = self.env.reset(seed=seed)
        self.seed, self.steps, self.calls, self.planned = seed, 0, 0, 0
        self.queue.clear()
        self.history.clear()
        for _ in range(self.history.maxlen):
            self.history.append(obs)
        self.frames = [self.env.render()] if record else None


def _policy_cameras(policy) -> list[str]:
    return [k[len(IMAGE_PREFIX) :] for k in policy.cfg.obs_keys if is_image_key(k)]


def check_cameras(policy, cameras: list[str], image_size: int) -> None:
    """A requested camera set or image size must be the checkpoint's: a policy sees only what it was trained on."""
    trained = _policy_cameras(policy)
    if cameras and sorted(cameras) != sorted(trained):
        raise UserError(f"cameras={cameras} differ from the checkpoint's cameras {trained}")
    if image_size and not trained:
        raise UserError(f"image_size={image_size} given, but the checkpoint takes no camera frames")
    for cam in trained if image_size else []:
        h, w = policy.shape_meta.obs[f"{IMAGE_PREFIX}{cam}"][:2]
        if (h, w) != (image_size, image_size):
            raise UserError(f"image_size={image_size} differs from the checkpoint's {h}x{w} frames of {IMAGE_PREFIX}{cam}")


def _check_rendered(policy, env: MetaWorldEnv) -> None:
    """The environment renders every camera key of the checkpoint, at its size."""
    for key in (k for k in policy.cfg.obs_keys if is_image_key(k)):
        want = tuple(policy.shape_meta.obs[key])
        space = env.observation_space.spaces.get(key)
        if space is None:
            raise UserError(f"the checkpoint needs camera {key!r}; the environment renders {sorted(k for k in env.observation_space.spaces if is_image_key(k))}")
        if tuple(space.shape) != want:
            raise UserError(f"the checkpoint's {key} frames are {'x'.join(map(str, want))}; the environment renders {'x'.join(map(str, space.shape))}")


def evaluate_policy(
    policy,
    tasks: list[str],
    episodes_per_task: int = 50,
    seed: int = 100_000,
    num_envs: int = 25,
    max_episode_steps: int = 500,
    num_inference_steps: int | None = None,
    n_action_steps: int | None = None,
    video_dir: Path | None = None,
    video_episodes: int = 0,
    video_size: int = 224,
    progress: bool = True,
    execution: str | None = None,
    adaptive_ratio: float | None = None,
) -> dict[str, Any]:
    """Run closed-loop episodes; returns per-task and overall results (JSON-able).

    ``n_action_steps`` runs that many actions of every chunk; left at None, the policy's
    plan decides (its ``n_action_steps``, or per-sample lengths under adaptive execution,
    which ``execution`` / ``adaptive_ratio`` switch on a mixture-of-horizons policy).
    """
    check_task_names(tasks)
    if policy.task_conditioned:
        for t in tasks:
            policy.task_index(t)  # raises for a task the policy never saw
    if execution or adaptive_ratio:
        policy.set_execution(execution, adaptive_ratio)
    cfg = policy.cfg
    n_exec = n_action_steps or cfg.n_action_steps
    if not 1 <= n_exec <= cfg.horizon:
        raise UserError(f"n_action_steps={n_exec} must be in [1, horizon={cfg.horizon}]")
    cameras = _policy_cameras(policy)
    image_size = policy.shape_meta.obs[f"{IMAGE_PREFIX}{cameras[0]}"][0] if cameras else 84
    record_cam = cameras or (["corner"] if video_dir and video_episodes else [])
    policy.eval()
    device = policy.device
    results: dict[str, Any] = {"tasks": {}}
    t_start = time.perf_counter()
    total_eps = len(tasks) * episodes_per_task
    bar = tqdm(total=total_eps, desc="eval", unit="ep", disable=not progress, dynamic_ncols=True)
    policy_calls = 0
    policy_seconds = 0.0
    timing: dict[str, dict[str, float]] = {}
    for ti, task in enumerate(tasks):
        t_task = time.perf_counter()
        task_policy_s = 0.0
        seeds = [seed + i for i in range(episodes_per_task)]
        record_seeds = set(seeds[:video_episodes]) if video_dir else set()
        size = image_size if cameras else video_size
        slots = [
            _Slot(MetaWorldEnv(task, cameras=record_cam, image_size=size, max_episode_steps=max_episode_steps), cfg.n_obs_steps)
            for _ in range(min(num_envs, len(seeds)))
        ]
        if cameras:
            _check_rendered(policy, slots[0].env)
        pending = deque(seeds)
        active: list[_Slot] = []
        for slot in slots:
            s = pending.popleft()
            slot.start(s, s in record_seeds)
            active.append(slot)
        episodes: dict[int, dict[str, Any]] = {}
        generator = torch.Generator(device=device).manual_seed(seed + 7919 * ti)
        task_id = policy.task_index(task) if policy.task_conditioned else 0
        while active:
            need = [s for s in active if not s.queue]
            if need:
                obs = {}
                for key in cfg.obs_keys:
                    stacked = np.stack([np.stack([h[key] for h in s.history]) for s in need])
                    obs[key] = torch.from_numpy(stacked).to(device)
                obs[TASK_KEY] = torch.full((len(need),), task_id, dtype=torch.long, device=device)
                t_call = time.perf_counter()
                plan = policy.plan(obs, generator=generator, num_steps=num_inference_steps or None)
                chunk = plan.actions.cpu().numpy()
                lengths = [n_exec] * len(need) if n_action_steps else plan.executable.tolist()
                task_policy_s += time.perf_counter() - t_call
                policy_calls += 1
                for s, c, n in zip(need, chunk, lengths):
                    s.queue.extend(c[:n])
                    s.calls += 1
                    s.planned += n
            still = []
            for s in active:
                obs, _, success, truncated, _ = s.env.step(s.queue.popleft())
                s.steps += 1
                s.history.append(obs)
                if s.frames is not None:
                    s.frames.append(s.env.render())
                if success or truncated:
                    episodes[s.seed] = {
                        "seed": s.seed,
                        "success": bool(success),
                        "length": s.steps,
                        "policy_calls": s.calls,
                        "mean_executable": s.planned / max(1, s.calls),
                    }
                    if s.frames is not None:
                        write_video(video_dir / f"{task}_seed{s.seed}.mp4", np.stack(s.frames), fps=30.0)
                    bar.update(1)
                    if pending:
                        nxt = pending.popleft()
                        s.start(nxt, nxt in record_seeds)
                        still.append(s)
                    else:
                        s.env.close()
                else:
                    still.append(s)
            active = still
        eps = [episodes[s] for s in seeds]
        n_succ = sum(e["success"] for e in eps)
        lo, hi = wilson_interval(n_succ, len(eps))
        results["tasks"][task] = {
            "success_rate": n_succ / len(eps),
            "successes": n_succ,
            "episodes": len(eps),
            "wilson95": [lo, hi],
            "mean_length": float(np.mean([e["length"] for e in eps])),
            "mean_policy_calls": float(np.mean([e["policy_calls"] for e in eps])),
            "mean_executable": float(sum(e["mean_executable"] * e["policy_calls"] for e in eps) / max(1, sum(e["policy_calls"] for e in eps))),
            "seeds": seeds,
            "per_episode": eps,
        }
        policy_seconds += task_policy_s
        # Timings stay out of the per-task results, which are deterministic given the seeds.
        timing[task] = {"seconds": time.perf_counter() - t_task, "policy_seconds": task_policy_s}
    bar.close()
    rates = [r["success_rate"] for r in results["tasks"].values()]
    all_succ = sum(r["successes"] for r in results["tasks"].values())
    all_n = sum(r["episodes"] for r in results["tasks"].values())
    results["average_success"] = float(np.mean(rates))
    results["overall_wilson95"] = list(wilson_interval(all_succ, all_n))
    results["seconds"] = time.perf_counter() - t_start
    all_eps = [e for r in results["tasks"].values() for e in r["per_episode"]]
    results["mean_policy_calls"] = float(np.mean([e["policy_calls"] for e in all_eps]))
    results["mean_executable"] = float(
        sum(e["mean_executable"] * e["policy_calls"] for e in all_eps) / max(1, sum(e["policy_calls"] for e in all_eps))
    )
    results["policy_seconds"] = policy_seconds
    results["timing_per_task"] = timing
    results["batched_policy_calls"] = policy_calls
    results["num_inference_steps"] = num_inference_steps or cfg.objective.num_inference_steps
    results["n_action_steps"] = n_exec
    results["execution"] = {"execution": "fixed", "n_action_steps": n_exec} if n_action_steps else policy.execution_info()
    return results


def format_table(results: dict[str, Any]) -> str:
    """Per-task success table as plain text."""
    rows = [("task", "success", "95% CI", "mean len", "calls/ep", "actions/call")]
    for task, r in results["tasks"].items():
        lo, hi = r["wilson95"]
        rows.append(
            (
                task,
                f"{r['successes']}/{r['episodes']} ({100 * r['success_rate']:.1f}%)",
                f"[{100 * lo:.1f}, {100 * hi:.1f}]",
                f"{r['mean_length']:.1f}",
                f"{r['mean_policy_calls']:.1f}",
                f"{r['mean_executable']:.2f}",
            )
        )
    lo, hi = results["overall_wilson95"]
    rows.append(
        (
            "average",
            f"{100 * results['average_success']:.1f}%",
            f"[{100 * lo:.1f}, {100 * hi:.1f}]",
            "",
            f"{results['mean_policy_calls']:.1f}",
            f"{results['mean_executable']:.2f}",
        )
    )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.insert(len(lines) - 1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def results_folder(checkpoint: str | Path, out: str = "") -> Path:
    """Where results of ``checkpoint`` go: ``out`` when given, ``<run>/eval/step_N`` for a
    step folder of a run's ``checkpoints/`` (followed through a ``last``/``best`` link), else ``<checkpoint>/eval``."""
    if out:
        return Path(out)
    ckpt = Path(checkpoint)
    step = Path(os.readlink(ckpt)) if ckpt.is_symlink() else Path(ckpt.name)
    if ckpt.parent.name == "checkpoints" and len(step.parts) == 1 and _RUN_STEP.match(step.name):
        return ckpt.parent.parent / EVAL_DIR / step.name
    return ckpt / EVAL_DIR


def write_results(folder: Path, results: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / RESULTS_FILE
    tmp = folder / f".{RESULTS_FILE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(results, indent=2))
    os.replace(tmp, path)
    return path


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    from mixpolicy.policies.inference import load_for_inference

    policy, meta = load_for_inference(cfg.checkpoint, cfg.device, cfg.num_threads)
    check_cameras(policy, cfg.cameras, cfg.image_size)
    tasks = cfg.tasks or list(policy.shape_meta.tasks)
    if not tasks or tasks == [UNKNOWN_TASK]:
        raise UserError("the checkpoint records no Meta-World tasks; pass tasks=[...]")
    out = results_folder(cfg.checkpoint, cfg.out)
    results = evaluate_policy(
        policy,
        tasks,
        episodes_per_task=cfg.episodes_per_task,
        seed=cfg.seed,
        num_envs=cfg.num_envs,
        max_episode_steps=cfg.max_episode_steps,
        num_inference_steps=cfg.num_inference_steps or None,
        n_action_steps=cfg.n_action_steps or None,
        video_dir=out / "videos" if cfg.video else None,
        video_episodes=cfg.video_episodes,
        video_size=cfg.video_size,
        progress=cfg.progress,
        execution=cfg.execution or None,
        adaptive_ratio=cfg.adaptive_ratio or None,
    )
    results["checkpoint"] = str(cfg.checkpoint)
    results["config"] = to_dict(cfg)
    results["results_file"] = str(write_results(out, results))
    return results
