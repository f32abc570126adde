"""Closed-loop evaluation with receding-horizon execution, on Meta-World or PushT (``env=``).

Episodes of a task run in a pool of environments; whenever an environment's action queue
is empty it joins one batched policy call, and a finished environment immediately starts
the next seed. Each call's chunk runs for ``n_action_steps`` actions, or, for a
mixture-of-horizons policy with adaptive execution, for the length the policy chose for
that sample. Each episode's seed fixes its goal and object placement, so results are
reproducible and seeds disjoint from the demonstrations test generalization. What differs
between environments (tasks, observations, what counts as success, extra numbers such as
PushT's coverage) is their entry in :mod:`mixpolicy.envs.registry`.

With a recording folder (``rerun=true``) the first ``rerun_episodes`` episodes of each task
are also written as Rerun recordings (:mod:`mixpolicy.viewer`): frames, observations,
executed actions, every decision's predicted chunk, a mixture-of-horizons policy's
per-horizon predictions and the outcome. Evaluation plans every chunk from noise (no RTI
warm start), so there is no warm-start guess to record.

Results go to ``<run>/eval/step_N/`` for a run's checkpoint (:mod:`mixpolicy.envs.results`).
"""

from __future__ import annotations

import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from mixpolicy.config import to_dict
from mixpolicy.envs.chunking import ChunkPlanner, SlotChunks
from mixpolicy.envs.eval_config import EvalConfig  # noqa: F401 (re-exported)
from mixpolicy.envs.perturb import Perturbation, PerturbedEnv, check_perturbation
from mixpolicy.envs.registry import environment
from mixpolicy.envs.results import EVAL_DIR, RESULTS_FILE, format_table, results_folder, write_results  # noqa: F401 (re-exported)
from mixpolicy.errors import UserError
from mixpolicy.keys import camera_key, camera_name, is_image_key
from mixpolicy.policies.denoising_policy import TASK_KEY
from mixpolicy.utils import wilson_interval  # noqa: F401 (re-exported)
from mixpolicy.video import write_video

RERUN_DIR = "rerun"


class _Slot:
    """One environment of the pool and the episode it is running."""

    def __init__(self, env, n_obs_steps: int):
        self.env = env
        self.history: deque[dict[str, np.ndarray]] = deque(maxlen=n_obs_steps)
        self.queue: deque[np.ndarray] = deque()
        self.seed: int | None = None
        self.steps = 0
        self.frames: list[np.ndarray] | None = None
        self.recorder = None  # a RolloutRecorder for recorded episodes
        self.calls = 0
        self.planned = 0  # actions queued from this episode's chunks
        self.maxima: dict[str, float] = {}

    def start(self, seed: int, video: bool, recorder=None) -> None:
        obs, _ = self.env.reset(seed=seed)
        self.chunks = SlotChunks()
        self.seed, self.steps, self.calls, self.planned = seed, 0, 0, 0
        self.maxima = {}
        self.queue.clear()
        self.history.clear()
        for _ in range(self.history.maxlen):
            self.history.append(obs)
        frame = self.env.render() if video or recorder is not None else None
        self.frames = [frame] if video else None
        self.recorder = recorder
        if recorder is not None:
            recorder.observe(0, obs, frame)


def _horizon_predictions(policy) -> np.ndarray | None:
    """(K, B, H, A) raw per-horizon predictions of the last plan, for a mixture of horizons that captured them."""
    preds = getattr(policy.head, "last_horizon_predictions", None)
    if preds is None:
        return None
    return policy.normalizer.unnormalize(policy.cfg.action_key, preds.float()).cpu().numpy()


def check_cameras(policy, cameras: list[str], image_size: int) -> None:
    """A requested camera set or image size must be the checkpoint's: a policy sees only what it was trained on."""
    trained = {camera_name(k): tuple(policy.shape_meta.obs[k][:2]) for k in policy.cfg.obs_keys if is_image_key(k)}
    if cameras and sorted(cameras) != sorted(trained):
        raise UserError(f"cameras={cameras} differ from the checkpoint's cameras {list(trained)}")
    wrong = [f"{h}x{w} frames of {camera_key(c)}" for c, (h, w) in trained.items() if (h, w) != (image_size, image_size)]
    if image_size and (wrong or not trained):
        raise UserError(f"image_size={image_size} differs from the checkpoint's {', '.join(wrong) or 'frames: it takes none'}")


