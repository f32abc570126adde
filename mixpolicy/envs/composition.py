"""Evaluating a composition of policies: fixed weights, or weights chosen per task on
validation episodes (seeds of their own, disjoint from the evaluation seeds)."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from mixpolicy.errors import UserError
from mixpolicy.utils import wilson_interval

# Weight grids for auto selection: the share of policy 0, the rest split evenly.
AUTO_SHARES = (0.0, 0.25, 0.5, 0.75, 1.0)


def weight_grid(n_policies: int) -> list[list[float]]:
    if n_policies < 2:
        raise UserError("a composition needs at least two policies (checkpoint and compose=[...])")
    return [[s] + [(1.0 - s) / (n_policies - 1)] * (n_policies - 1) for s in AUTO_SHARES]


def choose_weights(tasks: list[str], grid: list[list[float]], success: Callable[[list[float], str], float]) -> dict[str, list[float]]:
    """Per task the grid weights with the highest validation success (ties: the most even)."""
    chosen = {}
    for task in tasks:
        scores = [(success(w, task), -float(np.ptp(w)), i) for i, w in enumerate(grid)]
        chosen[task] = grid[max(scores)[2]]
    return chosen


def merge_task_results(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One results dict from per-task evaluations (each with its own weights)."""
    merged = dict(parts[0])
    merged["tasks"] = {t: r for p in parts for t, r in p["tasks"].items()}
    per_task = list(merged["tasks"].values())
    n_succ, n = sum(r["successes"] for r in per_task), sum(r["episodes"] for r in per_task)
    merged["average_success"] = float(np.mean([r["success_rate"] for r in per_task]))
    merged["overall_wilson95"] = list(wilson_interval(n_succ, n))
    for key in ("seconds", "policy_seconds"):
        merged[key] = float(sum(p.get(key, 0.0) for p in parts))
    merged["mean_policy_calls"] = float(np.mean([r["mean_policy_calls"] for r in per_task]))
    return merged


def evaluate_composed(cfg, suite, run) -> dict[str, Any]:
    """Evaluate ``cfg.checkpoint`` + ``cfg.compose`` (an EvalConfig) with fixed weights, or
    weights chosen per task on validation seeds; ``run(policy, tasks, episodes, seed, record)``
    evaluates one policy."""
    from mixpolicy.policies.inference import load_composition

    paths = [cfg.checkpoint, *cfg.compose]
    if cfg.compose_weights:
        policy, _ = load_composition(paths, list(cfg.compose_weights), cfg.device, cfg.num_threads)
        results = run(policy, suite.tasks(policy, list(cfg.tasks)), cfg.episodes_per_task, cfg.seed)
        results["composition"] = {"checkpoints": paths, "weights": list(cfg.compose_weights)}
        return results
    grid = weight_grid(len(paths))
    policies = [load_composition(paths, w, cfg.device, cfg.num_threads)[0] for w in grid]
    tasks = suite.tasks(policies[0], list(cfg.tasks))

    def val_success(weights, task):
        res = run(policies[grid.index(weights)], [task], cfg.compose_val_episodes, cfg.compose_val_seed, record=False)
        return res["tasks"][task]["success_rate"]

    chosen = choose_weights(tasks, grid, val_success)
    results = merge_task_results([run(policies[grid.index(chosen[t])], [t], cfg.episodes_per_task, cfg.seed) for t in tasks])
    results["composition"] = {"checkpoints": paths, "weights_per_task": chosen, "validation_episodes": cfg.compose_val_episodes,
                              "validation_seed": cfg.compose_val_seed}  # fmt: skip
    return results