def _check_rendered(policy, env) -> None:
    """The environment renders every camera key of the checkpoint at its size (where it declares a Dict observation space)."""
    spaces = getattr(getattr(env, "observation_space", None), "spaces", None) or {}
    for key in (k for k in policy.cfg.obs_keys if is_image_key(k) and spaces):
        want, space = tuple(policy.shape_meta.obs[key]), spaces.get(key)
        if space is None:
            raise UserError(f"the checkpoint needs camera {key!r}; the environment renders {sorted(k for k in spaces if is_image_key(k))}")
        if tuple(space.shape) != want:
            raise UserError(f"the checkpoint's {key} frames are {'x'.join(map(str, want))}; the environment renders {'x'.join(map(str, space.shape))}")


def evaluate_policy(
    policy,
    tasks: list[str],
    episodes_per_task: int = 50,
    seed: int = 100_000,
    num_envs: int = 25,
    max_episode_steps: int = 0,
    num_inference_steps: int | None = None,
    n_action_steps: int | None = None,
    video_dir: Path | None = None,
    video_episodes: int = 0,
    video_size: int = 224,
    progress: bool = True,
    execution: str | None = None,
    adaptive_ratio: float | None = None,
    env: str = "metaworld",
    rerun_dir: Path | None = None,
    rerun_episodes: int = 0,
    delay: int = 0,
    mode: str = "naive",
    assumed_delay: int = -1,
    rti_k: int = 2,
    prefix: str = "guidance",
    rti_start_noise: float | str = "auto",
    perturb: str = "none",
    perturb_step: int = 30,
    perturb_distance: float = 0.1,
) -> dict[str, Any]:
    """Run closed-loop episodes; returns per-task and overall results (JSON-able).

    ``n_action_steps`` runs that many actions of every chunk; left at None, the policy's
    plan decides (its ``n_action_steps``, or per-sample lengths under adaptive execution,
    which ``execution`` / ``adaptive_ratio`` switch on a mixture-of-horizons policy).
    ``max_episode_steps`` 0 takes the environment's own episode length. ``delay``,
    ``mode``, ``assumed_delay``, ``rti_k``, ``rti_start_noise`` and ``prefix``: a simulated inference delay and the
    real-time inference mode (:mod:`mixpolicy.envs.chunking`); ``perturb*``: a mid-episode
    perturbation (:mod:`mixpolicy.envs.perturb`).
    """
    suite = environment(env)
    suite.require()
    suite.check_tasks(tasks)
    check_perturbation(suite.name, perturb, tasks)
    perturbation = Perturbation(perturb, perturb_step, perturb_distance)
    task_ids = {t: suite.task_index(policy, t) for t in tasks}  # raises for a task the policy never saw
    if execution or adaptive_ratio:
        policy.set_execution(execution, adaptive_ratio)
    cfg = policy.cfg
    n_exec = n_action_steps or cfg.n_action_steps
    if not 1 <= n_exec <= cfg.horizon:
        raise UserError(f"n_action_steps={n_exec} must be in [1, horizon={cfg.horizon}]")
    if delay > n_exec:  # at delay = n_action_steps a chunk is always in flight (the new one lands as the old one ends)
        raise UserError(f"delay={delay} must be at most the {n_exec} actions executed per chunk (n_action_steps)")
    if delay and not delay + n_exec <= cfg.horizon:
        raise UserError(f"delay={delay} + n_action_steps={n_exec} must fit the chunk (horizon={cfg.horizon})")
    steps = num_inference_steps or cfg.objective.num_inference_steps
    try:  # a step count the objective cannot sample (a shortcut model's must be a power of two)
        policy.objective.schedule(steps)
    except ValueError as exc:
        raise UserError(f"num_inference_steps={steps}: {exc}") from None
    planner = ChunkPlanner(policy, mode, delay, assumed_delay, rti_k, prefix, num_inference_steps, rti_start_noise)
    max_steps = max_episode_steps or suite.max_episode_steps
    obs_shapes = {k: list(policy.shape_meta.obs[k]) for k in cfg.obs_keys}
    recording = bool(rerun_dir and rerun_episodes)
    if recording:
        from mixpolicy.viewer import RolloutRecorder, require_rerun

        require_rerun()
    frame_size = video_size if (video_dir and video_episodes) or recording else 0
    moh_head = cfg.head.type == "moh"
    policy.eval()
    device = policy.device
    results: dict[str, Any] = {"env": suite.name, "tasks": {}}
    t_start = time.perf_counter()
    bar = tqdm(total=len(tasks) * episodes_per_task, desc="eval", unit="ep", disable=not progress, dynamic_ncols=True)
    policy_calls = 0
    policy_seconds = 0.0
    timing: dict[str, dict[str, float]] = {}
    for ti, task in enumerate(tasks):
        t_task = time.perf_counter()
        task_policy_s = 0.0
        seeds = [seed + i for i in range(episodes_per_task)]
        video_seeds = set(seeds[:video_episodes]) if video_dir else set()
        rerun_seeds = set(seeds[:rerun_episodes]) if recording else set()

        def recorder_for(s: int):
            if s not in rerun_seeds:
                return None
            fields = {"env": suite.name, "task": task, "seed": s, "policy": cfg.type, "head": cfg.head.type, "max steps": max_steps}
            return RolloutRecorder(rerun_dir / f"{task}_seed{s}.rrd", fields, fps=policy.shape_meta.fps)

        def make_env():
            env = suite.make(task, obs_shapes, frame_size, max_steps)
            return PerturbedEnv(env, perturbation) if perturbation.active else env

        slots = [_Slot(make_env(), cfg.n_obs_steps) for _ in range(min(num_envs, len(seeds)))]
        _check_rendered(policy, slots[0].env)
        pending = deque(seeds)
        active: list[_Slot] = []
        for slot in slots:
            s = pending.popleft()
            slot.start(s, s in video_seeds, recorder_for(s))
            active.append(slot)
        episodes: dict[int, dict[str, Any]] = {}
        generator = torch.Generator(device=device).manual_seed(seed + 7919 * ti)
        task_id = task_ids[task]
        while active:
            need = [s for s in active if planner.wants_chunk(s)]
            if need:
                obs = {}
                for key in cfg.obs_keys:
                    stacked = np.stack([np.stack([h[key] for h in s.history]) for s in need])
                    obs[key] = torch.from_numpy(stacked).to(device)
                obs[TASK_KEY] = torch.full((len(need),), task_id, dtype=torch.long, device=device)
                capture = moh_head and any(s.recorder is not None for s in need)
                if moh_head:
                    policy.head.capture_horizon_predictions = capture
                    policy.head.last_horizon_predictions = None
                t_call = time.perf_counter()
                planned = planner.plan(need, obs, generator)
                chunk = np.stack([c for c, _, _ in planned])
                lengths = [n_exec] * len(need) if n_action_steps else [n for _, n, _ in planned]
                task_policy_s += time.perf_counter() - t_call
                policy_calls += 1
                per_horizon = _horizon_predictions(policy) if capture else None
                for b, (s, c, n) in enumerate(zip(need, chunk, lengths)):
                    planner.accept(s, c, n, planned[b][2])
                    s.calls += 1
                    s.planned += n
                    if s.recorder is not None:
                        horizons = None if per_horizon is None else {h: per_horizon[k, b] for k, h in enumerate(cfg.head.horizons)}
                        s.recorder.decision(s.steps, c, n, horizons)
            still = []
            for s in active:
                action = planner.next_action(s)
                obs, _, done, truncated, info = s.env.step(action)
                s.steps += 1
                s.history.append(obs)
                metrics = info.get("metrics", {})
                for name, value in metrics.items():
                    s.maxima[name] = max(s.maxima.get(name, -np.inf), float(value))
                frame = s.env.render() if s.frames is not None or s.recorder is not None else None
                if s.frames is not None:
                    s.frames.append(frame)
                if s.recorder is not None:
                    s.recorder.act(s.steps - 1, action, metrics, marks=suite.success_marks)
                    s.recorder.observe(s.steps, obs, frame)
                if done or truncated:
                    success = suite.episode_success(done, s.maxima)
                    episodes[s.seed] = {
                        "seed": s.seed,
                        "success": success,
                        "length": s.steps,
                        "policy_calls": s.calls,
                        "mean_executable": s.planned / max(1, s.calls),
                        **ChunkPlanner.seam_summary(s),
                        **{f"max_{name}": s.maxima.get(name, 0.0) for name in suite.metrics},
                    }
                    if s.frames is not None:
                        write_video(video_dir / f"{task}_seed{s.seed}.mp4", np.stack(s.frames), fps=30.0)
                    if s.recorder is not None:
                        extra = "".join(f", max {name} {s.maxima.get(name, 0.0):.3f}" for name in suite.metrics)
                        s.recorder.finish(s.steps, success, f"{'success' if success else 'failure'} after {s.steps} steps{extra}")
                    bar.update(1)
                    if pending:
                        nxt = pending.popleft()
                        s.start(nxt, nxt in video_seeds, recorder_for(nxt))
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
            **suite.summarize(eps),
            "mean_length": float(np.mean([e["length"] for e in eps])),
            "mean_policy_calls": float(np.mean([e["policy_calls"] for e in eps])),
            "mean_executable": float(sum(e["mean_executable"] * e["policy_calls"] for e in eps) / max(1, sum(e["policy_calls"] for e in eps))),
            "seam_jump_mean": float(np.mean([e["seam_jump_mean"] for e in eps])),
            "seam_jump_max": float(max(e["seam_jump_max"] for e in eps)),
            "seeds": seeds,
            "per_episode": eps,
        }
        policy_seconds += task_policy_s
        # Timings stay out of the per-task results, which are deterministic given the seeds.
        timing[task] = {"seconds": time.perf_counter() - t_task, "policy_seconds": task_policy_s}
    bar.close()
    if moh_head:
        policy.head.capture_horizon_predictions = False
        policy.head.last_horizon_predictions = None
    per_task = list(results["tasks"].values())
    all_succ = sum(r["successes"] for r in per_task)
    all_n = sum(r["episodes"] for r in per_task)
    results["average_success"] = float(np.mean([r["success_rate"] for r in per_task]))
    results["overall_wilson95"] = list(wilson_interval(all_succ, all_n))
    for key in suite.summarize(per_task[0]["per_episode"]):
        results[key] = float(np.mean([r[key] for r in per_task]))
    results["seconds"] = time.perf_counter() - t_start
    all_eps = [e for r in per_task for e in r["per_episode"]]
    results["mean_policy_calls"] = float(np.mean([e["policy_calls"] for e in all_eps]))
    results["mean_executable"] = float(
        sum(e["mean_executable"] * e["policy_calls"] for e in all_eps) / max(1, sum(e["policy_calls"] for e in all_eps))
    )
    results["policy_seconds"] = policy_seconds
    results["timing_per_task"] = timing
    results["batched_policy_calls"] = policy_calls
    results["num_inference_steps"] = num_inference_steps or cfg.objective.num_inference_steps
    results["n_action_steps"] = n_exec
    results["max_episode_steps"] = max_steps
    results["execution"] = {"execution": "fixed", "n_action_steps": n_exec} if n_action_steps else policy.execution_info()
    results["realtime"] = {"mode": mode, "delay": delay, "assumed_delay": planner.assumed, "rti_k": rti_k, "prefix": prefix, **planner.warm_info()}
    results["perturbation"] = {"kind": perturb, "step": perturb_step, "distance": perturb_distance}
    if recording:
        results["rerun_dir"] = str(rerun_dir)
    return results


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    from mixpolicy.policies.inference import load_for_inference

    suite = environment(cfg.env)
    suite.require()  # before the checkpoint loads
    if cfg.rerun:
        from mixpolicy.viewer import require_rerun

        require_rerun()
    out = results_folder(cfg.checkpoint, cfg.out)

    def run(policy, tasks, episodes, seed, record: bool = True):
        return evaluate_policy(
            policy,
            tasks,
            episodes_per_task=episodes,
            seed=seed,
            num_envs=cfg.num_envs,
            max_episode_steps=cfg.max_episode_steps,
            num_inference_steps=cfg.num_inference_steps or None,
            n_action_steps=cfg.n_action_steps or None,
            video_dir=out / "videos" if cfg.video and record else None,
            video_episodes=cfg.video_episodes,
            video_size=cfg.video_size,
            progress=cfg.progress,
            execution=cfg.execution or None,
            adaptive_ratio=cfg.adaptive_ratio or None,
            env=cfg.env,
            rerun_dir=out / RERUN_DIR if cfg.rerun and record else None,
            rerun_episodes=cfg.rerun_episodes,
            delay=cfg.delay,
            mode=cfg.mode,
            assumed_delay=cfg.assumed_delay,
            rti_k=cfg.rti_k,
            prefix=cfg.prefix,
            rti_start_noise=cfg.rti_start_noise,
            perturb=cfg.perturb,
            perturb_step=cfg.perturb_step,
            perturb_distance=cfg.perturb_distance,
        )

    if not cfg.compose:
        policy, meta = load_for_inference(cfg.checkpoint, cfg.device, cfg.num_threads)
        check_cameras(policy, cfg.cameras, cfg.image_size)
        results = run(policy, suite.tasks(policy, list(cfg.tasks)), cfg.episodes_per_task, cfg.seed)
    else:
        from mixpolicy.envs.composition import evaluate_composed

        results = evaluate_composed(cfg, suite, run)
    results["checkpoint"] = str(cfg.checkpoint)
    results["config"] = to_dict(cfg)
    results["results_file"] = str(write_results(out, results))
    return results

